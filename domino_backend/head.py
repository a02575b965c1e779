"""Domino head: the sequential draft rollout (inference) and its teacher-forced twin (training).

Indexing used throughout: draft j (0-based) proposes the token at absolute position anchor+1+j and
reads block slot `cfg.slot_offset + j` (slot j with shift_label, slot j+1 without). The first
`pure_draft_prefix_len` = P drafts come from base logits only. The GRU then starts from zero on the
target embeddings of [anchor, d_0..d_{P-1}], and each later draft j uses
    logits_j = base_j + W2 · SiLU(W1 · [z_j ; s_j])
where s_j has consumed exactly the tokens at positions anchor .. anchor+j (the invariant that
makes rollout and training agree). The state never crosses a block boundary.

The GRU step is the kernels' reference cell (`kernels.reference.gru_cell`, via
`DraftModel.head_gru_step`). The rollout itself is not `kernels.fused_rollout`, because the engine
needs what the capture-safe loop leaves out: every `SamplingParams` (top-k/top-p, a torch
Generator), reduced-vocabulary drafters (picks mapped through d2t) and the full draft
distributions; and it keeps the delta in the module's dtype as `embed_proj` computes it (the fused
path adds it in fp32), gathering embeddings rather than holding a [V, 3G] input table. Both
rollouts are token-identical in fp32 (tests/test_kernels.py). Training runs the same weights
through `nn.GRU` over the whole block (autograd); tests/test_head.py ties it to the cell.
"""

from __future__ import annotations

import torch

from .draft_model import DraftModel
from .sampling import SamplingParams, select


def rollout(
    model: DraftModel,
    z: torch.Tensor,
    base: torch.Tensor,
    anchor: torch.Tensor,
    embed: torch.nn.Module,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    use_head: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft K tokens per block.

    z [B, K, H] slot hiddens and base [B, K, V] base logits, restricted to the K draft slots;
    anchor [B] the slot-0 token; embed the target's input embedding. Returns target token ids [B, K]
    and the draft distributions over the target vocabulary [B, K, V] (None when greedy). base has
    V_draft columns for a reduced-vocabulary drafter; picks are mapped back to target ids. With use_head=False (or
    a plain DFlash checkpoint) every draft is picked from base logits alone.
    """
    b, k, _ = base.shape
    p = model.cfg.pure_draft_prefix_len
    if not (use_head and model.has_head) or k <= p:
        return _to_target(model, *select(base, params, generator))
    tokens = torch.empty(b, k, dtype=torch.long, device=base.device)  # draft-vocabulary indices
    probs = None if params.greedy else torch.empty(b, k, base.shape[-1], device=base.device)
    tok, pr = select(base[:, :p], params, generator)
    tokens[:, :p] = tok
    if probs is not None:
        probs[:, :p] = pr
    # Prime the GRU from zero on [anchor, d_0 .. d_{P-1}].
    h = z.new_zeros(b, model.cfg.gru_hidden_dim, dtype=model.prefix_gru.weight_hh_l0.dtype)
    prime = torch.cat([anchor[:, None], model.to_target_ids(tokens[:, :p])], dim=1)
    for x in embed(prime).unbind(1):
        h = model.head_gru_step(x, h)
    for j in range(p, k):
        logits = base[:, j].float() + model.head_delta(z[:, j], h).float()
        tok, pr = select(logits, params, generator)
        tokens[:, j] = tok
        if probs is not None:
            probs[:, j] = pr
        if j < k - 1:  # no GRU step after the last draft
            h = model.head_gru_step(embed(model.to_target_ids(tok)), h)
    return _to_target(model, tokens, probs)


def _to_target(model: DraftModel, idx: torch.Tensor, probs: torch.Tensor | None):
    """Draft-vocabulary picks -> target ids, and their distributions spread over the target
    vocabulary (zero outside the draft vocabulary) so the verifier sees the real q."""
    ids = model.draft_token_ids()
    if ids is None:
        return idx, probs
    full = None
    if probs is not None:
        full = probs.new_zeros(*probs.shape[:-1], model.cfg.vocab_size)
        full[..., ids] = probs
    return model.to_target_ids(idx), full


def teacher_forced_logits(
    model: DraftModel,
    z: torch.Tensor,
    base: torch.Tensor,
    anchor: torch.Tensor,
    labels: torch.Tensor,
    embed: torch.nn.Module,
) -> torch.Tensor:
    """Training-time head: final logits [N, K, V] for N blocks given the true next tokens.

    z [N, K, H], base [N, K, V] (draft slots only), anchor [N], labels [N, K] (the tokens at
    anchor+1 .. anchor+K). The GRU runs in parallel over [anchor, labels[:, :K-1]]; output t has
    consumed positions anchor..anchor+t, so draft j >= P uses output j. Drafts < P keep base.
    """
    p = model.cfg.pure_draft_prefix_len
    inputs = embed(torch.cat([anchor[:, None], labels[:, :-1]], dim=1))  # [N, K, H]
    states, _ = model.prefix_gru(inputs.to(model.prefix_gru.weight_ih_l0.dtype))  # [N, K, G]
    delta = model.head_delta(z[:, p:], states[:, p:])
    return torch.cat([base[:, :p], base[:, p:] + delta.to(base.dtype)], dim=1)
