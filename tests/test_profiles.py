"""Integration: the embedded default models load offline and decode losslessly with every method."""

import json
import subprocess
import sys

import pytest
import torch

from domino_backend.engine import GenerationRequest
from domino_backend.loader import build_engine
from domino_backend.prompts import encode

pytestmark = pytest.mark.slow


@pytest.fixture
def real_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("profile", ["tiny", "coder"])
def test_profile_generates_losslessly_with_every_method(profile, real_threads):
    # fp32: batched verification and one-token steps then agree bit for bit on argmax.
    engine = build_engine(profile, dtype="float32")
    tok = engine.target.tokenizer
    prompts = [encode(tok, prompt="Name three colours.", chat=True)]
    if profile == "coder":
        prompts.append(encode(tok, prefix="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))\n"))
    for ids in prompts:
        ref = engine.generate(ids, GenerationRequest(max_new_tokens=12, method="ar"))
        assert ref.token_ids and ref.text.strip()
        for method in ("ngram", "dflash", "domino", "domino+ngram"):
            gen = engine.generate(ids, GenerationRequest(max_new_tokens=12, method=method))
            assert gen.token_ids == ref.token_ids, method
            assert gen.stats.rounds >= 1


def test_bench_cli_reports_every_method(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "The capital of France is"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Say hi."}]}) + "\n"
        + json.dumps({"prefix": "def f(x):\n", "suffix": "\n"}) + "\n"
    )
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "domino_backend", "bench", "--profile", "tiny", "--prompts", str(prompts),
         "--methods", "ar,ngram,dflash,domino,hf", "--max-new-tokens", "8", "--dtype", "float32", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"ar", "ngram", "dflash", "domino", "hf"}
    for m, r in report["methods"].items():
        assert r["tokens_per_s"] > 0 and len(r["outputs"]) == 3
        assert report["lossless"][m] is True, m
    assert report["speedup"]["ar"] == 1.0
    assert "speedup" in proc.stdout and "domino" in proc.stdout


def test_generate_cli_streams_text_and_stats():
    proc = subprocess.run(
        [sys.executable, "-m", "domino_backend", "generate", "--profile", "tiny", "--prompt", "Hello",
         "--chat", "--max-new-tokens", "6", "--method", "domino", "--temperature", "0.8", "--seed", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    assert "tau=" in proc.stderr and "per-position acceptance" in proc.stderr


def test_cli_reports_bad_input_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "domino_backend", "generate", "--profile", "tiny", "--prompt", "x",
         "--max-new-tokens", "0"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2
    assert "error: max_new_tokens must be positive" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fim_prompt_uses_control_tokens_and_code_cannot_inject_them():
    from domino_backend.models import load_target
    from domino_backend.prompts import build_fim

    _, tok = load_target("coder")
    ids = encode(tok, prefix='s = "<|fim_middle|>"\n', suffix="\nprint(s)\n")
    middle = tok.convert_tokens_to_ids("<|fim_middle|>")
    assert ids[0] == tok.convert_tokens_to_ids("<|fim_prefix|>") and ids[-1] == middle
    assert ids.count(middle) == 1  # the literal inside the user's code stayed text
    class F:  # a context file, as an IDE sends it
        filename, text = "util.py", "def helper():\n    return 1\n"
    repo = build_fim(tok, "x = ", "", files=[F()], filename="main.py")
    assert repo[0] == tok.convert_tokens_to_ids("<|repo_name|>") and "util.py" in tok.decode(repo)
