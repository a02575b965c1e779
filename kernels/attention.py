"""Row-wise attention on the CPU: every non-prefill query row of one sequence's forward, in one
call, each with the bits decoding it alone gives (kernels/cpu/attention.c states the invariant).

`domino_backend.batch_invariant.attend` runs its rows here when `supports` says so, else one SDPA
call per row; both give each row its bits independently of the others, but not the same bits as
each other, so a process uses one of them throughout (the choice depends on the CPU and
DOMINO_CPU_KERNELS=torch only; `kernels.rowops` follows the same choice).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from domino_backend.cpu import cpu_flags

from . import native


@functools.cache
def kernel():
    """The compiled kernels, or None (no AVX512, no compiler, or DOMINO_CPU_KERNELS=torch)."""
    if os.environ.get("DOMINO_CPU_KERNELS", "").lower() == "torch":
        return None
    return native.library()


@functools.cache
def amx() -> bool:
    """Whether the kernel multiplies with AMX-BF16 tiles (the CPU has them and Linux granted this
    process the tile state) rather than AVX512 fp32 FMAs: other bits, the same contract."""
    return kernel() is not None and "amx_bf16" in cpu_flags() and native.tile_state()


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """bf16 CPU tensors with the cache's layout ([KV, capacity, D] with rows of D contiguous)."""
    return (kernel() is not None and query.device.type == "cpu" and query.dtype == key.dtype == value.dtype
            == torch.bfloat16 and key.stride() == value.stride() and key.stride(2) == 1
            and key.stride(1) == key.shape[2] and query.shape[2] % 16 == 0)


def packed_cache(kv_heads: int, capacity: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Room for one layer's keys and values as the AMX path's tile operands (the kernel fills it
    as the cache grows: `attend_rows(..., pack=)`), or None where that path does not run."""
    if not amx() or head_dim % 32 or capacity % 32:
        return None
    return (torch.empty(kv_heads * capacity * head_dim, dtype=torch.bfloat16),
            torch.empty(kv_heads * capacity * head_dim, dtype=torch.bfloat16))


def _operands(query: torch.Tensor, new: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None):
    """query, new keys and values, and mask in the layouts the kernel reads (copies only where
    needed): query rows of [H, D] contiguous, new rows of [KV, D] contiguous at one stride for
    both, mask uint8 contiguous."""
    d = query.shape[2]
    if query.stride(2) != 1 or query.stride(1) != d:
        query = query.contiguous()
    k_new, v_new = new if new is not None else (None, None)
    if new is not None and (k_new.stride() != v_new.stride() or k_new.stride(2) != 1 or k_new.stride(1) != d):
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    return query, (k_new, v_new), None if mask is None else mask.to(torch.uint8).contiguous()


def attend_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past: int,
                mask: torch.Tensor | None, rows: list[int] | None, scale: float, out: torch.Tensor,
                new: tuple[torch.Tensor, torch.Tensor] | None = None,
                pack: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> None:
    """Fill out[i] for i in rows (None: all M). query: [M, H, D] (rows at any stride); out: [M, H, D]
    contiguous; key, value: views of a cache [KV, capacity, D] whose rows past .. past + M - 1 are
    this pass's, or are written first from `new` (keys, values [M, KV, D], rows at any stride);
    mask: [M, M] (draft tree) or None (chain). pack: the cache's packed copy (`packed_cache`) and
    the address of an int64 counting its positions packed so far (the kernel repacks from
    min(count, past) on, so positions from `past` on are always fresh, and sets it to past + M;
    every row is computed, through `attend_batch`); None: the call packs what it reads itself."""
    if pack is not None:
        if rows is not None:
            raise ValueError("a packed cache's call computes every row")
        attend_batch([(query, key, value, past, mask, out, new, pack)], scale)
        return
    m, h, d = query.shape
    query, (k_new, v_new), mask = _operands(query, new, mask)
    idx = None if rows is None else torch.tensor(rows, dtype=torch.int32)
    rc = kernel().attend_rows(query.data_ptr(), query.stride(0), None if new is None else k_new.data_ptr(),
                              None if new is None else v_new.data_ptr(), 0 if new is None else k_new.stride(0),
                              key.data_ptr(), value.data_ptr(), key.stride(0) // d, past, m, h, key.shape[0], d, scale,
                              None if mask is None else mask.data_ptr(), None if idx is None else idx.data_ptr(),
                              0 if idx is None else len(rows), out.data_ptr(), torch.get_num_threads(), int(amx()))
    if rc:
        raise ValueError(f"attention kernel: unsupported shape (heads {h}, kv heads {key.shape[0]}, head dim {d})")


def attend_batch(calls: list[tuple], scale: float) -> None:
    """Several sequences' `attend_rows` in one kernel call, each (query, key, value, past, mask,
    out, new, pack) as there (every row computed; pack required): the same tasks, so the same bits,
    in one parallel region instead of two per sequence and without a Python call per sequence.
    For the AMX path (`amx()`) with the sessions' packed caches."""
    desc, alive = [], []  # alive: copies made here, kept until the call
    for query, key, value, past, mask, out, new, pack in calls:
        m, h, d = query.shape
        query, (k_new, v_new), mask = _operands(query, new, mask)
        alive += [query, k_new, v_new, mask]
        desc += [query.data_ptr(), query.stride(0), *((0, 0, 0) if new is None else (k_new.data_ptr(), v_new.data_ptr(),
                                                                                      k_new.stride(0))),
                 key.data_ptr(), value.data_ptr(), key.stride(0) // d, past, m,
                 0 if mask is None else mask.data_ptr(), out.data_ptr(), pack[0].data_ptr(), pack[1].data_ptr(), pack[2]]
    kv = calls[0][1].shape[0]
    if kernel().attend_batch(len(calls), (ctypes.c_int64 * len(desc))(*desc), h, kv, d, scale,
                             torch.get_num_threads()):
        raise ValueError(f"attention kernel: unsupported shape (heads {h}, kv heads {kv}, head dim {d})")
