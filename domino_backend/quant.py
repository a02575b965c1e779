"""The quantized CPU target: every Linear layer (LM head included) as int8 weights times int8 rows.

Decoding one token reads every weight once, so on a CPU the target's speed is its weight bytes over
the memory bandwidth; int8 halves bf16's bytes. Speculative decoding also needs a verify of K + 1
rows to cost about what one row does, and to give each row the same bits as decoding it alone.
`kernels.int8` provides both: an AMX (or AVX512-VNNI) int8 GEMM whose time is flat from M = 1 to
32, with per-row activation quantization and an exact integer sum, so rows are independent
bitwise (`python bench/quant_linear.py` measures it against bf16 per M).

`--quant int8` is lossless with respect to the quantized target: every method's output equals
plain decoding of the same int8 model. It is a different model from the bf16 one, slightly:
`python bench/quant_quality.py` measures perplexity and greedy agreement against bf16.
`auto` picks int8 where the compiled kernel runs (CPUs with AVX512-VNNI and a C compiler) and
leaves the weights as they are elsewhere, where int8 would only be slower.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import int8

QUANT_MODES = ("auto", "int8", "none")


class Int8Linear(nn.Module):
    """Drop-in for an inference-only `nn.Linear`: int8 weight (one scale per output channel), fp32
    bias, activations quantized per row when it runs. Output in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qweight = int8.pack(int8.quantize_weight(linear.weight))
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Int8Linear is inference-only (no gradients through a quantized target)")
        rows = x.reshape(-1, self.in_features)
        lib = int8.kernel()
        if lib is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            y = int8.kernel_linear(lib, rows, self.qweight, self.bias)
        else:
            y = int8.reference_linear(rows, self.qweight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def resolve_quant(mode: str) -> str:
    """The meaning of `auto`: int8 where the compiled kernel runs, else none."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose from {', '.join(QUANT_MODES)}")
    if mode == "auto":
        return "int8" if int8.kernel() is not None else "none"
    return mode


def quantize_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` (or subclass, e.g. `PackedLinear`) of `model` by an `Int8Linear`,
    in place; returns how many. The float weights are dropped unless something else (a tied
    embedding) still holds them."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear)]
    for parent, name, child in swaps:
        setattr(parent, name, Int8Linear(child))
    return len(swaps)


def weight_format(model: nn.Module) -> str:
    """"int8" when the model's Linear layers are quantized, else "none"."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else "none"
