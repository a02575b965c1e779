"""Cost-aware draft length: picks what measured acceptance and verify cost favour, probes the full
block now and then, and never changes the output (any draft length is lossless)."""

import random

import pytest

from domino_backend.draft_length import AdaptiveDraftLength, DraftGate
from domino_backend.engine import Engine, GenerationRequest
from tiny import tiny_draft, tiny_target


def simulate(accept, alpha: float, beta: float, draft_s, rounds: int = 300, cap: int = 7) -> list[int]:
    """Drive the policy with a drafter whose drafts are each accepted with probability `accept`
    (or `accept(round)`), that takes `draft_s` (or `draft_s(round)`) seconds, and a verifier
    costing alpha + beta*K seconds. Returns the chosen K per round."""
    rng = random.Random(0)
    p = AdaptiveDraftLength(max_k=cap)
    chosen = []
    for r in range(rounds):
        k = p.choose(cap)
        a = 0
        while a < k and rng.random() < (accept(r) if callable(accept) else accept):
            a += 1
        p.update(k, a, draft_s(r) if callable(draft_s) else draft_s, alpha + beta * k)
        chosen.append(k)
    return chosen


def test_expected_tokens_is_the_sum_of_prefix_acceptance_products():
    p = AdaptiveDraftLength(max_k=3, prior_weight=1e-9)  # no prior: the raw ratios
    p.tried, p.accepted = [10.0, 5.0, 4.0], [5.0, 4.0, 1.0]  # a = 0.5, 0.8, 0.25
    assert p.acceptance() == pytest.approx([0.5, 0.8, 0.25])
    assert p.expected_tokens(0) == 1.0
    assert p.expected_tokens(3) == pytest.approx(1 + 0.5 + 0.4 + 0.1)


def test_weak_drafter_on_costly_verification_falls_back_to_plain_decoding():
    chosen = simulate(accept=0.15, alpha=1.0, beta=0.3, draft_s=0.1)
    late = chosen[100:]
    assert late.count(0) > 0.95 * len(late)
    # Failed probes back off (8, 16, 32, then every 64 rounds) but never stop.
    probes = [i for i, k in enumerate(chosen) if k == 7]
    assert 1 <= sum(i >= 100 for i in probes) <= 4
    assert all(b - a <= 64 for a, b in zip(probes, probes[1:]))


def test_probes_notice_when_drafting_starts_to_pay():
    # Prose (drafts rejected) for 300 rounds, then boilerplate the drafter gets right.
    chosen = simulate(accept=lambda r: 0.1 if r < 300 else 0.95, alpha=1.0, beta=0.05, draft_s=0.05, rounds=500)
    assert chosen[280:300].count(0) >= 18
    assert sum(k == 7 for k in chosen[400:]) > 0.9 * 100  # found within one probe interval, and kept


def test_strong_drafter_on_cheap_verification_drafts_the_whole_block():
    chosen = simulate(accept=0.9, alpha=1.0, beta=0.01, draft_s=0.05)
    assert sum(k == 7 for k in chosen[50:]) > 0.9 * len(chosen[50:])


def test_a_slow_first_draft_does_not_stop_drafting():
    # The process's first draft pays kernel set-up (measured ~9x a later draft); drafting still pays.
    chosen = simulate(accept=0.5, alpha=1.0, beta=0.02, draft_s=lambda r: 1.5 if r == 0 else 0.15)
    assert sum(k > 0 for k in chosen[20:]) > 0.9 * len(chosen[20:])


def test_middling_case_picks_a_short_block():
    chosen = simulate(accept=0.6, alpha=1.0, beta=0.25, draft_s=0.05)
    late = chosen[100:]
    typical = max(set(late), key=late.count)
    assert 1 <= typical <= 4  # argmax of E[tokens]/cost for these numbers is K=2


def test_cap_and_budget_are_respected():
    p = AdaptiveDraftLength(max_k=7)
    assert p.choose(0) == 0
    for _ in range(20):
        k = p.choose(3)
        assert 0 <= k <= 3
        p.update(k, min(k, 1), 0.01, 1.0 + 0.1 * k)


