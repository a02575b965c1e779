"""Streaming text, stop strings and cancellation."""

import dataclasses
import threading

from domino_backend.engine import Engine, GenerationRequest
from tiny import CharTokenizer, tiny_draft, tiny_target


def engine_with_text():
    target = tiny_target("qwen3", peak=1.5, seed=11)
    target.tokenizer = CharTokenizer()
    return Engine(target, tiny_draft(target))


def test_streamed_deltas_concatenate_to_the_final_text():
    engine = engine_with_text()
    for method in ("ar", "domino", "ngram"):
        gen = engine.stream([1, 2, 3], GenerationRequest(max_new_tokens=50, method=method))
        deltas = list(gen)
        assert len(deltas) > 1
        assert "".join(deltas) == gen.text == CharTokenizer().decode(gen.token_ids)


def test_stop_string_truncates_and_is_never_streamed():
    engine = engine_with_text()
    full = engine.generate([1, 2, 3], GenerationRequest(max_new_tokens=60, method="ar")).text
    stop = full[20:23]
    cut = full.find(stop)
    for method in ("ar", "domino"):
        gen = engine.stream([1, 2, 3], GenerationRequest(max_new_tokens=60, method=method, stop=["zzzz-none", stop]))
        streamed = "".join(gen)
        assert gen.finish_reason == "stop"
        assert streamed == gen.text == full[:cut]
        assert stop not in streamed


def test_cancel_from_another_thread_stops_between_rounds():
    engine = engine_with_text()
    gen = engine.stream([1, 2, 3], GenerationRequest(max_new_tokens=200, method="domino"))
    it = iter(gen)
    first = next(it)  # the request is running
    t = threading.Thread(target=gen.cancel)
    t.start()
    t.join()
    rest = list(it)
    assert gen.finish_reason == "cancelled"
    assert len(gen.token_ids) < 200
    assert first + "".join(rest) == gen.text


def test_generation_can_only_be_iterated_once():
    engine = engine_with_text()
    gen = engine.generate([1, 2], GenerationRequest(max_new_tokens=5, method="ar"))
    try:
        list(gen)
    except RuntimeError as e:
        assert "once" in str(e)
    else:
        raise AssertionError("second iteration should fail")


def test_long_prompt_prefills_in_chunks_and_can_be_cancelled_mid_prefill():
    engine = engine_with_text()
    engine.prefix_cache = None  # every request prefills the whole prompt
    prompt = [(7 * i) % 60 for i in range(150)]
    ref = engine.generate(prompt, GenerationRequest(max_new_tokens=30, method="domino")).token_ids
    engine.settings = dataclasses.replace(engine.settings, prefill_chunk=32)  # 5 chunks
    for method in ("ar", "domino", "ngram"):
        assert engine.generate(prompt, GenerationRequest(max_new_tokens=30, method=method)).token_ids == ref
    gen = engine.stream(prompt, GenerationRequest(max_new_tokens=30, method="domino"))
    it = iter(gen)
    assert next(it) == ""  # first chunk done, nothing generated yet
    gen.cancel()
    assert list(it) == []
    assert gen.finish_reason == "cancelled" and gen.token_ids == [] and gen.stats.rounds == 0


def test_cancel_before_start_runs_no_prefill():
    engine = engine_with_text()
    gen = engine.stream([1, 2, 3], GenerationRequest(max_new_tokens=10, method="domino"))
    gen.cancel()
    assert list(gen) == [] and gen.finish_reason == "cancelled" and gen.stats.prefill_s == 0.0


def test_prefix_reuse_across_requests_changes_nothing_but_the_prefill():
    fresh, cached = engine_with_text(), engine_with_text()
    fresh.prefix_cache = None
    base = [(5 * i + 3) % 60 for i in range(80)]
    # Keystrokes: each prompt extends the previous one; then an edit in the middle.
    prompts = [base, base + [7], base + [7, 9, 11], base[:50] + [1, 2, 3] + base[53:]]
    for method in ("domino", "ar", "ngram", "dflash"):
        for p in prompts:
            want = fresh.generate(p, GenerationRequest(max_new_tokens=20, method=method)).token_ids
            got = cached.generate(p, GenerationRequest(max_new_tokens=20, method=method))
            assert got.token_ids == want, (method, len(p))
    # The domino pass stored snapshots with drafter features; later prompts reuse all but their tail.
    # A block's rows restore only where the block ends at the same place in both prompts (here
    # 32-token blocks, prompts ending inside the third), so the rest prefills as in a fresh prompt.
    g = cached.generate(base + [7, 9, 11, 13], GenerationRequest(max_new_tokens=5, method="domino"))
    assert g.stats.reused_tokens == 64  # of len(base) + 3 = 83 shared: the prompts end at 83 and 84
    g = cached.generate(base[:50] + [1, 2, 3] + base[53:], GenerationRequest(max_new_tokens=5, method="ar"))
    assert g.stats.reused_tokens == 79  # the very same prompt: all but the last token


def test_snapshots_without_drafter_features_are_not_used_by_block_drafting():
    engine = engine_with_text()
    p = [(3 * i) % 60 for i in range(40)]
    engine.generate(p, GenerationRequest(max_new_tokens=4, method="ar"))
    assert engine.generate(p + [5], GenerationRequest(max_new_tokens=4, method="ngram")).stats.reused_tokens == 32
    assert engine.generate(p + [5], GenerationRequest(max_new_tokens=4, method="domino")).stats.reused_tokens == 0
