"""CPU facts and the settings that make the engine's small-batch matmuls fast on a CPU.

Speculative decoding pays off only if verifying K+1 tokens costs about as much as decoding one: a
decoding step reads every weight once (memory-bound), and a verify of 9 tokens does 9x the FLOPs on
the same reads. On the 2-core AMD EPYC (AVX2) machines we develop on, MKL's default path for small M
was far from that (Qwen2.5-Coder-0.5B fp32, 2 threads, median of 8, `python -m domino_backend.bench`
machinery):

    forward of M tokens          M=1     M=3     M=9     M=17
    default                      131 ms  345 ms  345 ms  345 ms
    MKL_CBWR=AVX2                131 ms  208 ms  219 ms  268 ms
    + wide weights column-major   95 ms  166 ms  200 ms  247 ms

Two fixes, both numerically plain fp32 GEMMs (no approximation, so output is unchanged in kind):

* MKL picks a slow generic code path on non-Intel CPUs; `MKL_CBWR=AVX2` pins its AVX2 kernels. MKL
  reads the variable at its first BLAS call, so setting it at import of this package works even after
  `import torch`. Only set on AMD CPUs with AVX2 and only if the user has not set it: on Intel CPUs
  MKL already dispatches well, and pinning AVX2 there could hide AVX-512.
* For Linear layers that widen (out_features > in_features: q/gate/up projections, the LM head),
  MKL's kernels are faster with the weight stored column-major ([in, out] contiguous, seen through a
  transposed view, so module code and state-dict names do not change); narrowing layers (down/o
  projections) are faster as stored. Measured for fp32 only, so only fp32 CPU models are changed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch


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


def tune_linear_layout(model: torch.nn.Module) -> int:
    """Store widening fp32 CPU Linear weights column-major (same values, same parameter objects);
    returns how many were changed."""
    changed = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(mod, torch.nn.Linear) or w is None or w.device.type != "cpu":
            continue
        if w.dtype != torch.float32 or mod.out_features <= mod.in_features or not w.is_contiguous():
            continue
        w.data = w.data.t().contiguous().t()
        changed += 1
    return changed