def test_adaptive_engine_is_lossless_and_shortens_rounds_for_a_useless_drafter():
    target = tiny_target("qwen3", vocab=12, peak=4.0, seed=1)
    engine = Engine(target, tiny_draft(target, seed=1, block_size=8))
    # Seed the engine's policy as if verification were steep and drafts never accepted.
    p = engine.draft_length["domino/tree"] = AdaptiveDraftLength(max_k=engine.draft.cfg.num_drafts)
    for k in (0, 7) * 10:
        p.update(k, 0, 0.01, 1.0 + 0.5 * k)
    for prompt in ([1, 2, 3], [5], list(range(11))):
        ref = engine.generate(prompt, GenerationRequest(max_new_tokens=50, method="ar")).token_ids
        gen = engine.generate(prompt, GenerationRequest(max_new_tokens=50, method="domino", adaptive_drafts=True))
        assert gen.token_ids == ref
        assert gen.stats.drafted < gen.stats.rounds * 7  # not every round verified the full block
    ref = engine.generate([1, 2, 3], GenerationRequest(max_new_tokens=50, method="ar")).token_ids
    for method in ("dflash", "ngram"):  # a fresh policy per method, learning from real timings
        gen = engine.generate([1, 2, 3], GenerationRequest(max_new_tokens=50, method=method, adaptive_drafts=True))
        assert gen.token_ids == ref
        assert engine.draft_length[method].rounds > 0
    # domino+ngram keeps one policy per source: lookup rounds draft free and long, drafter rounds not.
    gen = engine.generate([1, 2, 3], GenerationRequest(max_new_tokens=50, method="domino+ngram", adaptive_drafts=True))
    assert gen.token_ids == ref
    lookup, drafter = engine.draft_length["domino+ngram/lookup"], engine.draft_length["domino+ngram/drafter/tree"]
    assert lookup.rounds > 0 and drafter.rounds > 0
    assert lookup.rounds + drafter.rounds == gen.stats.rounds
    assert (lookup.max_k, drafter.max_k) == (engine.settings.ngram.num_draft, engine.draft.cfg.num_drafts)
    assert "domino+ngram" not in engine.draft_length


def test_unseen_deep_positions_inherit_the_previous_positions_estimate():
    p = AdaptiveDraftLength(max_k=4)
    for _ in range(30):  # draft 1 rejected every time: nothing is ever learnt about drafts 2-4
        p.update(4, 0, 0.01, 1.0)
    a = p.acceptance()
    assert a[0] < 0.05 and a[1] == pytest.approx(a[0]) and a[3] == pytest.approx(a[0])


def test_a_cost_jump_after_plain_decoding_is_learnt_not_averaged_away():
    # Measured on the 2-core CPU: 1 token 0.13 s, 3-9 tokens 0.31-0.36 s.
    p = AdaptiveDraftLength(max_k=8)
    for k, t in ((0, 0.13), (8, 0.34)):
        p.update(k, 0, 0.03, t)
    assert p.verify_seconds(0) == pytest.approx(0.13) and p.verify_seconds(4) == pytest.approx(0.235)
    p.update(2, 0, 0.03, 0.36)  # trying K = 2 reveals the jump; interpolation now prices K = 1..7 high
    assert p.verify_seconds(1) == pytest.approx(0.245) and p.verify_seconds(5) == pytest.approx(0.35)


