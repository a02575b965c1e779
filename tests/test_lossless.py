"""Greedy losslessness: every speculative method emits exactly the tokens of plain decoding."""

import pytest
import torch

import domino_backend.engine as engine_mod
from domino_backend.engine import Engine, GenerationRequest
from domino_backend.drafters import Proposer
from domino_backend.drafts import ChainDraft
from tiny import tiny_draft, tiny_target

PROMPTS = [[3, 5, 7, 9, 11], [1], [8, 8, 8, 8, 2, 8, 8], list(range(10, 40))]


def run(engine, prompt, method, n=40, **kw):
    kw.setdefault("adaptive_drafts", False)  # fixed drafts: every round exercises its draft
    return engine.generate(prompt, GenerationRequest(max_new_tokens=n, method=method, **kw))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("shift_label", [True, False])
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_block_drafting_matches_plain_greedy(family, shift_label, block_size):
    target = tiny_target(family, peak=3.0, seed=block_size)
    draft = tiny_draft(target, seed=1, shift_label=shift_label, block_size=block_size)
    engine = Engine(target, draft)
    for prompt in PROMPTS:
        ref = run(engine, prompt, "ar").token_ids
        assert len(ref) == 40
        for method in ("dflash", "domino", "ngram", "domino+ngram"):
            assert run(engine, prompt, method).token_ids == ref, (method, prompt)


@pytest.mark.parametrize("seed", range(4))
def test_small_vocab_drafts_get_accepted_and_output_stays_exact(seed):
    # vocab 12: random drafts hit often enough to exercise partial acceptance and rollback.
    target = tiny_target("qwen3", vocab=12, peak=4.0, seed=seed)
    engine = Engine(target, tiny_draft(target, seed=seed, block_size=6, pure_draft_prefix_len=2))
    prompt = [seed % 11, 3, 4]
    ref = run(engine, prompt, "ar", n=60).token_ids
    for method in ("dflash", "domino"):
        gen = run(engine, prompt, method, n=60)
        assert gen.token_ids == ref
        assert gen.stats.accepted > 0  # the acceptance path really ran
        assert gen.stats.tau > 1.0


def test_hybrid_drafts_by_lookup_after_a_repeat_and_by_the_drafter_otherwise(monkeypatch):
    from domino_backend.drafters import BlockProposer

    target = tiny_target("qwen3", peak=3.0, seed=2)
    engine = Engine(target, tiny_draft(target, seed=1))
    drafter_rounds = []
    block_propose = BlockProposer.propose
    monkeypatch.setattr(BlockProposer, "propose", lambda self, *a: drafter_rounds.append(a[2]) or block_propose(self, *a))
    prompt = [3, 5, 7, 9, 11, 13, 3, 5, 7, 9, 11, 13, 3, 5]  # a repeating pattern and a fresh tail
    ref = run(engine, prompt, "ar", n=60).token_ids
    gen = run(engine, prompt, "domino+ngram", n=60)
    assert gen.token_ids == ref
    # The first round continues "... 3 5" from the pattern by lookup; some later round has no match.
    assert 0 < len(drafter_rounds) < gen.stats.rounds
    assert all(k <= engine.draft.cfg.num_drafts for k in drafter_rounds)


class CorruptedOracle(Proposer):
    """Proposes the target's true greedy continuation with random corruptions: forces every
    accept length 0..K to occur, so rollback of both caches is exercised."""

    max_k = 7

    def __init__(self, truth, seed):
        self.truth, self.g = truth, torch.Generator().manual_seed(seed)

    def propose(self, anchor, pos, k, params, generator):
        start = pos + 1 - self.prompt_len
        d = torch.tensor(self.truth[start:start + k], dtype=torch.long)
        flip = torch.rand(d.shape, generator=self.g) < 0.25
        return ChainDraft(torch.where(flip, (d + 1) % 64, d))


def test_partial_acceptance_rolls_back_exactly(monkeypatch):
    target = tiny_target("qwen3", peak=2.0)
    engine = Engine(target)
    prompt = [4, 9, 1, 7]
    ref = run(engine, prompt, "ar", n=80).token_ids
    oracle = CorruptedOracle(ref + [0] * 16, seed=0)
    oracle.prompt_len = len(prompt)
    monkeypatch.setattr(engine_mod, "make_proposer", lambda *a: oracle)
    gen = run(engine, prompt, "oracle", n=80)
    assert gen.token_ids == ref
    hist = gen.stats.accept_hist
    assert sum(1 for c in hist if c) >= 4  # several distinct accept lengths occurred
    assert gen.stats.tau > 2.0


