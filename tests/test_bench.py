"""The benchmark compares methods fairly: same prompts, same costs paid."""

import pytest

from domino_backend.bench import parse_method, run_one
from domino_backend.engine import Engine, GenerationRequest
from tiny import tiny_draft, tiny_target


def test_every_benchmarked_method_pays_its_own_prefill():
    target = tiny_target("qwen3", vocab=12, peak=4.0, seed=1)
    engine = Engine(target, tiny_draft(target, seed=1))
    prompt = list(range(1, 11)) * 4  # 40 tokens: long enough for the engine's prefix cache
    for method in ("ar", "domino", "domino+ngram:adaptive", "ngram", "dflash"):
        _, stats = run_one(engine, prompt, method, 8)
        assert stats.reused_tokens == 0, method  # no snapshot handed over from the method before
        assert stats.prefill_s > 0
    # Serving keeps the cache: the same prompt again reuses the last snapshot.
    gen = engine.generate(prompt, GenerationRequest(max_new_tokens=8, method="dflash"))
    assert gen.stats.reused_tokens == 39  # all but the last token (its block ends with the prompt in both)


def test_method_options_reach_the_request_and_bad_specs_are_refused():
    assert parse_method("domino:chain:adaptive") == ("domino", {"chain", "adaptive"})
    assert parse_method("domino+ngram") == ("domino+ngram", set())
    for bad in ("domino:fast", "ar:adaptive", "hf:chain", "nope"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)
    target = tiny_target("qwen3", vocab=12, peak=4.0, seed=1)
    engine = Engine(target, tiny_draft(target, seed=1))
    prompt = list(range(1, 11))
    run_one(engine, prompt, "domino:chain:adaptive", 12)
    run_one(engine, prompt, "domino:adaptive", 12)
    assert set(engine.draft_length) == {"domino", "domino/tree"}  # one policy per draft shape