def test_verify_cost_learned_in_shared_forwards_does_not_price_a_round_alone():
    """A burst of batched rounds (each paying a small share of a big forward) must not make a
    request that then runs alone draft as if its verifies were that cheap."""
    p = AdaptiveDraftLength(max_k=7, probe_every=10**6, max_probe_every=10**6)
    rng = random.Random(1)
    for _ in range(200):  # shared forwards: verify rows nearly free, so long drafts win
        k = p.choose(7, context=1)
        a = 0
        while a < k and rng.random() < 0.6:
            a += 1
        p.update(k, a, 0.005, 0.05 + 0.001 * k, context=1)
    shared_k = p.choose(7, context=1)
    assert shared_k >= 4
    for _ in range(3):  # alone: verify time steep in K, as measured on a 2-core CPU
        k = p.choose(7, context=0)
        p.update(k, 0, 0.005, 1.0 + 0.5 * k, context=0)
    assert p.verify_seconds(0, context=0) == pytest.approx(1.0) and p.verify_seconds(0, context=1) < 0.1
    assert p.choose(7, context=0) < 3  # at that price only a short draft pays (acceptance is shared)


def drive_gate(gate: DraftGate, n: int, rate: dict[bool, float], steps: int) -> list[bool]:
    """Steps with n decoding requests whose committed tokens per second are rate[arm]."""
    chosen = []
    for _ in range(steps):
        arm = gate.choose(n)
        gate.update(n, arm, tokens=round(rate[arm] * 0.1), seconds=0.1)
        chosen.append(arm)
    return chosen


def test_the_draft_gate_turns_drafts_off_where_whole_steps_go_faster_without_them():
    gate = DraftGate(explore_every=16)
    chosen = drive_gate(gate, 16, {True: 440.0, False: 700.0}, 200)
    assert chosen[:6] == [True] * 3 + [False] * 3  # both arms measured first
    late = chosen[6:]
    assert late.count(True) == len(late) // 16  # only the exploring steps draft
    # Another batch size learns on its own: there drafting pays.
    chosen = drive_gate(gate, 3, {True: 300.0, False: 200.0}, 100)
    assert chosen[6:].count(False) == 94 // 16
    assert gate.rate(16, False) == pytest.approx(700.0) and gate.rate(4, True) == pytest.approx(300.0)


def test_the_draft_gate_follows_a_change_in_which_arm_is_faster():
    gate = DraftGate()
    drive_gate(gate, 8, {True: 100.0, False: 200.0}, 100)
    chosen = drive_gate(gate, 8, {True: 300.0, False: 200.0}, 100)  # e.g. the clients start copying code
    assert chosen[-32:].count(False) == 2  # drafting again, but for the exploring steps


def test_the_draft_gate_leaves_a_request_alone_to_its_own_policy():
    gate = DraftGate()
    drive_gate(gate, 1, {True: 1.0, False: 1000.0}, 50)
    assert gate.choose(1) and gate.arms == {}


def test_gated_steps_verify_no_drafts_and_the_batch_stays_exact():
    """With the gate set against drafting, requests sharing forwards decode plainly (no drafted
    rows, the per-request policy untouched) and each still equals its own plain decoding."""
    target = tiny_target("qwen3", vocab=12, peak=4.0, seed=1)
    engine = Engine(target, tiny_draft(target, seed=1, block_size=8))
    gate = engine.draft_gate
    gate.arms = {b: {True: [1.0, 10.0, 9], False: [100.0, 1.0, 9]} for b in range(1, 6)}
    gate.explore_every = 10**6
    prompts, budgets = ([1, 2, 3], [5], list(range(11))), (30, 30, 60)
    refs = [engine.generate(p, GenerationRequest(max_new_tokens=n, method="ar")).token_ids
            for p, n in zip(prompts, budgets)]
    gens = [engine.stream(p, GenerationRequest(max_new_tokens=n, method="domino")) for p, n in zip(prompts, budgets)]
    while not all(g.finish_reason for g in gens):
        engine.step(gens)
    assert [g.token_ids for g in gens] == refs
    # Sharing forwards, nothing drafted and the policy saw none of those rounds; the last request,
    # alone for its last 30 tokens, is left to its policy, which drafts.
    assert gens[0].stats.drafted == gens[1].stats.drafted == 0
    assert gens[2].stats.drafted > 0 and engine.draft_length["domino/tree"].rounds < gens[2].stats.rounds - 20
    assert gate.arms[gate.bucket(3)][False][2] > 9  # its steps without prefill were measured
