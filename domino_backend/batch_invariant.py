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
* Attention (here): each verify row attends by itself, through the same one-query SDPA call
  decoding uses, to the keys it may see (the cache, then the block's rows up to itself; for a
  draft tree, the cache plus the row's ancestors). That costs M small SDPA calls per layer instead
  of one, a few ms per verify.
* Prefill (here too): a prompt row's attention must not depend on how the prompt was cut into
  chunks either (prefix reuse starts a prompt mid-way, a batch's row budget schedules chunks), or
  a restored prefix would change the output. Where the CPU kernel runs with AMX tiles, prompt rows
  go through it like any other row (each gets its own bits, and the tiles are faster than fused
  SDPA blocks); otherwise, as follows. Rows run in `BLOCK`-row blocks at absolute positions
  (0, BLOCK, 2 BLOCK, ...), each block as one fused call over the keys up to its end (the pass's
  last block may be shorter: the prompt's tail, or a chunk's end at a position fixed for the
  prompt). A pass that starts inside a block (a prefix restored mid-block) runs that block's
  call with zero queries in place of the rows it restored: a row's bits depend on which rows
  share its call (SDPA tiles the queries by their number) but not on the other rows' values, nor
  on keys its mask hides. Which call computes a row, and how many rows share it, then depends on
  its position and the prompt's length alone, provided chunks end on block boundaries or at
  such fixed positions (rounds.py cuts them so), and a prefix is restored mid-block only where
  the block ends at the same place in the earlier prompt (prefix_cache.py).

tests/test_batch_invariant.py checks the bitwise property end to end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import attention

MAX_ROWS = 32  # the largest draft tree verified (in rows), >= a block-16 verify (17 rows)
BLOCK = 32  # prefill rows attend in aligned blocks of this many (one fused call each)


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


def visible_rows(parents: list[int] | None, m: int) -> torch.Tensor | None:
    """Which block rows each query row of an M-row verify may see: None for a chain (row i sees
    rows 0..i), else the draft tree's [M, M] uint8 mask (ancestors and itself)."""
    if parents is None:
        return None
    if m > MAX_ROWS:
        raise ValueError(f"a draft tree of {m} rows; at most {MAX_ROWS} are verified row by row")
    return tree_mask(parents).to(torch.uint8)


def prefill_blocks(start: int, m: int) -> list[int]:
    """The rows (relative to the pass) where the BLOCK-row blocks of a prefill pass of m rows at
    position `start` begin: 0, then every aligned position inside the pass. The first block
    starts before the pass when `start` is not aligned; the last may be cut short by the pass's
    end (the prompt's end, or a chunk end at a position fixed for the prompt)."""
    if not m:
        return []
    first = -(-start // BLOCK) * BLOCK
    return ([0] if first > start else []) + [b - start for b in range(first, start + m, BLOCK)]


def block_mask(end: int, rows: int, g: int, dtype: torch.dtype, device, cache: dict | None = None) -> torch.Tensor:
    """The additive mask of the prefill block of `rows` rows ending at `end`: [g * rows, end], 0
    where a row may look (every key before the block, the block's rows up to itself), -inf
    elsewhere; repeated for the g query heads of a kv head. Additive rather than boolean: SDPA then
    skips converting it (same result bits), and `cache` (one forward's dict) builds each once for
    all layers."""
    if cache is not None and (end, rows, g) in cache:
        return cache[end, rows, g]
    hidden = torch.ones(rows, end, dtype=torch.bool, device=device).triu(end - rows + 1)
    out = torch.zeros(rows, end, dtype=dtype, device=device).masked_fill_(hidden, float("-inf")).repeat(g, 1)
    if cache is not None:
        cache[end, rows, g] = out
    return out


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past: int, mask: torch.Tensor | None,
           scale: float, blocks: list[int] = (), block_masks: dict | None = None,
           new: tuple[torch.Tensor, torch.Tensor] | None = None, pack: tuple | None = None) -> torch.Tensor:
    """One sequence's attention. query [M, H, D]; key/value [KV, past + M, D] (views of the cache:
    its first rows, the pass's own rows last) -> [M, H, D]. new: the pass's own keys and values
    ([M, KV, D] each), written into the cache here first (by the kernel's call itself where it
    runs); None when they are there already.

    blocks (a prefill's, from `prefill_blocks`; ignored where the kernel runs with AMX tiles, which
    take every row, each with its own bits): these blocks (BLOCK rows, or fewer at the pass's
    end) run as one causal SDPA call each, their G x rows queries per KV head over the keys up to
    the block's end (`block_mask`; block_masks: a dict sharing the masks across a forward's layers);
    a block that began before the pass gets zero queries for its rows before `past`.
    Every other row runs alone, over the keys decoding its branch token by token would have cached
    (mask, from `visible_rows`: None = all earlier rows of the pass), through `kernels.attention`
    when it runs here (all rows in one call; pack: the session's packed copy of the cache for it,
    `TargetSession.pack`) or else one SDPA call per row."""
    m, h, d = query.shape
    kv = key.shape[0]
    g = h // kv
    out = query.new_empty(m, h, d)
    kernel = attention.supports(query, key, value)
    if kernel and attention.amx():
        blocks = ()  # the kernel's tiles beat fused SDPA blocks, and give prompt rows their decoding bits
    if new is not None and (blocks or not kernel):
        key[:, past:past + m] = new[0].transpose(0, 1)
        value[:, past:past + m] = new[1].transpose(0, 1)
        new = None
    fused = set()
    for b in blocks:
        lead = (past + b) % BLOCK  # the block's rows before the pass (restored): placeholders
        n = min(BLOCK - lead, m - b)
        end, rows = past + b + n, lead + n
        q = query[b:b + n] if not lead else torch.cat([query.new_zeros(lead, h, d), query[b:b + n]])
        q = q.reshape(rows, kv, g, d).permute(1, 2, 0, 3).reshape(1, kv, g * rows, d)
        o = F.scaled_dot_product_attention(q, key[None, :, :end], value[None, :, :end],
                                           attn_mask=block_mask(end, rows, g, query.dtype, query.device, block_masks),
                                           scale=scale)
        out[b:b + n] = o.reshape(kv, g, rows, d).permute(2, 0, 1, 3)[lead:].reshape(n, h, d)
        fused.update(range(b, b + n))
    rows = [i for i in range(m) if i not in fused]
    if not rows:
        return out
    if kernel:
        attention.attend_rows(query, key, value, past, mask, rows if fused else None, scale, out, new=new, pack=pack)
        return out
    scratch = None
    for i in rows:
        q = query[i].reshape(1, kv, g, d)
        seen = None if mask is None or bool(mask[i, :i + 1].all()) else mask[i, :i + 1].nonzero().flatten()
        if seen is None:
            k, v = key[None, :, :past + i + 1], value[None, :, :past + i + 1]
        else:
            if scratch is None:  # the cache, copied once per layer
                scratch = (key.new_empty(kv, past + m, d), value.new_empty(kv, past + m, d))
                scratch[0][:, :past] = key[:, :past]
                scratch[1][:, :past] = value[:, :past]
            idx, n = seen + past, past + seen.numel()
            scratch[0][:, past:n] = key.index_select(1, idx)
            scratch[1][:, past:n] = value.index_select(1, idx)
            k, v = scratch[0][None, :, :n], scratch[1][None, :, :n]
        out[i] = F.scaled_dot_product_attention(q, k, v, scale=scale).reshape(h, d)
    return out


def attend_all(calls: list[tuple], scale: float, block_masks: dict | None = None) -> None:
    """`attend` for each sequence of a forward, into its rows of the forward's output: calls are
    (query, key, value, past, mask, blocks, new, pack, out) as `attend` takes them, out the view
    its result goes to. Where every call runs the kernel's AMX path against its session's packed
    cache, all of them go in one kernel call (`attention.attend_batch`: the same per-row tasks)."""
    query, key, value = calls[0][:3]
    if attention.supports(query, key, value) and attention.amx() and all(c[7] is not None for c in calls):
        attention.attend_batch([(q, k, v, past, mask, out, new, pack)
                                for q, k, v, past, mask, _, new, pack, out in calls], scale)
        return
    for q, k, v, past, mask, blocks, new, pack, out in calls:
        out.copy_(attend(q, k, v, past, mask, scale, blocks, block_masks, new=new, pack=pack))
