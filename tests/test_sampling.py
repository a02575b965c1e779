"""Sampling losslessness: speculative sampling reproduces the target's distribution."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from domino_backend.engine import Engine, GenerationRequest
from domino_backend.sampling import SamplingParams, probs_from_logits, verify_chain
from tiny import tiny_draft, tiny_target


def chi2_pvalue(counts: dict, probs: dict, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit, pooling cells whose expected count is small."""
    n = sum(counts.values())
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for key, p in probs.items():
        e = p * n
        if e < min_expected:
            pool_o, pool_e = pool_o + counts.get(key, 0), pool_e + e
        else:
            obs.append(counts.get(key, 0))
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    assert sum(obs) == n, "samples fell outside the support of the target distribution"
    if len(obs) < 2:  # a single bin has no degrees of freedom: nothing left to test
        return 1.0
    exp = [e * n / sum(exp) for e in exp]
    return chisquare(obs, exp).pvalue


def test_probs_from_logits_applies_top_k_and_top_p():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and p.sum().item() == pytest.approx(1.0)
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    full = torch.softmax(logits, -1)
    assert full[0] < 0.7 and (p[:2] > 0).all() and (p[2:] == 0).all()
    hot = probs_from_logits(logits, SamplingParams(temperature=5.0))
    assert hot.max() < full.max()


@pytest.mark.parametrize("draft_kind", ["distribution", "point_mass"])
@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_k=4), SamplingParams(1.3, top_p=0.9)])
def test_rejection_sampling_emits_target_distribution(draft_kind, params):
    g = torch.Generator().manual_seed(0)
    v, k, n = 6, 3, 12000
    target_logits = torch.randn(k + 1, v, generator=g) * 1.5
    draft_q = torch.softmax(torch.randn(k, v, generator=g) * 1.5, -1)
    p = probs_from_logits(target_logits, params)
    first, second = {}, {}
    accepted = 0
    for _ in range(n):
        if draft_kind == "distribution":
            d = torch.multinomial(draft_q, 1, generator=g)[:, 0]
            q = draft_q
        else:  # a deterministic drafter that guesses each position's likeliest token
            d, q = target_logits[:k].argmax(-1), None
        a, bonus = verify_chain(d, q, target_logits, params, g)
        emitted = d[:a].tolist() + [bonus]
        first[emitted[0]] = first.get(emitted[0], 0) + 1
        if len(emitted) > 1:
            second[emitted[1]] = second.get(emitted[1], 0) + 1
        accepted += a
    # Position j's next-token law here is p[j] whatever came before, so both margins must match.
    assert chi2_pvalue(first, dict(enumerate(p[0].tolist()))) > 1e-3
    assert chi2_pvalue(second, dict(enumerate(p[1].tolist()))) > 1e-3
    assert accepted > n // 10


def test_greedy_verification_accepts_matching_prefix_and_adds_bonus():
    logits = torch.full((4, 5), -1.0)
    for pos, tok in enumerate([2, 0, 4, 1]):
        logits[pos, tok] = 1.0
    greedy = SamplingParams(0.0)
    assert verify_chain(torch.tensor([2, 0, 4]), None, logits, greedy, None) == (3, 1)
    assert verify_chain(torch.tensor([2, 3, 4]), None, logits, greedy, None) == (1, 0)
    assert verify_chain(torch.tensor([1, 0, 4]), None, logits, greedy, None) == (0, 2)
    assert verify_chain(torch.empty(0, dtype=torch.long), None, logits[:1], greedy, None) == (0, 2)


def exact_joint(target, prompt, params, length):
    """P(t_1..t_length | prompt) by enumerating continuations with full forward passes."""
    v = target.vocab_size
    probs = {}
    for seq in itertools.product(range(v), repeat=length):
        probs[seq] = 1.0
    with torch.no_grad():
        for n in range(length):
            for prefix in itertools.product(range(v), repeat=n):
                ids = torch.tensor([prompt + list(prefix)])
                p = probs_from_logits(target.model(input_ids=ids).logits[0, -1], params)
                for seq in probs:
                    if seq[:n] == prefix:
                        probs[seq] *= p[seq[n]].item()
    return probs


@pytest.mark.parametrize("method", ["domino", "dflash", "ngram", "domino+ngram"])
def test_speculative_sampling_end_to_end_matches_target(method):
    # Vocabulary of 5 so the joint law of 3 tokens (125 cells) is checkable by enumeration.
    target = tiny_target("qwen3", vocab=5, peak=2.0, seed=3)
    engine = Engine(target, tiny_draft(target, seed=4, block_size=4))
    prompt = [1, 2, 1, 2, 1]
    params = SamplingParams(temperature=0.9)
    exact = exact_joint(target, prompt, params, 3)
    counts, drafted, n = {}, 0, 1500
    for i in range(n):
        # 6 tokens so the first round drafts a full block (the head runs); the first 3 are checked.
        gen = engine.generate(prompt, GenerationRequest(max_new_tokens=6, method=method, temperature=0.9, seed=i,
                                                                adaptive_drafts=False))
        key = tuple(gen.token_ids[:3])
        counts[key] = counts.get(key, 0) + 1
        drafted += gen.stats.drafted
    assert drafted > 3 * n  # full blocks were really proposed and verified
    assert chi2_pvalue(counts, exact) > 1e-3
