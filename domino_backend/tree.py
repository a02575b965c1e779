"""Draft trees for greedy decoding: the Domino head grown along several branches, verified in one
target pass, the longest branch the target agrees with kept.

The drafter's block pass is parallel, so its base logits at depth j are the same on every branch;
only the head's GRU state differs (it has consumed that branch's tokens). A chain commits the
head's top token at each depth and loses the round at the first miss; a tree keeps the runners-up,
which often hold the target's token where the top one misses (`python bench/tree_replay.py`).
Which nodes: the N with the highest path probability (the product of the head's softmax along
the branch, as EAGLE-2 ranks its candidates), grown depth by depth from the `beam` most probable
nodes of each depth; a child never outranks its parent, so the set is a tree.

Sampling keeps the chain: lossless tree sampling needs multi-draft rejection sampling (not here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .draft_model import DraftModel
from .drafts import Draft
from .sampling import SamplingParams


@dataclass
class DraftTree(Draft):
    """tokens [N] target ids, parents before children; parents[i]: node i's parent row (0 = the
    anchor, j = tokens[j - 1]). Greedy only."""

    k: int = 0  # the K it was grown for (its depth bound): the round is priced as K drafts

    @property
    def depths(self) -> list[int]:
        """Depth of each row, the anchor's (0) first."""
        depths = [0]
        for p in self.parents:
            depths.append(depths[p] + 1)
        return depths

    @property
    def depth(self) -> int:
        return max(self.depths)

    @property
    def priced_k(self) -> int:
        return self.k or self.tokens.shape[0]

    def verify(self, logits: torch.Tensor, params: SamplingParams, rng) -> tuple[list[int], int]:
        return verify_tree(self, logits)

    def commit(self, session, pos: int, rows: list[int]) -> None:
        session.keep_path(pos, rows)


def grow(model: DraftModel, z: torch.Tensor, base: torch.Tensor, anchor: int, embed: torch.nn.Module,
         nodes: int, beam: int) -> DraftTree:
    """A tree of at most `nodes` drafts, depth <= K, for one block of a drafter with a Domino head.

    z [K, H] slot hiddens, base [K, V_draft] base logits (draft slots only). Depth j < P
    (`pure_draft_prefix_len`) ranks base logits alone, as the chain rollout does; from P on, each
    node's children use base_j + head_delta(z_j, state), the state having consumed the anchor and
    the node's branch (the rollout's invariant, branch by branch).
    """
    k, p = base.shape[0], model.cfg.pure_draft_prefix_len
    beam = min(beam, nodes)
    dev = base.device
    # Candidates of all depths, each (depth, path log prob, draft idx, parent candidate or -1).
    cands: list[tuple[int, float, int, int]] = []
    front: list[int] = []  # candidate indices of the nodes expanded at the last depth
    h = model.head_gru_step(embed(torch.tensor([anchor], device=dev)),
                            z.new_zeros(1, model.cfg.gru_hidden_dim, dtype=model.prefix_gru.weight_hh_l0.dtype))
    front_lp = torch.zeros(1, device=dev)  # [F] their path log probs
    for j in range(k):
        logits = base[j].float().expand(front_lp.shape[0], -1)
        if j >= p:
            logits = logits + model.head_delta(z[j].expand(front_lp.shape[0], -1), h).float()
        lp, tok = torch.log_softmax(logits, -1).topk(min(beam, logits.shape[-1]), -1)  # [F, C]
        total = (front_lp[:, None] + lp).flatten()
        order = total.argsort(descending=True)[:nodes]  # the rest can never make the top N
        parent = order // lp.shape[1]  # row of `front`
        start = len(cands)
        for f, t, v in zip(parent.tolist(), tok.flatten()[order].tolist(), total[order].tolist()):
            cands.append((j, v, t, front[f] if front else -1))
        if j == k - 1:
            break
        keep = order[:beam]  # expand the most probable nodes of this depth
        front, front_lp = list(range(start, start + keep.numel())), total[keep]
        h = model.head_gru_step(embed(model.to_target_ids(tok.flatten()[keep])), h[parent[:beam]])
    # Top-N over all depths (ties: shallower first, so a parent precedes its equal child), then
    # ordered by depth so parents come before children.
    top = sorted(range(len(cands)), key=lambda i: (-cands[i][1], cands[i][0]))[:nodes]
    chosen = sorted(top, key=lambda i: (cands[i][0], -cands[i][1]))
    row = {i: r + 1 for r, i in enumerate(chosen)}
    parents = [row[cands[i][3]] if cands[i][3] >= 0 else 0 for i in chosen]
    ids = model.to_target_ids(torch.tensor([cands[i][2] for i in chosen], dtype=torch.long, device=dev))
    return DraftTree(ids.cpu(), parents, k=k)


def follow(tree: DraftTree, best: list[int]) -> list[int]:
    """Rows of the longest branch whose every token is `best` at its parent's row (root first)."""
    children: dict[int, dict[int, int]] = {}
    for i, (p, t) in enumerate(zip(tree.parents, tree.tokens.tolist()), start=1):
        children.setdefault(p, {}).setdefault(t, i)
    path = [0]
    while (nxt := children.get(path[-1], {}).get(best[path[-1]])) is not None:
        path.append(nxt)
    return path


def verify_tree(tree: DraftTree, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy tree verification. target_logits [N + 1, V] at [anchor, tree tokens]. Returns the
    rows of the accepted branch, root first ([0] when no draft is accepted), and the bonus token:
    the target's argmax after the branch, exactly what plain decoding would emit next."""
    best = target_logits.argmax(-1).tolist()
    path = follow(tree, best)
    return path, best[path[-1]]
