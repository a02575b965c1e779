"""Build an Engine from user-facing names: a profile or model folder/hub id for the target, and a
drafter checkpoint (or the profile's default drafter)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint import load_draft
from .config import DraftConfig, build_target_layer_ids
from .cpu import cpu_has_fast_bf16, pin_mkl_avx2_on_amd
from .draft_model import DraftModel
from .engine import Engine
from .models import load_target, mask_token_id
from .quant import quantize_linears, quantize_target, resolve_quant
from .settings import EngineSettings
from .target import Target

# The drafter's feature projection stays float: its input is the target's wide feature concat.
DRAFT_FLOAT_LINEARS = ("fc",)
# Trained drafters shipped with the package, by profile (see docs/training.md).
SHIPPED_DRAFTERS = Path(__file__).parent / "drafters_shipped"


def cpu_draft_config(target: Target, mask_token_id: int) -> DraftConfig:
    """The CPU-sized drafter shape used for the embedded profiles: 2 Qwen3-style layers at the
    target's width, fused from 5 target layers, a small Domino head."""
    tc = target.config
    heads = tc.num_attention_heads
    return DraftConfig(
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size // 2,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", heads),
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        vocab_size=target.vocab_size,
        rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-6),
        max_position_embeddings=getattr(tc, "max_position_embeddings", 32768),
        block_size=16,
        num_target_layers=tc.num_hidden_layers,
        target_layer_ids=build_target_layer_ids(tc.num_hidden_layers, 5),
        mask_token_id=mask_token_id,
        gru_hidden_dim=256,
        emb_dim=64,
    )


def random_drafter(target: Target, mask_token_id: int, seed: int = 0) -> DraftModel:
    torch.manual_seed(seed)
    return DraftModel(cpu_draft_config(target, mask_token_id)).eval().requires_grad_(False)


def resolve_dtype(name: str) -> torch.dtype:
    """"auto": bf16 where the CPU has native bf16, else fp32 (the engine runs on the CPU); or an
    explicit torch dtype name."""
    if name == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def build_engine(target: str = "coder", draft: str | None = None, dtype: str | torch.dtype = "auto",
                 threads: int | None = None, settings: EngineSettings = EngineSettings(),
                 quant: str = "auto") -> Engine:
    """target: profile name, HF folder or hub id. draft: checkpoint folder/hub id, "none" (ar/ngram
    only), or None for the profile's shipped drafter (a random-init one when none is shipped yet).
    quant: the Linear layers of the target (and of the drafter) as int8 ("int8"), as loaded ("none"),
    or "auto" (quant.py)."""
    pin_mkl_avx2_on_amd()  # before the first BLAS call (cpu.py)
    if threads:
        torch.set_num_threads(threads)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    model, tokenizer = load_target(target, dtype=dtype)
    int8 = resolve_quant(quant) == "int8"
    if int8:
        quantize_target(model, tokenizer)
    t = Target(model, tokenizer)
    if draft == "none":
        return Engine(t, settings=settings)
    shipped = SHIPPED_DRAFTERS / target
    if draft is not None or shipped.is_dir():
        drafter = load_draft(draft if draft is not None else shipped)
        if int8:  # drafting then costs less; it only proposes, so the output cannot change
            quantize_linears(drafter, skip=DRAFT_FLOAT_LINEARS)
        return Engine(t, drafter, settings)
    mask = mask_token_id(target, t.vocab_size)
    print(
        f"[domino] WARNING: no trained drafter for {target!r}; using a RANDOMLY INITIALISED drafter. "
        "Output stays exactly the target's, but acceptance is ~0, so dflash/domino run slower than ar.",
        file=sys.stderr,
    )
    return Engine(t, random_drafter(t, mask), settings, placeholder_draft=True)
