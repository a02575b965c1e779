"""The decoder's per-row operations on bf16 CPU rows as compiled kernels (kernels/cpu/rowops.c):
residual add + RMSNorm, rotary embedding, SiLU(gate) * up, and the 16-point Hadamard rotation of
an int8 Linear's input (`hadamard16`). Each rounds once to bf16 and gives a
row the same bits in any batch, like the PyTorch ops they replace (which round after every op, so
the two give different bits: a process uses one of them throughout, the kernels where
`kernels.attention.kernel()` runs).

One forward of the default target calls ~50 norms, 48 rotary products and 24 MLP activations, each
several small PyTorch ops; on a 2-core CPU their dispatch costs more than their arithmetic.
"""

from __future__ import annotations

import torch

from . import int8, native
from .attention import kernel


def supports(x: torch.Tensor) -> bool:
    return kernel() is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, RMSNorm(h + delta) * weight) for [N, D] rows (h itself when delta is None)."""
    h, n, d = _rows(h), h.shape[0], h.shape[1]
    out = torch.empty(n, d, dtype=h.dtype)
    total = None
    if delta is not None:
        delta = _rows(delta)
        total = torch.empty(n, d, dtype=h.dtype)
    kernel().add_rms_norm(h.data_ptr(), h.stride(0), None if delta is None else delta.data_ptr(),
                          0 if delta is None else delta.stride(0), None if total is None else total.data_ptr(), n, d,
                          weight.contiguous().data_ptr(), eps, out.data_ptr(), torch.get_num_threads())
    return (h if total is None else total), out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place: x [N, heads, D] (rows at any stride, heads contiguous) times the rotary angles of
    each row (cos, sin [N, D]); returns x."""
    n, heads, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d:
        raise ValueError("rope_ needs each row's heads contiguous")
    cos, sin = cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous()
    kernel().rope(x.data_ptr(), x.stride(0), n, heads, d, cos.data_ptr(), sin.data_ptr(), torch.get_num_threads())
    return x


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for [N, I] rows (each at any row stride)."""
    gate, up = _rows(gate), _rows(up)
    n, d = gate.shape
    out = torch.empty(n, d, dtype=gate.dtype)
    kernel().silu_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), n, d, out.data_ptr(), d,
                      torch.get_num_threads())
    return out


def hadamard16_reference(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal 16-point Hadamard transform of each block of 16 channels of x [..., K] (K a
    multiple of 16), computed in fp32 and returned in x's dtype. Butterfly stages h = 1, 2, 4, 8:
    channels i and i + h of each 2h-group become (a + b, a - b), then * 1/4 (exact). For bf16 rows
    the kernel (`hadamard16`) gives the same bits: the same operations in the same order."""
    k = x.shape[-1]
    y = x.float().reshape(-1, k // 16, 16)
    for h in (1, 2, 4, 8):
        pairs = y.reshape(-1, k // 16, 16 // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), -2)
    return (y.reshape(x.shape) * 0.25).to(x.dtype)


def hadamard16(x: torch.Tensor) -> torch.Tensor:
    """`hadamard16_reference` of [N, K] rows (same bits): the kernel for bf16 CPU rows where the
    AVX512 kernels run, the AVX2 library's for fp32 CPU rows, else the reference."""
    if x.dim() != 2 or x.device.type != "cpu":
        return hadamard16_reference(x)
    if supports(x):
        fn = kernel().hadamard16
    elif x.dtype == torch.float32 and (avx2 := native.library_avx2()) is not None:
        fn = avx2.hadamard16_f32
    else:
        return hadamard16_reference(x)
    x = _rows(x)
    n, k = x.shape
    out = torch.empty(n, k, dtype=x.dtype)
    fn(x.data_ptr(), x.stride(0), n, k, out.data_ptr(), k, torch.get_num_threads())
    return out


def layer_attn_in(h: torch.Tensor, delta: torch.Tensor | None, norm, qkv: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer up to attention in one call (kernels/cpu/layer.c): h + delta, its RMSNorm,
    the fused int8 q/k/v projection (`qkv`: `int8.descriptor`) and rotary on q and k. Returns
    (h + delta, [N, (heads + 2 kv_heads) * head_dim] q/k/v rows); the same bits as the
    step-by-step ops."""
    n, hidden = h.shape
    cos, sin = cos.to(h.dtype).contiguous(), sin.to(h.dtype).contiguous()
    h_sum = h if delta is None else torch.empty_like(h)
    out = torch.empty(n, (heads + 2 * kv_heads) * head_dim, dtype=h.dtype)
    kernel().layer_attn_in(h.data_ptr(), None if delta is None else delta.data_ptr(), h_sum.data_ptr(), n, hidden,
                           norm.weight.data_ptr(), norm.variance_epsilon, qkv.data_ptr(), cos.data_ptr(),
                           sin.data_ptr(), heads, kv_heads, head_dim, out.data_ptr(), torch.get_num_threads(),
                           int(int8.kernel().amx))
    return h_sum, out


def layer_mlp(h: torch.Tensor, attn: torch.Tensor, o_proj: torch.Tensor, norm, gate_up: torch.Tensor,
              down: torch.Tensor, down_hadamard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of a decoder layer in one call: h + o_proj(attn), its RMSNorm, the fused int8
    gate/up, SiLU(gate) * up (then `hadamard16` when down_hadamard) and down_proj (each Linear an
    `int8.descriptor`). Returns (h + o_proj(attn), the MLP's output)."""
    n, hidden = h.shape
    h_sum, delta = torch.empty_like(h), torch.empty_like(h)
    kernel().layer_mlp(h.data_ptr(), attn.data_ptr(), h_sum.data_ptr(), n, hidden, o_proj.data_ptr(),
                       norm.weight.data_ptr(), norm.variance_epsilon, gate_up.data_ptr(), down.data_ptr(),
                       int(down_hadamard), delta.data_ptr(), torch.get_num_threads(), int(int8.kernel().amx))
    return h_sum, delta
