"""`bench`'s llama.cpp reference: a known method with a clear error when llama-cpp-python is missing,
the profile's own GGUF located or joined once, its report table, and a real run on the `tiny` profile."""

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from domino_backend import cli, models
from domino_backend.bench import BENCH_METHODS, common_prefix, parse_method
from domino_backend.llamacpp import LlamaCpp
from domino_backend.models import PROFILES, ModelError, Profile, profile_gguf

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
report = sys.modules["bench_report"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def test_llamacpp_is_a_bench_method_without_options():
    assert "llamacpp" in BENCH_METHODS
    assert parse_method("llamacpp") == ("llamacpp", set())
    for bad in ("llamacpp:adaptive", "llamacpp:chain", "llama"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)


def test_missing_package_names_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(RuntimeError, match=r"llama-cpp-python.*setup\.sh dev"):
        LlamaCpp("any.gguf", n_ctx=64, threads=1)


def test_common_prefix_counts_leading_equal_tokens():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [5]) == 0 and common_prefix([7], [8]) == 0


@pytest.fixture
def two_piece_profile(tmp_path, monkeypatch):
    parts, blob = [], b""
    for i in range(2):
        data = os.urandom(3000 + i)
        (part := tmp_path / f"p{i}.bin").write_bytes(data)
        parts.append(part)
        blob += data
    profile = Profile(name="fake", description="test", pieces=(("a", "p0.bin"), ("b", "p1.bin")), install_hint="-",
                      sha256=hashlib.sha256(blob).hexdigest(), mask_token_id=0, fim=False)
    monkeypatch.setitem(PROFILES, "fake", profile)
    monkeypatch.setattr(models, "locate_pieces", lambda p: parts)
    monkeypatch.setenv("DOMINO_CACHE", str(tmp_path / "cache"))
    return profile, blob


def test_profile_gguf_joins_once_and_reuses_the_join(two_piece_profile, monkeypatch):
    _, blob = two_piece_profile
    path = profile_gguf("fake", progress=False)
    assert path.read_bytes() == blob and path.parent.name == "gguf"
    monkeypatch.setattr(models, "join_verified", lambda *a, **k: pytest.fail("joined again"))
    assert profile_gguf("fake", progress=False) == path
    assert sorted(p.name for p in path.parent.iterdir()) == [".fake.lock", "fake.gguf"]  # no partial join left


def test_profile_gguf_refuses_a_bad_join_and_leaves_nothing(two_piece_profile, monkeypatch, tmp_path):
    profile, _ = two_piece_profile
    monkeypatch.setitem(PROFILES, "fake", Profile(**{**profile.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        profile_gguf("fake", progress=False)
    assert not list((tmp_path / "cache" / "gguf").glob("*.gguf*"))
    with pytest.raises(ModelError, match="unknown model profile"):
        profile_gguf("nope")


def test_report_table_puts_llamacpp_beside_our_methods():
    def row(tps, tau, ids):
        return {"tokens_per_s": tps, "tau": tau, "output_ids": ids}

    def rep(prompts, llama_ids):
        return {"prompts": prompts, "num_prompts": 2, "max_new_tokens": 4, "target": "coder", "dtype": "bfloat16",
                "methods": {"ar": row(10.0, 1.0, [[1, 2], [3, 4]]), "domino+ngram:adaptive": row(30.0, 3.5, [[1, 2], [3, 4]]),
                            "llamacpp": row(20.0, 0.0, llama_ids)},
                "speedup": {"ar": 1.0, "domino+ngram:adaptive": 3.0, "llamacpp": 2.0},
                "ar_prefix": {"llamacpp": [common_prefix(a, b) for a, b in zip(llama_ids, [[1, 2], [3, 4]])]},
                "llamacpp": {"version": "0.3.36", "threads": 2}}
    lines = report.llamacpp_table([("llamacpp_code.json", rep("bench/heldout_code.jsonl", [[1, 2], [3, 9]])),
                                   ("llamacpp_short.json", rep("bench/short_code.jsonl", [[1, 2], [3, 4]]))])
    assert "llama-cpp-python 0.3.36, 2 threads" in lines[0]
    code, short = lines[-2], lines[-1]
    assert code.startswith("| `bench/heldout_code.jsonl`, 2 | 10.00 | `domino+ngram:adaptive` | 30.00 | 3.00x | 3.50 | 20.00")
    assert "| 0.50x | 1.50x | 1/2 (2 tokens) |" in code  # ar / llama.cpp, drafting / llama.cpp, identical outputs
    assert short.endswith("| 2/2 (2 tokens) |")


@pytest.mark.slow
def test_bench_cli_without_the_package_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):\n"}) + "\n")
    rc = cli.main(["bench", "--profile", "tiny", "--draft", "none", "--prompts", str(prompts),
                   "--methods", "ar,llamacpp", "--max-new-tokens", "4", "--dtype", "float32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: the bench method llamacpp needs the package llama-cpp-python")


@pytest.mark.slow
def test_bench_runs_llamacpp_on_the_tiny_profiles_gguf(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `bash setup.sh dev`")
    out = tmp_path / "r.json"
    rc = cli.main(["bench", "--profile", "tiny", "--draft", "none", "--prompts", str(ROOT / "bench/short_code.jsonl"),
                   "--limit", "2", "--methods", "ar,llamacpp", "--max-new-tokens", "16", "--threads", "2",
                   "--dtype", "float32", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert list(rep["methods"]) == ["ar", "llamacpp"] and rep["num_prompts"] == 2
    for m, r in rep["methods"].items():
        assert r["tokens_per_s"] > 0 and r["new_tokens"] > 0 and len(r["output_ids"]) == 2, m
    llama = rep["methods"]["llamacpp"]
    assert 0 < llama["prefill_s"] < llama["total_s"] and llama["prompt_tokens"] == rep["methods"]["ar"]["prompt_tokens"]
    assert rep["llamacpp"]["gguf"] == str(models.locate_pieces(PROFILES["tiny"])[0])
    assert rep["llamacpp"]["threads"] == 2 and rep["llamacpp"]["same_prompt_tokens"] == 2
    assert all(0 <= p <= 16 for p in rep["ar_prefix"]["llamacpp"])