def test_stats_account_for_every_token():
    target = tiny_target("qwen3", peak=3.0)
    engine = Engine(target, tiny_draft(target))
    gen = run(engine, [5, 6, 7], "ngram", n=50)
    s = gen.stats
    # prefill makes 1 token, each round a+1 (the last round may be cut by the budget).
    assert s.accepted + s.rounds + 1 >= s.new_tokens == 50
    assert sum(s.accept_hist) == s.rounds
    assert s.pos_tried[0] >= s.pos_accepted[0]
    assert all(0.0 <= p <= 1.0 for p in s.per_position_acceptance)
    assert s.tau == pytest.approx((s.accepted + s.rounds) / s.rounds)


def test_max_tokens_and_context_limit_are_respected():
    target = tiny_target("qwen3", peak=3.0)
    engine = Engine(target, tiny_draft(target))
    for n in (1, 2, 7, 33):
        gen = run(engine, [1, 2, 3], "domino", n=n)
        assert len(gen.token_ids) == n and gen.finish_reason == "length"
    long_prompt = list(range(1, 60)) * 5
    gen = run(engine, long_prompt[:250], "domino", n=100)
    assert len(gen.token_ids) == 6 and gen.finish_reason == "length"


def test_bad_requests_raise_clear_errors():
    target = tiny_target("qwen3")
    engine = Engine(target, tiny_draft(target))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.stream([], GenerationRequest())
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.stream([1], GenerationRequest(max_new_tokens=0))
    with pytest.raises(ValueError, match="context limit"):
        engine.stream([1] * 300, GenerationRequest())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.stream([1, 999], GenerationRequest())
    with pytest.raises(ValueError, match="unknown method"):
        engine.stream([1], GenerationRequest(method="medusa"))  # rejected before any work starts
    with pytest.raises(ValueError, match="stop strings"):
        engine.stream([1], GenerationRequest(stop=["x" * 257]))
    with pytest.raises(ValueError, match="stop strings"):
        engine.stream([1], GenerationRequest(stop=["s"] * 17))
    with pytest.raises(ValueError, match="temperature"):
        run(engine, [1], "ar", temperature=-1.0)
    with pytest.raises(ValueError, match="needs a drafter"):
        run(Engine(target), [1], "domino")
    plain = tiny_draft(target, projector_type=None)
    with pytest.raises(ValueError, match="Domino head"):
        run(Engine(target, plain), [1], "domino")
    assert run(Engine(target, plain), [1, 2], "dflash", n=10).token_ids == run(engine, [1, 2], "ar", n=10).token_ids


def test_mismatched_drafter_is_rejected():
    from domino_backend.config import CheckpointError

    target = tiny_target("qwen3", vocab=64)
    other = tiny_target("qwen3", vocab=80)
    with pytest.raises(CheckpointError, match="vocab"):
        Engine(target, tiny_draft(other))


@pytest.mark.parametrize("shift_label", [True, False])
def test_reduced_draft_vocabulary_stays_lossless_and_drafts_only_its_tokens(shift_label):
    target = tiny_target("qwen3", vocab=16, peak=4.0, seed=7)
    draft = tiny_draft(target, seed=2, block_size=6, draft_vocab_size=10, shift_label=shift_label)
    allowed = set(draft.draft_token_ids().tolist())
    engine = Engine(target, draft)
    seen = set()
    proposer_cls = engine_mod.make_proposer

    def spy(*a):
        prop = proposer_cls(*a)
        inner = prop.propose

        def propose(*args):
            draft = inner(*args)
            seen.update(draft.tokens.tolist())  # greedy: trees, sampling: chains
            q = getattr(draft, "q", None)
            if q is not None:  # the verifier sees q over the full vocabulary, zero outside the draft vocab
                outside = [t for t in range(16) if t not in allowed]
                assert q.shape[-1] == 16 and float(q[:, outside].sum()) == 0.0
            return draft

        prop.propose = propose
        return prop

    engine_mod.make_proposer, saved = spy, engine_mod.make_proposer
    try:
        for prompt in PROMPTS[:3]:
            ref = run(engine, prompt, "ar").token_ids
            assert run(engine, prompt, "domino").token_ids == ref
            run(engine, prompt, "domino", temperature=0.8, seed=3)
    finally:
        engine_mod.make_proposer = saved
    assert seen and seen <= allowed


def test_draft_cap_limits_each_round_and_stays_lossless():
    target = tiny_target("qwen3", vocab=12, peak=4.0, seed=1)
    engine = Engine(target, tiny_draft(target, seed=1, block_size=8))
    ref = run(engine, [1, 2, 3], "ar", n=50).token_ids
    for cap in (0, 1, 3, 7):
        gen = run(engine, [1, 2, 3], "domino", n=50, max_drafts=cap)
        assert gen.token_ids == ref
        assert len(gen.stats.pos_tried) <= cap
    with pytest.raises(ValueError, match="max_drafts"):
        run(engine, [1], "domino", max_drafts=-1)
