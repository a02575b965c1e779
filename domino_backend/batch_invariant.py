"""Bitwise-lossless verification: the target must compute the same logits for a token whether it is
decoded alone (M = 1 query) or verified inside a block (M = K + 1 queries).

Greedy speculative decoding returns exactly plain decoding's tokens only if the verify pass's
argmax at each position is the one plain decoding would take. In fp32 the two passes agree to
~1e-5, but not bitwise: BLAS kernels pick another summation order for another M, and transformers'
SDPA path for one query (GQA heads packed as queries, no mask) differs from the path for many
(repeated KV heads, causal mask). On a near-tie that flips the argmax, and the held-out benchmark
saw it (session 7, bf16 on a native-bf16 CPU, stock kernels: `lossless` False for 3 of 5 drafting
methods on code and all 5 on chat).

The fix has two halves, both exact computations with no approximation:
* Linear layers: `domino_backend.cpu.PackedLinear` (oneDNN, weights pre-packed) gives each row the
  same bits for any M >= 2, and runs M = 1 as two rows for the shapes whose one-row kernel differs.
* Attention (here): for up to `MAX_ROWS` queries of one sequence under a plain causal mask, each
  query row i attends by itself, through the same one-query SDPA call decoding uses, to the keys it
  may see (the first L - M + 1 + i). That costs M small SDPA calls per layer instead of one, a few
  ms per verify; longer inputs (prefill chunks, shared by every method) keep the fused kernel.

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


def _plain_causal(mask: torch.Tensor | None, m: int, n_keys: int) -> bool:
    """True when `mask` ([B, 1, M, L], bool or additive float) only hides future keys."""
    if mask is None:
        return True
    allowed = mask if mask.dtype == torch.bool else mask == 0
    want = torch.ones(m, n_keys, dtype=torch.bool, device=mask.device).tril(n_keys - m)
    return torch.equal(allowed.reshape(-1, m, n_keys)[0], want)


def rowwise_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function. query [B, H, M, D], key/value [B, KV, L, D] (cache included,
    new keys last) -> ([B, M, H, D], None)."""
    b, h, m, d = query.shape
    kv, n_keys = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (b != 1 or m > MAX_ROWS or dropout or not causal or kwargs.get("sliding_window") or h % kv
            or not _plain_causal(attention_mask, m, n_keys)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    g = h // kv
    rows = []
    for i in range(m):
        n = n_keys - m + 1 + i  # keys visible to query row i
        q = query[:, :, i].reshape(b, kv, g, d)  # the G query heads sharing a KV head, as G queries
        o = F.scaled_dot_product_attention(q, key[:, :, :n], value[:, :, :n], scale=scaling)
        rows.append(o.reshape(b, 1, h, d))
    return torch.cat(rows, 1), None


AttentionInterface.register(NAME, rowwise_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_rowwise_attention(model) -> None:
    """Switch a transformers model to row-wise attention (idempotent); a model that cannot switch
    keeps its attention, and verify is then lossless only up to rounding, so say so."""
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError) as e:
        log.warning("row-wise attention unavailable (%s): verify may differ from decoding in the last bits", e)
