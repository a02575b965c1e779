"""Bitwise-lossless verification: the target must compute the same logits for a token whether it is
decoded alone (M = 1 query) or verified inside a block (M = K + 1 queries).

Greedy speculative decoding returns exactly plain decoding's tokens only if the verify pass's
argmax at each position is the one plain decoding would take. In fp32 the two passes agree to
~1e-5, but not bitwise: BLAS kernels pick another summation order for another M, and transformers'
SDPA path for one query (GQA heads packed as queries, no mask) differs from the path for many
(repeated KV heads, causal mask). On a near-tie that flips the argmax, which the held-out
benchmark shows as `lossless` False with stock kernels (docs/design.md, "Exactness").

The fix has two halves, both exact computations with no approximation:
* Linear layers: `domino_backend.cpu.PackedLinear` (oneDNN, weights pre-packed) gives each row the
  same bits for any M >= 2, and runs M = 1 as two rows for the shapes whose one-row kernel differs.
* Attention (here): for up to `MAX_ROWS` queries of one sequence under a plain causal mask, each
  query row i attends by itself, through the same one-query SDPA call decoding uses, to the keys it
  may see (the first L - M + 1 + i; for a draft tree, the cache plus the row's ancestors). That
  costs M small SDPA calls per layer instead of one, a few ms per verify; longer inputs (prefill
  chunks, shared by every method) keep the fused kernel.

`use_rowwise_attention(model)` switches a transformers model to it; the engine does so for its
target. tests/test_batch_invariant.py checks the bitwise property end to end.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

NAME = "domino_rowwise"
MAX_ROWS = 32  # >= a block-16 verify (17 rows); longer inputs are prefill chunks


def _row_keys(mask: torch.Tensor | None, m: int, n_keys: int) -> list[torch.Tensor | None] | None:
    """Per query row, the block keys it may see when the mask hides no cached key: None for a row
    that sees a plain causal prefix, else the indices of its visible keys among the last M (a draft
    tree: ancestors and itself). None overall when the mask is anything else (padding, windows).
    mask [B, 1, M, L], bool or additive float."""
    if mask is None:
        return [None] * m
    allowed = (mask if mask.dtype == torch.bool else mask == 0).reshape(-1, m, n_keys)[0]
    cached, block = allowed[:, :n_keys - m], allowed[:, n_keys - m:]
    if not bool(cached.all()) or bool(block.triu(1).any()) or not bool(block.diagonal().all()):
        return None
    rows = []
    for i in range(m):
        seen = block[i, :i + 1]
        rows.append(None if bool(seen.all()) else seen.nonzero().flatten())
    return rows


class _RowPlan:
    """`_row_keys`, memoised on the mask object: every layer of a forward gets the same one
    (a forward builds its mask once and hands that object to each layer)."""

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor | None, int, int, list | None] = (None, 0, 0, None)

    def __call__(self, mask: torch.Tensor | None, m: int, n_keys: int) -> list[torch.Tensor | None] | None:
        if mask is None:
            return [None] * m
        last = self._last  # one read: another thread may swap it meanwhile
        if last[0] is not mask or last[1:3] != (m, n_keys):
            last = self._last = (mask, m, n_keys, _row_keys(mask, m, n_keys))
        return last[3]


_rows_for = _RowPlan()


def rowwise_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function. query [B, H, M, D], key/value [B, KV, L, D] (cache included,
    new keys last) -> ([B, M, H, D], None).

    A draft tree's row sees the cache, its ancestors and itself: their keys are copied behind the
    cache in a scratch buffer, so the one-query SDPA sees exactly the keys, in the same order, that
    decoding the row's branch token by token would have cached."""
    b, h, m, d = query.shape
    kv, n_keys = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    rows = None
    if b == 1 and m <= MAX_ROWS and not dropout and causal and not kwargs.get("sliding_window") and not h % kv:
        rows = _rows_for(attention_mask, m, n_keys)
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    g, past = h // kv, n_keys - m
    scratch = None
    out = []
    for i in range(m):
        q = query[:, :, i].reshape(b, kv, g, d)  # the G query heads sharing a KV head, as G queries
        if rows[i] is None:
            k, v = key[:, :, :past + i + 1], value[:, :, :past + i + 1]
        else:
            if scratch is None:  # the cache, copied once per layer
                scratch = (key.new_empty(b, kv, n_keys, d), value.new_empty(b, kv, n_keys, d))
                scratch[0][:, :, :past] = key[:, :, :past]
                scratch[1][:, :, :past] = value[:, :, :past]
            idx, n = rows[i] + past, past + rows[i].numel()
            scratch[0][:, :, past:n] = key.index_select(2, idx)
            scratch[1][:, :, past:n] = value.index_select(2, idx)
            k, v = scratch[0][:, :, :n], scratch[1][:, :, :n]
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        out.append(o.reshape(b, 1, h, d))
    return torch.cat(out, 1), None


def register() -> None:
    """Make `NAME` known to transformers (idempotent): its attention and mask registries are global."""
    AttentionInterface.register(NAME, rowwise_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_rowwise_attention(model) -> None:
    """Switch a transformers model to row-wise attention (idempotent); a model that cannot switch
    keeps its attention, and verify is then lossless only up to rounding, so say so."""
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError) as e:
        log.warning("row-wise attention unavailable (%s): verify may differ from decoding in the last bits", e)
