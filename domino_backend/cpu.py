"""CPU facts and the settings that make the engine's small-batch matmuls fast on a CPU.

Speculative decoding pays off only if verifying K+1 tokens costs about as much as decoding one: a
decoding step reads every weight once (memory-bound), and a verify of 9 tokens does 9x the FLOPs on
the same reads. MKL's default path for small M is far from that: `python bench/cpu_linear.py`
compares both on the default target's Linear shapes (results: docs/design.md, "CPU speed").

Two settings, both exact GEMMs in the model's dtype (only the summation order differs from MKL's):

* MKL picks a slow generic code path on non-Intel CPUs; `MKL_CBWR=AVX2` pins its AVX2 kernels
  (markedly faster small-M fp32 forwards on AMD EPYCs without AVX-512). MKL reads the
  variable at its first BLAS call, so `build_engine` and the training CLI set it before loading
  anything, even after `import torch`. Only set on AMD CPUs with AVX2 and only if the user has not
  set it. It still
  matters for the GEMMs that are not Linear layers and for training.
* `pack_linears`: every fp32 (or natively supported bf16) CPU `nn.Linear` keeps its weight
  Parameter (same object, same state-dict name, tying kept) and gains a copy reordered once into
  oneDNN's blocked layout, which its forward uses whenever no gradient is needed. Its rows are
  batch-invariant (see `PackedLinear`), which bitwise-lossless verification needs. Costs one
  extra copy of the Linear weights in memory (~2 GB for a 0.5B fp32 model, LM head included).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "vendor_id"):
            flags.update(value.split())
    return frozenset(flags)


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are only fast with native support (AVX512-BF16 or AMX); elsewhere torch emulates
    them, and a 17-token verify costs ~M times a 1-token step instead of about the same."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def pin_mkl_avx2_on_amd() -> bool:
    """Set MKL_CBWR=AVX2 on AMD CPUs with AVX2 unless already set; True when this call set it."""
    flags = cpu_flags()
    if "MKL_CBWR" in os.environ or "AuthenticAMD" not in flags or "avx2" not in flags:
        return False
    os.environ["MKL_CBWR"] = "AVX2"
    return True


PACK_HINT = 9  # batch-size hint for oneDNN's reorder; 9 (a block-8 verify) was as good as any at M = 1..512


def _weight_key(w: torch.Tensor) -> tuple[int, int]:
    """Changes when the weight is replaced or written in place (inference tensors keep no version
    counter; they cannot be written outside inference mode)."""
    return w.data_ptr(), -2 if w.is_inference() else w._version


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(torch.nn.Linear):
    """An `nn.Linear` (swapped in place by `pack_linears`) whose forward multiplies by a oneDNN
    pre-packed copy of its weight. The copy is remade if the weight is replaced or written in place
    (data pointer / version counter changed), and plain `F.linear` runs whenever autograd needs it
    (training passes gradients through the target's LM head) or the module was moved or cast, so
    it is never stale and never wrong.

    Rows are batch-invariant: row i of an M-row product has the same bits for every M (what makes
    verify reproduce plain decoding, see batch_invariant.py). oneDNN computes M >= 2 with one kernel,
    but M = 1 may take another path (for some shapes always, for others on some values only: a
    probe with random rows misses those), so one row runs as two and the first is kept; a one-row
    product is memory-bound, and the second row costs next to nothing."""

    _packed: torch.Tensor
    _packed_key: tuple[int, int]

    def _pack(self) -> None:
        w = self.weight.detach()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_HINT)
        self._packed_key = _weight_key(w)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the opaque oneDNN tensor behind and repack on first use."""
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state["_packed_key"] = (0, -1)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) or not packable(w):
            # autograd, or moved / cast after packing: the plain path is right
            return F.linear(x, w, self.bias)
        if self._packed_key != _weight_key(w):
            self._pack()
        if x.numel() == x.shape[-1]:
            y = _packed_linear(x.reshape(1, -1).expand(2, -1), self._packed, self.bias)
            return y[:1].reshape(*x.shape[:-1], -1)
        return _packed_linear(x, self._packed, self.bias)


def packable(w: torch.Tensor) -> bool:
    """CPU weights oneDNN packs well: fp32, and bf16 where the CPU computes bf16 natively."""
    return w.device.type == "cpu" and (w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and cpu_has_fast_bf16()))


def pack_linears(model: torch.nn.Module) -> int:
    """Turn every packable CPU `nn.Linear` of `model` into a `PackedLinear` (same object, same
    Parameters, same outputs up to summation order); returns how many were changed. Idempotent; a
    no-op without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    changed = 0
    for mod in model.modules():
        if type(mod) is not torch.nn.Linear:  # exact type: subclasses may override forward
            continue
        if not packable(mod.weight) or (mod.bias is not None and mod.bias.dtype != mod.weight.dtype):
            continue
        mod.__class__ = PackedLinear
        mod._pack()
        changed += 1
    return changed
