"""Draft trees: the grown tree is the top-N branches by path probability under the Domino head
(checked against brute force over every branch, scored by the training-time head), greedy tree
verification keeps the branch plain decoding would produce, and tree decoding stays lossless."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from domino_backend.engine import Engine, GenerationRequest
from domino_backend.head import rollout, teacher_forced_logits
from domino_backend.sampling import SamplingParams
from domino_backend.settings import EngineSettings, TreeConfig
from domino_backend.tree import DraftTree, grow, verify_tree
from tiny import head_test_draft, tiny_draft, tiny_target

H, V, K = 16, 7, 3  # hidden, vocabulary, depth: V ** K = 343 branches to enumerate


def _block(seed: int, prefix: int = 1):
    model = head_test_draft(V, K, 6, 5, 1, [1, 2], shift_label=True, prefix=prefix, seed=seed)
    torch.manual_seed(100 + seed)
    embed = nn.Embedding(V, H).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    return model, embed, torch.randn(K, H, generator=g), torch.randn(K, V, generator=g), seed % V


def _branches(tree: DraftTree) -> set[tuple[int, ...]]:
    paths = {0: ()}
    for i, (p, t) in enumerate(zip(tree.parents, tree.tokens.tolist()), start=1):
        assert p in paths, "a parent must come before its children"
        paths[i] = paths[p] + (t,)
    return set(paths.values()) - {()}


def _brute_force_top(model, embed, z, base, anchor, n: int) -> list[tuple[float, tuple[int, ...]]]:
    """Every branch of depth 1..K scored by the teacher-forced (training) head: log prob of the
    branch = sum of log-softmax of the final logits along it."""
    scored = {}
    for full in itertools.product(range(V), repeat=K):
        logits = teacher_forced_logits(model, z[None], base[None], torch.tensor([anchor]), torch.tensor([full]), embed)
        lp = torch.log_softmax(logits[0].float(), -1)
        for d in range(1, K + 1):
            scored[full[:d]] = sum(float(lp[j, full[j]]) for j in range(d))
    return sorted(((s, b) for b, s in scored.items()), key=lambda x: (-x[0], len(x[1])))[:n]


@pytest.mark.parametrize("seed,prefix", [(0, 1), (1, 1), (2, 2)])
@pytest.mark.parametrize("nodes", [1, 4, 9])
def test_grown_tree_is_the_top_branches_by_path_probability(seed, prefix, nodes):
    model, embed, z, base, anchor = _block(seed, prefix)
    with torch.no_grad():
        tree = grow(model, z, base, anchor, embed, nodes=nodes, beam=nodes)  # beam >= nodes: exact
    want = _brute_force_top(model, embed, z, base, anchor, nodes)
    assert len(tree.tokens) == nodes
    # Equal-probability branches could swap places at the cut; random logits make that unlikely.
    assert _branches(tree) == {b for _, b in want}
    assert tree.depth == max(len(b) for _, b in want)


def test_a_tree_holds_the_chains_first_draft_and_a_one_node_tree_is_the_chain():
    model, embed, z, base, anchor = _block(3)
    with torch.no_grad():
        chain, _ = rollout(model, z[None], base[None], torch.tensor([anchor]), embed, SamplingParams())
        one = grow(model, z[:1], base[:1], anchor, embed, nodes=1, beam=4)
        wide = grow(model, z, base, anchor, embed, nodes=6, beam=2)
    assert one.tokens.tolist() == chain[0, :1].tolist() and one.parents == [0]
    assert (int(chain[0, 0]),) in _branches(wide) and len(wide.tokens) == 6


def test_greedy_tree_verification_follows_the_targets_argmax_down_the_tree():
    #           root(0)
    #       5(1)      3(2)
    #     2(3) 4(4)     6(5)
    tree = DraftTree(torch.tensor([5, 3, 2, 4, 6]), [0, 0, 1, 1, 2])
    logits = torch.full((6, 8), -1.0)
    for row, best in {0: 5, 1: 4, 4: 7, 2: 6, 3: 0, 5: 1}.items():
        logits[row, best] = 1.0
    assert verify_tree(tree, logits) == ([0, 1, 4], 7)  # 5 then 4 accepted, bonus 7 after row 4
    logits[0] = -1.0
    logits[0, 3] = 1.0
    assert verify_tree(tree, logits) == ([0, 2, 5], 1)  # the second branch
    logits[0] = -1.0
    logits[0, 1] = 1.0
    assert verify_tree(tree, logits) == ([0], 1)  # nothing accepted: the bonus is the root's argmax


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("width", [1.0, 2.5])
@pytest.mark.parametrize("method", ["domino", "domino+ngram"])
def test_tree_decoding_equals_plain_greedy_decoding(family, width, method):
    target = tiny_target(family, vocab=48, peak=3.0, seed=11)
    engine = Engine(target, tiny_draft(target, seed=3, block_size=6), EngineSettings(tree=TreeConfig(width=width)))
    prompt = torch.randint(0, 48, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    plain = engine.generate(prompt, GenerationRequest(max_new_tokens=40, method="ar")).token_ids
    for adaptive in (False, True):
        gen = engine.generate(prompt, GenerationRequest(max_new_tokens=40, method=method, adaptive_drafts=adaptive))
        assert gen.token_ids == plain
        assert adaptive or gen.stats.drafted > 0
    chain = engine.generate(prompt, GenerationRequest(max_new_tokens=40, method=method, draft_tree=False))
    assert chain.token_ids == plain


def test_sampling_drafts_chains_only():
    target = tiny_target("qwen3", vocab=48, seed=11)
    engine = Engine(target, tiny_draft(target, seed=3, block_size=6))
    greedy = engine.stream([1, 2, 3], GenerationRequest(method="domino"))._rounds.proposer
    sampled = engine.stream([1, 2, 3], GenerationRequest(method="domino", temperature=0.7))._rounds.proposer
    assert greedy.tree == TreeConfig() and sampled.tree is None
