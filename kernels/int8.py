"""Weight-and-activation int8 Linear for CPUs: the quantized target's GEMM.

Weights: int8 with one fp32 scale per output channel (symmetric absmax). Activations: each row
quantized to int8 by its own absmax when the layer runs (dynamic, per row). The int32 product is
exact and the epilogue is the same fp32 sequence for every row:

    y[m, n] = ((float(sum_k xq[m, k] * wq[n, k]) * x_scale[m]) * w_scale[n]) + bias[n]

so row m's bits depend on row m alone, whatever else shares the call (any M, any thread count):
a verify of K + 1 rows reproduces K + 1 one-token decoding steps exactly.

Implementations with identical bits: `reference_linear` (torch._int_mm, portable) and the C
kernels, on the same pre-packed weights: `kernels/cpu/w8a8.c` (AMX tiles or AVX512-VNNI
`vpdpbusd`) and, on CPUs with AVX2 but no AVX512, `kernels/cpu/avx2/w8a8.c` (int16 `vpmaddwd`).
Each reads a weight once for all M rows (so with AMX a 17-row verify costs about what one row
does; AVX2's multiplies are slower, there a 9-row verify costs about three rows). The kernels are
built and loaded by `kernels.native`.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch

from domino_backend.cpu import cpu_flags

from . import native

BLOCK = 32  # output channels per packed block (two zmm registers of int32 lanes)


@dataclass
class QuantWeight:
    """An int8 Linear weight: `q` [N, K] int8, `scale` [N] fp32, plus the kernel's packed copy."""

    q: torch.Tensor
    scale: torch.Tensor
    packed: torch.Tensor | None = None  # [ceil(N/32) * 32 * K] int8, the kernel's layout
    colsum: torch.Tensor | None = None  # [ceil(N/32) * 32] int32, sum_k q[n, k]
    scale_pad: torch.Tensor | None = None  # scale zero-padded to the packed channel count


def quantize_weight(w: torch.Tensor) -> QuantWeight:
    """Per-output-channel symmetric int8 of a [N, K] float weight (round half to even)."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantWeight(q.contiguous(), scale.contiguous())


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (int8 [M, K], fp32 scale [M]); each row by its own absmax."""
    x = x.float()
    scale = x.abs().amax(1).clamp_min(1e-8) / 127
    return torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def reference_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[M, K] -> [M, N] in x's dtype, with the kernel's bits (same integer sum, same fp32 epilogue)."""
    xq, xs = quantize_rows(x)
    y = torch._int_mm(xq, w.q.t()).float() * xs[:, None] * w.scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def pack(w: QuantWeight) -> QuantWeight:
    """Fill in the kernel's layout: [N/32][K/4][32][4] int8, zero rows padding N to a multiple of 32."""
    n, k = w.q.shape
    if k % 4:
        raise ValueError(f"int8 kernel needs in_features divisible by 4, got {k}")
    n_pad = -(-n // BLOCK) * BLOCK
    q = torch.zeros(n_pad, k, dtype=torch.int8)
    q[:n] = w.q
    w.packed = q.view(n_pad // BLOCK, BLOCK, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(-1)
    w.colsum = q.sum(1, dtype=torch.int32)
    w.scale_pad = torch.zeros(n_pad)
    w.scale_pad[:n] = w.scale
    return w


def concat(weights: list[QuantWeight]) -> QuantWeight:
    """One weight whose output channels are `weights`' in order, packed; each of `weights` then
    holds views into it (no copy kept). Their channel counts must be multiples of BLOCK, so that
    the packed blocks of the whole are the parts' blocks end to end."""
    if any(w.q.shape[0] % BLOCK or w.q.shape[1] != weights[0].q.shape[1] for w in weights):
        raise ValueError(f"concat needs equal in_features and out_features divisible by {BLOCK}")
    whole = pack(QuantWeight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights])))
    row = 0
    for w in weights:
        n, k = w.q.shape
        w.q, w.scale = whole.q[row:row + n], whole.scale[row:row + n]
        w.packed, w.colsum = whole.packed[row * k:(row + n) * k], whole.colsum[row:row + n]
        w.scale_pad = whole.scale_pad[row:row + n]
        row += n
    return whole


def descriptor(w: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The six int64 values kernels/cpu/layer.c reads a Linear from (addresses of the packed
    weights, column sums, scales and bias or 0, then out and in features). The tensors must stay
    alive as long as the descriptor is used."""
    n, k = w.q.shape
    return torch.tensor([w.packed.data_ptr(), w.colsum.data_ptr(), w.scale_pad.data_ptr(),
                         0 if bias is None else bias.data_ptr(), n, k], dtype=torch.int64)


def cpu_has_vnni() -> bool:
    return "avx512_vnni" in cpu_flags() and "avx512bw" in cpu_flags()


@functools.cache
def kernels() -> tuple[ctypes.CDLL, ...]:
    """Every compiled int8 GEMM this CPU runs, the fastest first: the AVX512 library (AMX or VNNI)
    where the CPU has AVX512-VNNI, then the AVX2 one (`kernels.native`). Each has `w8a8_linear`,
    `isa` ("avx512" or "avx2") and `amx` (whether its AMX path may run)."""
    found = []
    if cpu_has_vnni() and (dll := native.library()) is not None:
        dll.isa, dll.amx = "avx512", "amx_int8" in cpu_flags() and native.tile_state()
        found.append(dll)
    if (dll := native.library_avx2()) is not None:
        dll.isa, dll.amx = "avx2", False
        found.append(dll)
    return tuple(found)


def kernel() -> ctypes.CDLL | None:
    """The int8 GEMM the model runs (the first of `kernels()`), or None when this CPU has neither
    AVX512-VNNI nor AVX2, none builds, or DOMINO_INT8_KERNEL=torch asks for the reference."""
    if os.environ.get("DOMINO_INT8_KERNEL", "").lower() == "torch":
        return None
    return next(iter(kernels()), None)


def kernel_linear(lib: ctypes.CDLL, x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None,
                  amx: bool = True) -> torch.Tensor:
    """A C kernel (one of `kernels()`) on a [M, K] fp32/bf16 tensor; same bits as
    `reference_linear`. The AVX512 library uses AMX tiles where the CPU has them and K is a
    multiple of 64 (unless amx=False), else AVX512-VNNI."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"int8 kernel takes fp32 or bf16 activations, not {x.dtype}")
    x = x.contiguous()
    m, k = x.shape
    n = w.q.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    lib.w8a8_linear(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, w.packed.data_ptr(), w.colsum.data_ptr(),
                    w.scale_pad.data_ptr(), None if bias is None else bias.data_ptr(), n, y.data_ptr(),
                    int(y.dtype == torch.bfloat16), torch.get_num_threads(),
                    int(amx and lib.amx and k % 64 == 0))
    return y
