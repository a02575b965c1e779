"""Pick the Triton kernel or the PyTorch reference for each Domino head operation.

Auto mode (backend=None) uses Triton for CUDA tensors when `triton` imports, and the reference
everywhere else. `DOMINO_KERNELS=torch` forces the reference; `DOMINO_KERNELS=triton` forces
Triton (on CPU that only works under `TRITON_INTERPRET=1`, which is how the CPU tests run it).
A per-call `backend="triton"|"torch"` overrides both.
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import lru_cache

import torch

from . import reference

BACKENDS = ("triton", "torch")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_module():
    """The Triton kernel module, (re)imported so that it matches the current TRITON_INTERPRET."""
    mod = sys.modules.get("kernels._triton")
    if mod is None:
        return importlib.import_module("kernels._triton")
    if mod.INTERPRET != _interpret_requested():
        return importlib.reload(mod)
    return mod


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    choice = backend or os.environ.get("DOMINO_KERNELS") or None
    if choice not in (None, "auto", *BACKENDS):
        raise ValueError(f"unknown kernel backend {choice!r}; expected one of {BACKENDS} or auto")
    if choice in (None, "auto"):
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' requested but triton is not installed (pip install triton)")
        if device.type != "cuda" and not _interpret_requested():
            raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 to run them on CPU")
    return choice


def gru_step_from_table(table, tokens, gh, h, backend: str | None = None):
    """h' [B, G] = GRU(h, input row table[tokens]); gh = h·W_hh^T or None when h == 0."""
    if resolve_backend(h.device, backend) == "triton":
        return triton_module().gru_step_from_table(table, tokens, gh, h)
    return reference.gru_step_from_table(table, tokens, gh, h)


def head_argmax(pre, w2, base, pre2=None, backend: str | None = None, logits_out=None):
    """argmax(base + SiLU(pre [+ pre2])·W2^T) per row, int64 [B]; logits_out [B, V] fp32 optional."""
    dev = (pre if w2 is not None else base).device
    if resolve_backend(dev, backend) == "triton":
        return triton_module().head_argmax(pre, w2, base, pre2, logits_out=logits_out)
    logits = reference.head_logits(pre, w2, base, pre2)
    if logits_out is not None:
        logits_out.copy_(logits)
    return reference.argmax_rows(logits)


def head_sample(pre, w2, base, uniform, temperature, pre2=None, backend: str | None = None, logits_out=None):
    """Inverse-CDF sample of softmax(logits/T) with the given uniforms (T <= 0 rows: argmax).

    Returns (tokens [B] int64, logZ [B] fp32, logits [B, V] fp32)."""
    dev = (pre if w2 is not None else base).device
    if resolve_backend(dev, backend) == "triton":
        return triton_module().head_sample(pre, w2, base, uniform, temperature, pre2, logits_out=logits_out)
    tokens, logz, logits = reference.head_sample(pre, w2, base, uniform, temperature, pre2)
    if logits_out is not None:
        logits_out.copy_(logits)
        logits = logits_out
    return tokens, logz, logits


def argmax_rows(logits, backend: str | None = None):
    """Row argmax of a [N, V] logits matrix (first index on ties)."""
    if resolve_backend(logits.device, backend) == "triton":
        return triton_module().head_argmax(None, None, logits)
    return reference.argmax_rows(logits)


def greedy_accept(drafts, target_top1, num_drafts=None, backend: str | None = None):
    """(accept length [B], bonus token [B]) for greedy chain verification."""
    if resolve_backend(drafts.device, backend) == "triton":
        return triton_module().greedy_accept(drafts, target_top1, num_drafts)
    return reference.greedy_accept(drafts, target_top1, num_drafts)


def greedy_verify(drafts, target_logits, num_drafts=None, backend: str | None = None):
    """Accept length and bonus from the target's logits [B, K+1, V] (argmax fused per vocab tile)."""
    b, k1, v = target_logits.shape
    top1 = argmax_rows(target_logits.reshape(b * k1, v), backend).view(b, k1)
    return greedy_accept(drafts, top1, num_drafts, backend)
