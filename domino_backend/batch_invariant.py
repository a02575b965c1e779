"""Bitwise-lossless verification: the target must compute the same logits for a token whether it is
decoded alone (M = 1 query), verified inside a block (M = K + 1 queries), or run in a forward that
also carries other sequences' rows.

Greedy speculative decoding returns exactly plain decoding's tokens only if the verify pass's
argmax at each position is the one plain decoding would take. In fp32 the two passes agree to
~1e-5, but not bitwise: BLAS kernels pick another summation order for another M, and a fused
attention kernel sums a query's keys in blocks that depend on how many queries share the call. On
a near-tie that flips the argmax, which the held-out benchmark shows as `lossless` False with stock
kernels (docs/design.md, "Exactness").

The fix has two halves, both exact computations with no approximation:
* Linear layers: `domino_backend.cpu.PackedLinear` (oneDNN, weights pre-packed) gives each row the
  same bits for any M >= 2, and runs M = 1 as two rows for the shapes whose one-row kernel differs.
  Every other per-token op of the forward (norms, RoPE, MLP activations) is row-wise already.
* Attention (here): for up to `MAX_ROWS` query rows of one sequence, each row attends by itself,
  through the same one-query SDPA call decoding uses, to the keys it may see (the cache, then the
  block's rows up to itself; for a draft tree, the cache plus the row's ancestors). That costs M
  small SDPA calls per layer instead of one, a few ms per verify; longer inputs (prefill chunks,
  identical for every method and batch) keep the fused kernel.

tests/test_batch_invariant.py checks the bitwise property end to end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 32  # >= a block-16 verify (17 rows); longer inputs are prefill chunks


def tree_mask(parents: list[int]) -> torch.Tensor:
    """[T, T] bool, row i = the nodes node i may see (its ancestors and itself) in a tree of T =
    len(parents) + 1 nodes: node 0 the root, node i + 1's parent parents[i] < i + 1."""
    t = len(parents) + 1
    mask = torch.eye(t, dtype=torch.bool)
    for i, p in enumerate(parents, start=1):
        if not 0 <= p < i:
            raise ValueError(f"tree node {i} has parent {p}: parents must come before their children")
        mask[i] |= mask[p]
    return mask


def visible_rows(parents: list[int] | None, m: int) -> list[torch.Tensor | None] | None:
    """Per query row of an M-row block, the block rows it may see: None for a row that sees a plain
    causal prefix, else their indices (a draft tree: ancestors and itself). None overall for a
    causal block too long to run row by row (the fused kernel)."""
    if parents is None:
        return [None] * m if m <= MAX_ROWS else None
    if m > MAX_ROWS:
        raise ValueError(f"a draft tree of {m} rows; at most {MAX_ROWS} are verified row by row")
    block = tree_mask(parents)
    rows = []
    for i in range(m):
        seen = block[i, :i + 1]
        rows.append(None if bool(seen.all()) else seen.nonzero().flatten())
    return rows


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past: int,
           rows: list[torch.Tensor | None] | None, scale: float) -> torch.Tensor:
    """One sequence's attention. query [M, H, D]; key/value [KV, past + M, D], the cache first and
    the block's own rows last -> [M, H, D].

    rows (from `visible_rows`): None = causal through the fused kernel. Otherwise query row i runs
    alone, its G query heads per KV head as G queries of one SDPA call, over the keys decoding its
    branch token by token would have cached; a tree row's ancestors are copied behind the cache in
    a scratch buffer, so the call sees exactly those keys in that order."""
    m, h, d = query.shape
    kv = key.shape[0]
    g = h // kv
    if rows is None:
        n = past + m
        allowed = torch.ones(m, n, dtype=torch.bool, device=query.device).tril(past)
        k, v = key.repeat_interleave(g, 0)[None], value.repeat_interleave(g, 0)[None]
        out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], k, v, attn_mask=allowed, scale=scale)
        return out[0].transpose(0, 1)
    out = query.new_empty(m, h, d)
    scratch = None
    for i in range(m):
        q = query[i].reshape(1, kv, g, d)
        if rows[i] is None:
            k, v = key[None, :, :past + i + 1], value[None, :, :past + i + 1]
        else:
            if scratch is None:  # the cache, copied once per layer
                scratch = (key.new_empty(kv, past + m, d), value.new_empty(kv, past + m, d))
                scratch[0][:, :past] = key[:, :past]
                scratch[1][:, :past] = value[:, :past]
            idx, n = rows[i] + past, past + rows[i].numel()
            scratch[0][:, past:n] = key.index_select(1, idx)
            scratch[1][:, past:n] = value.index_select(1, idx)
            k, v = scratch[0][None, :, :n], scratch[1][None, :, :n]
        out[i] = F.scaled_dot_product_attention(q, k, v, scale=scale).reshape(h, d)
    return out
