"""Draft trees for greedy decoding: the Domino head grown along several branches, verified in one
target pass, the longest branch the target agrees with kept.

The drafter's block pass is parallel, so its base logits at depth j are the same on every branch;
only the head's GRU state differs (it has consumed that branch's tokens). A chain commits the
head's top token at each depth and loses the round at the first miss; a tree keeps the runners-up
(held-out code, shipped drafter: the first draft is the target's token 38% of the time, one of
the top 3 ~55%). Which nodes: the N with the highest path probability (the product of the head's
softmax along the branch, as EAGLE-2 ranks its candidates), grown depth by depth from the `beam`
most probable nodes of each depth; a child never outranks its parent, so the set is a tree.

Sampling keeps the chain: lossless tree sampling needs multi-draft rejection sampling (not here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .draft_model import DraftModel


@dataclass(frozen=True)
class TreeConfig:
    width: float = 1.0  # a round drafting K tokens verifies round(width * K) nodes (<= 31: batch_invariant.MAX_ROWS)
    beam: int = 4  # nodes expanded per depth, each into its `beam` most probable children


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [N] target ids, parents before children
    parents: list[int]  # node i's parent row: 0 = the anchor, j = tokens[j - 1]

    @property
    def depth(self) -> int:
        depth = [0]
        for p in self.parents:
            depth.append(depth[p] + 1)
        return max(depth)


def grow(model: DraftModel, z: torch.Tensor, base: torch.Tensor, anchor: int, embed: torch.nn.Module,
         nodes: int, beam: int) -> DraftTree:
    """A tree of at most `nodes` drafts, depth <= K, for one block.

    z [K, H] slot hiddens, base [K, V_draft] base logits (draft slots only). Depth j < P
    (`pure_draft_prefix_len`) ranks base logits alone, as the chain rollout does; from P on, each
    node's children use base_j + head_delta(z_j, state), the state having consumed the anchor and
    the node's branch (the rollout's invariant, branch by branch).
    """
    k, p = base.shape[0], model.cfg.pure_draft_prefix_len
    beam = min(beam, nodes)
    # Candidates per depth: (parent index into the previous depth's kept nodes, draft idx, log prob).
    cand_parent, cand_tok, cand_lp = [], [], []
    dev = base.device
    h = model.head_gru_step(embed(torch.tensor([anchor], device=dev)),
                            z.new_zeros(1, model.cfg.gru_hidden_dim, dtype=model.prefix_gru.weight_hh_l0.dtype)) \
        if model.has_head else None
    front_lp = torch.zeros(1, device=dev)  # [F] path log prob of the expanded nodes of the last depth
    for j in range(k):
        logits = base[j].float().expand(front_lp.shape[0], -1)
        if h is not None and j >= p:
            logits = logits + model.head_delta(z[j].expand(front_lp.shape[0], -1), h).float()
        lp, tok = torch.log_softmax(logits, -1).topk(min(beam, logits.shape[-1]), -1)  # [F, C]
        total = (front_lp[:, None] + lp).flatten()
        parent = torch.arange(front_lp.shape[0], device=dev).repeat_interleave(lp.shape[1])
        order = total.argsort(descending=True)[:nodes]  # the rest can never make the top N
        cand_parent.append(parent[order])
        cand_tok.append(tok.flatten()[order])
        cand_lp.append(total[order])
        if j == k - 1:
            break
        keep = order[:beam]  # expand the most probable nodes of this depth
        front_lp = total[keep]
        if h is not None:
            ids = model.to_target_ids(tok.flatten()[keep])
            h = model.head_gru_step(embed(ids), h[parent[keep]])
    # Top-N over all depths (ties: shallower first, so a parent precedes its equal child).
    lps = torch.cat(cand_lp)
    depth = torch.cat([torch.full_like(c, j) for j, c in enumerate(cand_lp)])
    rank = sorted(range(lps.numel()), key=lambda i: (-float(lps[i]), int(depth[i])))[:nodes]
    offsets = [0]
    for c in cand_lp:
        offsets.append(offsets[-1] + c.numel())
    chosen = sorted(rank, key=lambda i: (int(depth[i]), -float(lps[i])))  # parents before children
    row = {i: r + 1 for r, i in enumerate(chosen)}
    tokens, parents = [], []
    for i in chosen:
        j = int(depth[i])
        local = i - offsets[j]
        tokens.append(int(cand_tok[j][local]))
        if j == 0:
            parents.append(0)
        else:  # candidate's parent = the `cand_parent`-th expanded node of depth j - 1
            parents.append(row[offsets[j - 1] + int(cand_parent[j][local])])
    ids = model.to_target_ids(torch.tensor(tokens, dtype=torch.long, device=dev))
    return DraftTree(ids.cpu(), parents)


def verify_tree(tree: DraftTree, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy tree verification. target_logits [N + 1, V] at [anchor, tree tokens]. Returns the
    rows of the accepted branch, root first ([0] when no draft is accepted), and the bonus token:
    the target's argmax after the branch, exactly what plain decoding would emit next."""
    best = target_logits.argmax(-1).tolist()
    children: dict[int, dict[int, int]] = {}
    for i, (p, t) in enumerate(zip(tree.parents, tree.tokens.tolist()), start=1):
        children.setdefault(p, {}).setdefault(t, i)
    path = [0]
    while (nxt := children.get(path[-1], {}).get(best[path[-1]])) is not None:
        path.append(nxt)
    return path, best[path[-1]]
