"""Export a drafter so SGLang 0.5.23's DFLASH+Domino path loads it unchanged, and check it.

Our checkpoints already use the public layout (flat tensor names, `dflash_config`, `emb_dim` at
both levels). SGLang is narrower than our loader in a few places, which `sglang_problems` checks
and `export_for_sglang` fixes or refuses:
- `projector_type` must be exactly "domino" (0.5.23 no longer accepts the legacy "causal_v5");
- `pure_draft_prefix_len` must be 1; `shift_label` a JSON bool; `block_size` > 1;
- every Domino weight must be BF16 at run time (`validate_domino_runtime`): we write bf16;
- no tensor name may carry a prefix other than `model.` (SGLang silently skips unknown names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint import HEAD_TENSORS, load_draft, save_draft
from ..config import CheckpointError
from ..draft_model import DraftModel


def sglang_problems(cfg: dict[str, Any]) -> list[str]:
    """Reasons SGLang 0.5.23 would refuse this draft config.json (empty when compatible)."""
    problems = []
    dc = cfg.get("dflash_config") or {}
    archs = cfg.get("architectures") or []
    if archs != ["DFlashDraftModel"]:
        problems.append(f"architectures must be ['DFlashDraftModel'] for SGLang's model registry, got {archs}")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act must be silu, got {cfg.get('hidden_act')!r}")
    projector = dc.get("projector_type", cfg.get("projector_type"))
    if projector is not None:
        if projector != "domino":
            problems.append(f"projector_type must be 'domino' (SGLang 0.5.23), got {projector!r}")
        if not isinstance(dc.get("shift_label", cfg.get("shift_label")), bool):
            problems.append("dflash_config.shift_label must be a JSON bool")
        if dc.get("pure_draft_prefix_len", cfg.get("pure_draft_prefix_len")) != 1:
            problems.append("SGLang requires dflash_config.pure_draft_prefix_len == 1")
        if dc.get("gru_hidden_dim") is None:
            problems.append("dflash_config.gru_hidden_dim is required")
        if dc.get("emb_dim", cfg.get("emb_dim")) is None:
            problems.append("emb_dim is required (dflash_config or top level)")
        block = dc.get("block_size", cfg.get("block_size"))
        if block is not None and int(block) <= 1:
            problems.append(f"block_size must be > 1, got {block}")
    if dc.get("draft_vocab_size") is not None:
        problems.append("a reduced draft vocabulary (draft_vocab_size / d2t) is ours only: SGLang needs the full target vocabulary")
    mask = dc.get("mask_token_id", cfg.get("mask_token_id"))
    if mask is None or isinstance(mask, bool) or not isinstance(mask, int) or mask < 0:
        problems.append(f"dflash_config.mask_token_id must be a non-negative int, got {mask!r}")
    return problems


def tensor_problems(path: str | Path) -> list[str]:
    """Checks on the safetensors files: names SGLang resolves, Domino tensors present and bf16."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    has_head = (cfg.get("dflash_config") or {}).get("projector_type") is not None
    names: dict[str, torch.dtype] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                names[k.removeprefix("model.")] = sf.get_slice(k).get_dtype()
    problems = []
    allowed = ("layers.", "fc.", "hidden_norm.", "norm.", "prefix_gru.", "embed_proj.")
    odd = sorted(k for k in names if not k.startswith(allowed))
    if odd:
        problems.append(f"tensor names SGLang would silently skip: {odd[:6]}")
    if has_head:
        missing = [k for k in HEAD_TENSORS if k not in names]
        if missing:
            problems.append(f"missing Domino tensors {missing}")
        not_bf16 = [k for k in HEAD_TENSORS if k in names and names[k] not in ("BF16", torch.bfloat16)]
        if not_bf16:
            problems.append(f"Domino tensors must be bf16 for SGLang, got other dtypes for {not_bf16}")
    return problems


def export_for_sglang(src: str | Path | DraftModel, out: str | Path) -> Path:
    """Write `out/config.json` + `out/model.safetensors` (bf16) that SGLang 0.5.23 serves as DFLASH."""
    model = src if isinstance(src, DraftModel) else load_draft(src, dtype=torch.float32)
    cfg = model.cfg
    if getattr(cfg, "draft_vocab_size", None) is not None:
        raise CheckpointError("SGLang needs a full-vocabulary drafter; this one has draft_vocab_size "
                              f"{cfg.draft_vocab_size} (d2t)")
    if cfg.has_head and cfg.pure_draft_prefix_len != 1:
        raise CheckpointError(f"SGLang supports pure_draft_prefix_len 1 only, this drafter has {cfg.pure_draft_prefix_len}")
    out = save_draft(model, out, dtype=torch.bfloat16)
    hf = json.loads((out / "config.json").read_text())
    hf["architectures"] = ["DFlashDraftModel"]
    if cfg.has_head:
        hf["dflash_config"]["projector_type"] = "domino"  # "causal_v5" is the same head under its old name
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    problems = sglang_problems(hf) + tensor_problems(out)
    if problems:
        raise CheckpointError("export is not SGLang-compatible: " + "; ".join(problems))
    return out


def parse_with_sglang(path: str | Path):
    """Run SGLang's own `parse_dflash_draft_config` on a checkpoint's config.json (needs the
    pinned SGLang files; see `domino_backend.sglang.upstream`). Returns SGLang's DFlashDraftConfig."""
    from .upstream import dflash_config_parser

    cfg = json.loads((Path(path) / "config.json").read_text())
    return dflash_config_parser()(draft_hf_config=cfg)
