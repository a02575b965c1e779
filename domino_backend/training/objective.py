"""The published Domino training objective, for one teacher-forced sequence.

Per sequence: anchors are sampled among response tokens; each anchor opens a block
[x_anchor, MASK x (B-1)] at positions anchor..anchor+B-1 that sees the target's context features
at positions < anchor and its own block only. Draft j (see head.py) is supervised with the token at
anchor+1+j, weighted by exp(-j/gamma) and zero where that token is past the end or not a response
token. Losses are normalised by the sum of weights (not the token count), and combined with the
base-anchored curriculum  loss = (1 - lam) * L_final + lam * L_base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..draft_model import DraftModel
from ..head import teacher_forced_logits


def lambda_base(step: int, total_steps: int, start: float = 1.0, decay_ratio: float = 1.0) -> float:
    """Linear decay from `start` to 0 over `decay_ratio` of the run (the public recipe: 1.0 -> 0 over
    the whole run). Clipped to [0, 1]."""
    decay_steps = max(1, int(total_steps * decay_ratio))
    return min(max(start * (1.0 - min(step / decay_steps, 1.0)), 0.0), 1.0)


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """loss_mask [S] bool (response tokens). Anchors: response positions p with p+1 < S whose next
    token is a response token too (so at least one draft is supervised). Sorted, without replacement."""
    s = loss_mask.shape[0]
    ok = loss_mask[:-1] & loss_mask[1:]
    cand = torch.nonzero(ok).flatten()
    if cand.numel() == 0:
        return cand
    pick = torch.randperm(cand.numel(), generator=generator)[:num_anchors]
    out = cand[pick].sort().values
    assert int(out.max()) < s - 1
    return out


@dataclass
class Blocks:
    block_ids: torch.Tensor  # [N, B] anchor then mask ids
    positions: torch.Tensor  # [N, B] absolute positions
    labels: torch.Tensor  # [N, K] token at anchor+1+j (0 where past the end)
    weights: torch.Tensor  # [N, K] decay weight, 0 where unsupervised
    mask: torch.Tensor  # [1, 1, N*B, S+N*B] bool, True = may attend


def build_blocks(ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, block_size: int,
                 num_drafts: int, mask_token_id: int, gamma: float,
                 target_next: torch.Tensor | None = None) -> Blocks:
    """target_next [S] (optional): the target's greedy token after each position. Verification
    compares draft j with the target's greedy token after anchor+j, given the drafts before it; so
    with target_next, draft j is supervised with that token, and only while the data's tokens
    anchor+1..anchor+j follow the target's greedy chain (then the prefix is the one verification sees)."""
    s, n = ids.shape[0], anchors.shape[0]
    offs = torch.arange(block_size)
    block_ids = torch.full((n, block_size), mask_token_id, dtype=torch.long)
    block_ids[:, 0] = ids[anchors]
    positions = anchors[:, None] + offs
    lab_pos = anchors[:, None] + 1 + torch.arange(num_drafts)  # [N, K]
    inside = lab_pos < s
    safe = lab_pos.clamp(max=s - 1)
    labels = torch.where(inside, ids[safe], torch.zeros_like(safe))
    valid = inside & loss_mask[safe]
    if target_next is not None:
        greedy = torch.where(inside, target_next[safe - 1], torch.zeros_like(safe))  # after anchor+j
        on_chain = torch.ones_like(valid)
        on_chain[:, 1:] = (greedy == labels)[:, :-1].int().cumprod(dim=1).bool()
        labels, valid = greedy, valid & on_chain
    decay = torch.exp(-torch.arange(num_drafts, dtype=torch.float32) / gamma)
    weights = decay * valid
    # Attention: block i's queries see context keys < anchor_i and the B keys of block i only.
    q_block = torch.arange(n).repeat_interleave(block_size)  # [N*B]
    ctx_ok = torch.arange(s)[None, :] < anchors[q_block][:, None]  # [N*B, S]
    blk_ok = q_block[:, None] == q_block[None, :]  # [N*B, N*B]
    mask = torch.cat([ctx_ok, blk_ok], dim=1)[None, None]
    return Blocks(block_ids, positions, labels, weights, mask)


def accept_length(pred: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Training-time accept length per block: consecutive correct supervised drafts + 1."""
    ok = (pred == labels) & (weights > 0)
    return ok.int().cumprod(dim=1).sum(dim=1).float() + 1


def sequence_loss(model: DraftModel, embed, lm_head, feats: torch.Tensor, ids: torch.Tensor,
                  loss_mask: torch.Tensor, anchors: torch.Tensor, lam: float, gamma: float,
                  use_head: bool = True, target_next: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """feats [S, L*H] context features, ids [S], loss_mask [S] bool, anchors [N], target_next [S] or
    None (labels from the data). Returns (loss, metrics)."""
    cfg = model.cfg
    blk = build_blocks(ids, loss_mask, anchors, cfg.block_size, cfg.num_drafts, cfg.mask_token_id, gamma,
                       target_next)
    dtype = model.fc.weight.dtype
    n, b = blk.block_ids.shape
    with torch.no_grad():
        emb = embed(blk.block_ids).to(dtype).reshape(1, n * b, -1)
    z = model.forward_train(emb, blk.positions.reshape(1, -1), feats[None].to(dtype), blk.mask)
    z = z.reshape(n, b, -1)[:, cfg.slot_offset:cfg.slot_offset + cfg.num_drafts]  # [N, K, H]
    base = model.base_logits(z, lm_head).float()  # [N, K, V_draft]
    # Targets in the drafter's own vocabulary; a label the draft vocabulary lacks cannot be drafted,
    # so it gets no weight (identity for full-vocabulary drafters).
    labels, weights = blk.labels, blk.weights
    if cfg.draft_vocab_size is not None:
        labels = model.target_to_draft()[blk.labels]
        weights = weights * (labels >= 0)
        labels = labels.clamp_min(0)
    wsum = weights.sum().clamp_min(1e-6)

    def weighted_ce(logits):
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(weights)
        return (ce * weights).sum() / wsum

    loss_base = weighted_ce(base)
    metrics = {"loss_base": loss_base.item()}
    if use_head and model.has_head:
        with torch.no_grad():
            anchor_tok = blk.block_ids[:, 0]
        final = teacher_forced_logits(model, z, base, anchor_tok, blk.labels, embed).float()
        loss_final = weighted_ce(final)
        loss = (1.0 - lam) * loss_final + lam * loss_base
        metrics["loss_final"] = loss_final.item()
    else:
        final, loss = base, loss_base
        metrics["loss_final"] = loss_base.item()
    with torch.no_grad():
        sup = weights > 0
        for name, logits in (("base", base), ("final", final)):
            pred = logits.argmax(-1)
            metrics[f"acc_{name}"] = ((pred == labels) & sup).sum().item() / max(1, int(sup.sum()))
            metrics[f"accept_len_{name}"] = accept_length(pred, labels, weights).mean().item()
    metrics["loss"] = loss.item()
    metrics["lambda"] = lam
    metrics["anchors"] = n
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss {metrics}")
    return loss, metrics
