"""Our Domino rollout behind SGLang's `domino_greedy_rollout` calling convention.

SGLang (0.5.23, `speculative/domino_utils.py`) drafts block_size − 1 tokens from the draft block's
hidden states: slots 0..14 with `shift_label`, slots 1..15 without (slot 15 of a shifted block is
dropped, unlike the HF reference, which drafts 16). The first draft is the argmax of the base
logits; the GRU is primed on the target embeddings of [bonus, first]; each later draft is
argmax(base + W2·SiLU(W1·[z; h])). This module computes the same thing with `kernels.fused_rollout`
(full vocabulary, exact; Triton on CUDA) and optionally samples at temperature T with given
uniforms, returning the exact draft distributions for lossless verification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import HeadWeights, RolloutResult, fused_rollout, prepare_from_modules


def proposal_slots(block_size: int, shift_label: bool) -> slice:
    """Block slots SGLang drafts from: block_size − 1 of them, starting at 0 (shift) or 1."""
    start = 0 if shift_label else 1
    return slice(start, start + block_size - 1)


@torch.no_grad()
def domino_rollout(
    *,
    draft_hidden: torch.Tensor,
    bonus_tokens: torch.Tensor,
    target_embedding,
    lm_head_weight: torch.Tensor,
    prefix_gru,
    embed_proj,
    vocab_size: int,
    shift_label: bool,
    head: HeadWeights | None = None,
    temperature: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    return_logits: bool = False,
    backend: str | None = None,
    **_upstream_only,
) -> RolloutResult:
    """Full-vocabulary Domino rollout with SGLang's arguments (tp=1; extra upstream kwargs such
    as candidate_pool_size, tp_group or in_cuda_graph are accepted and ignored: scoring is exact).

    draft_hidden [B, block, H]; bonus_tokens [B]. Returns tokens [B, block − 1] (+ logZ / logits
    when sampling) — see `kernels.fused_rollout`."""
    if draft_hidden.ndim != 3:
        raise ValueError(f"draft_hidden must be [batch, block, hidden], got {tuple(draft_hidden.shape)}")
    b, block, _ = draft_hidden.shape
    if block < 2:
        raise ValueError(f"Domino needs block_size > 1, got {block}")
    z = draft_hidden[:, proposal_slots(block, shift_label)]
    w = lm_head_weight[: int(vocab_size)]
    base = F.linear(z.to(w.dtype), w)  # [B, K, V], same GEMM and dtype as SGLang's base logits
    hw = head if head is not None else prepare_from_modules(prefix_gru, embed_proj, target_embedding.weight)
    return fused_rollout(hw, z, base, bonus_tokens, temperature=temperature, uniforms=uniforms,
                         return_logits=return_logits, backend=backend)
