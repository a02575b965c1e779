"""Triton kernels for the Domino head's sequential loop (imported lazily by `kernels.dispatch`).

`@triton.jit` decides at decoration time whether to compile for a GPU or to run in the interpreter
(`TRITON_INTERPRET=1`), so this module is only imported on first use; `kernels.dispatch.triton_module`
re-imports it when that setting changed. All arithmetic is fp32 after `tl.load` (the interpreter
mis-computes bf16 arithmetic; on a GPU it also keeps the argmax close to the fp32 references).
No `.item()`, no host syncs, static grids: every launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")



# Reductions, scans and sigmoid are spelled `tl.reduce` / `tl.associative_scan` with triton's own
# combine functions (exactly what `tl.max` / `tl.sum` / `tl.cumsum` expand to) instead of calling
# those helpers: they are `@triton.jit` functions decorated when `triton` is first imported, so if
# anything imported triton before TRITON_INTERPRET=1 was set (transformers does), the interpreter
# refuses to call them (the same holds for `tl.zeros`: we use `tl.full`), while it runs triton's combine functions (fast, through numpy) either way.
# Our own combine functions below are the fallback for a triton that renames the private ones.


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _argmax_left(v1, i1, v2, i2):
    take1 = (v1 > v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(take1, v1, v2), tl.where(take1, i1, i2)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


_std = getattr(tl, "standard", None)
_SUM = getattr(_std, "_sum_combine", _add)
_MAX = getattr(_std, "_elementwise_max", _maximum)
_MIN = getattr(_std, "_elementwise_min", _minimum)
_ARGMAX = getattr(_std, "_argmax_combine_tie_break_left", _argmax_left)


# ---------------------------------------------------------------------------------------------
# GRU step from the [V, 3G] input-projection table


@triton.jit
def _gru_table_kernel(
    table_ptr, tok_ptr, gh_ptr, h_ptr, out_ptr,
    G, stride_table, stride_gh, stride_h, stride_out,
    HAS_GH: tl.constexpr, BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    m = j < G
    tok = tl.load(tok_ptr + row).to(tl.int64)
    gi = table_ptr + tok * stride_table
    gi_r = tl.load(gi + j, mask=m, other=0.0).to(tl.float32)
    gi_z = tl.load(gi + G + j, mask=m, other=0.0).to(tl.float32)
    gi_n = tl.load(gi + 2 * G + j, mask=m, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + row * stride_h + j, mask=m, other=0.0).to(tl.float32)
    if HAS_GH:
        gh = gh_ptr + row * stride_gh
        gh_r = tl.load(gh + j, mask=m, other=0.0).to(tl.float32)
        gh_z = tl.load(gh + G + j, mask=m, other=0.0).to(tl.float32)
        gh_n = tl.load(gh + 2 * G + j, mask=m, other=0.0).to(tl.float32)
        r = _sigmoid(gi_r + gh_r)
        z = _sigmoid(gi_z + gh_z)
        a = gi_n + r * gh_n
    else:  # h == 0: W_hh · h vanishes
        z = _sigmoid(gi_z)
        a = gi_n
    n = 2.0 * _sigmoid(2.0 * a) - 1.0  # tanh (libdevice is unavailable in the interpreter)
    out = (1.0 - z) * n + z * h
    tl.store(out_ptr + row * stride_out + j, out.to(out_ptr.dtype.element_ty), mask=m)


def gru_step_from_table(table, tokens, gh, h, out=None, block_g: int = 256):
    b, g = h.shape
    if out is None:
        out = torch.empty_like(h)
    if b == 0:
        return out
    block_g = min(block_g, triton.next_power_of_2(g))
    grid = (b, triton.cdiv(g, block_g))
    _gru_table_kernel[grid](
        table, tokens, gh if gh is not None else h, h, out,
        g, table.stride(0), gh.stride(0) if gh is not None else 0, h.stride(0), out.stride(0),
        HAS_GH=gh is not None, BLOCK_G=block_g,
    )
    return out


# ---------------------------------------------------------------------------------------------
# SiLU bottleneck + vocabulary projection + base logits, per vocabulary tile, then a row reduction


@triton.jit
def _head_tile_kernel(
    pre_ptr, pre2_ptr, w2_ptr, base_ptr, inv_t_ptr,
    logits_ptr, tmax_ptr, targ_ptr, tsum_ptr,
    B, V, E, n_tiles,
    stride_pre, stride_pre2, stride_w2, stride_base, stride_logits,
    HAS_W2: tl.constexpr, HAS_PRE2: tl.constexpr, HAS_BASE: tl.constexpr,
    STORE_LOGITS: tl.constexpr, SAMPLE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < B
    cmask = cols < V
    acc = tl.full((BLOCK_B, BLOCK_V), 0.0, tl.float32)
    if HAS_W2:
        for e0 in range(0, E, BLOCK_E):
            ee = e0 + tl.arange(0, BLOCK_E)
            emask = ee < E
            am = rmask[:, None] & emask[None, :]
            a = tl.load(pre_ptr + rows[:, None] * stride_pre + ee[None, :], mask=am, other=0.0).to(tl.float32)
            if HAS_PRE2:
                a += tl.load(pre2_ptr + rows[:, None] * stride_pre2 + ee[None, :], mask=am, other=0.0).to(tl.float32)
            a = a * _sigmoid(a)  # SiLU; padded entries stay 0
            # W2^T tile [BLOCK_E, BLOCK_V] (W2 is [V, E], row-major)
            w = tl.load(w2_ptr + cols[None, :] * stride_w2 + ee[:, None], mask=cmask[None, :] & emask[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(a.to(w.dtype), w, input_precision="ieee")
            else:
                acc += tl.dot(a.to(w.dtype), w)
    if HAS_BASE:
        bm = rmask[:, None] & cmask[None, :]
        acc += tl.load(base_ptr + rows[:, None] * stride_base + cols[None, :], mask=bm, other=0.0).to(tl.float32)
    if STORE_LOGITS:
        tl.store(logits_ptr + rows[:, None] * stride_logits + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    x = tl.where(cmask[None, :], acc, float("-inf"))
    cidx = tl.full((BLOCK_B, BLOCK_V), 0, tl.int32) + tl.arange(0, BLOCK_V)[None, :]
    tmax, targ = tl.reduce((x, cidx), 1, _ARGMAX)  # ties -> lowest column
    off = rows * n_tiles + pid_v
    tl.store(tmax_ptr + off, tmax, mask=rmask)
    tl.store(targ_ptr + off, (targ + pid_v * BLOCK_V).to(tl.int64), mask=rmask)
    if SAMPLE:
        inv_t = tl.load(inv_t_ptr + rows, mask=rmask, other=1.0)
        s = x * inv_t[:, None]
        smax = tmax * inv_t
        tl.store(tsum_ptr + off, tl.reduce(tl.exp(s - smax[:, None]), 1, _SUM), mask=rmask)


@triton.jit
def _head_reduce_kernel(
    tmax_ptr, targ_ptr, tsum_ptr, logits_ptr, u_ptr, temp_ptr, tok_ptr, logz_ptr,
    V, n_tiles, stride_logits,
    SAMPLE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    tm = t < n_tiles
    tmax = tl.load(tmax_ptr + row * n_tiles + t, mask=tm, other=float("-inf"))
    best, best_t = tl.reduce((tmax, t), 0, _ARGMAX)  # ties -> lowest tile
    top1 = tl.load(targ_ptr + row * n_tiles + best_t)
    if SAMPLE:
        temp = tl.load(temp_ptr + row).to(tl.float32)
        greedy = temp <= 0.0
        inv_t = 1.0 / tl.where(greedy, 1.0, temp)
        m = best * inv_t
        tsum = tl.load(tsum_ptr + row * n_tiles + t, mask=tm, other=0.0)
        w = tl.where(tm, tsum * tl.exp(tmax * inv_t - m), 0.0)  # tile masses relative to the row max
        z = tl.reduce(w, 0, _SUM)
        target = tl.load(u_ptr + row).to(tl.float32) * z
        c = tl.associative_scan(w, 0, _SUM)
        tstar = tl.reduce(tl.where((c > target) & tm, t, BLOCK_T), 0, _MIN)
        tstar = tl.minimum(tstar, tl.reduce(tl.where((w > 0) & tm, t, -1), 0, _MAX))  # round-off guard
        prev = tl.reduce(tl.where(t == tstar - 1, c, 0.0), 0, _SUM)
        cols = tstar * BLOCK_V + tl.arange(0, BLOCK_V)
        cm = cols < V
        lg = tl.load(logits_ptr + row * stride_logits + cols, mask=cm, other=float("-inf"))
        p = tl.where(cm, tl.exp(lg * inv_t - m), 0.0)
        cp = tl.associative_scan(p, 0, _SUM) + prev
        idx = tl.reduce(tl.where((cp > target) & cm, cols, V), 0, _MIN)
        idx = tl.minimum(idx, tl.reduce(tl.where((p > 0) & cm, cols, -1), 0, _MAX))  # round-off guard
        tok = tl.where(greedy, top1, idx.to(tl.int64))
        tl.store(tok_ptr + row, tok)
        tl.store(logz_ptr + row, tl.where(greedy, 0.0, m + tl.log(z)))
    else:
        tl.store(tok_ptr + row, top1)


def _head_launch(pre, w2, base, pre2, *, sample, uniform=None, temperature=None, logits_out=None,
                 block_b=16, block_v=256, block_e=64):
    if w2 is not None:
        b, e = pre.shape
        v = w2.shape[0]
        dev = pre.device
    else:
        b, v = base.shape
        e = 1
        dev = base.device
    store = sample or logits_out is not None
    if store and logits_out is None:
        logits_out = torch.empty(b, v, dtype=torch.float32, device=dev)
    block_v = min(block_v, max(16, triton.next_power_of_2(v)))
    block_e = min(block_e, max(16, triton.next_power_of_2(e)))
    n_tiles = triton.cdiv(v, block_v)
    tmax = torch.empty(b, n_tiles, dtype=torch.float32, device=dev)
    targ = torch.empty(b, n_tiles, dtype=torch.int64, device=dev)
    tsum = torch.empty(b, n_tiles, dtype=torch.float32, device=dev) if sample else tmax
    tokens = torch.empty(b, dtype=torch.int64, device=dev)
    logz = torch.empty(b, dtype=torch.float32, device=dev) if sample else None
    if b == 0:
        return tokens, logz, logits_out
    if sample:
        t = temperature.float()
        inv_t = 1.0 / torch.where(t > 0, t, torch.ones_like(t))
    dummy = tmax
    _head_tile_kernel[(triton.cdiv(b, block_b), n_tiles)](
        pre if w2 is not None else dummy,
        pre2 if pre2 is not None else dummy,
        w2 if w2 is not None else dummy,
        base if base is not None else dummy,
        inv_t if sample else dummy,
        logits_out if store else dummy, tmax, targ, tsum,
        b, v, e, n_tiles,
        pre.stride(0) if w2 is not None else 0,
        pre2.stride(0) if pre2 is not None else 0,
        w2.stride(0) if w2 is not None else 0,
        base.stride(0) if base is not None else 0,
        logits_out.stride(0) if store else 0,
        HAS_W2=w2 is not None, HAS_PRE2=pre2 is not None, HAS_BASE=base is not None,
        STORE_LOGITS=store, SAMPLE=sample, IEEE=(w2 is not None and w2.dtype == torch.float32),
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_E=block_e,
    )
    _head_reduce_kernel[(b,)](
        tmax, targ, tsum, logits_out if store else dummy,
        uniform if sample else dummy, temperature if sample else dummy, tokens,
        logz if sample else dummy,
        v, n_tiles, logits_out.stride(0) if store else 0,
        SAMPLE=sample, BLOCK_T=max(2, triton.next_power_of_2(n_tiles)), BLOCK_V=block_v,
    )
    return tokens, logz, logits_out


def head_argmax(pre, w2, base, pre2=None, logits_out=None, **blocks):
    tokens, _, _ = _head_launch(pre, w2, base, pre2, sample=False, logits_out=logits_out, **blocks)
    return tokens


def head_sample(pre, w2, base, uniform, temperature, pre2=None, logits_out=None, **blocks):
    return _head_launch(pre, w2, base, pre2, sample=True, uniform=uniform, temperature=temperature,
                        logits_out=logits_out, **blocks)


# ---------------------------------------------------------------------------------------------
# Verify: greedy accept length + bonus token per row


@triton.jit
def _accept_kernel(
    drafts_ptr, top1_ptr, nd_ptr, acc_ptr, bonus_ptr,
    K, stride_d, stride_t,
    HAS_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    j = tl.arange(0, BLOCK_K)
    valid = j < K
    if HAS_N:
        valid = valid & (j < tl.load(nd_ptr + row))
    d = tl.load(drafts_ptr + row * stride_d + j, mask=j < K, other=0)
    t = tl.load(top1_ptr + row * stride_t + j, mask=j < K, other=0)
    bad = (d != t) | (valid == 0)
    a = tl.reduce(tl.where(bad, j, BLOCK_K), 0, _MIN)
    a = tl.minimum(a, K)
    tl.store(acc_ptr + row, a.to(tl.int64))
    tl.store(bonus_ptr + row, tl.load(top1_ptr + row * stride_t + a).to(tl.int64))


def greedy_accept(drafts, target_top1, num_drafts=None):
    b, k = drafts.shape
    accept = torch.empty(b, dtype=torch.int64, device=drafts.device)
    bonus = torch.empty(b, dtype=torch.int64, device=drafts.device)
    if b == 0:
        return accept, bonus
    _accept_kernel[(b,)](
        drafts, target_top1, num_drafts if num_drafts is not None else drafts, accept, bonus,
        k, drafts.stride(0), target_top1.stride(0),
        HAS_N=num_drafts is not None, BLOCK_K=max(2, triton.next_power_of_2(k + 1)),
    )
    return accept, bonus
