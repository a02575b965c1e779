"""Load, validate and save drafters in the public DFlash/Domino layout (safetensors + config.json).

The on-disk contract: flat tensor names (`layers.{i}...`, `fc.weight`, `hidden_norm.weight`,
`norm.weight`, and for Domino `prefix_gru.weight_{ih,hh}_l0`, `embed_proj.{0,2}.weight`), no
embedding, no LM head, no biases. Loading is strict: every expected tensor must be present with
the right shape, and nothing unknown may be left over. Names written by other tools are mapped:
a leading `model.` / `draft_model.`, head tensors nested under `logit_head.`, `domino_head.` or
speculators' `logits_correction.`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import CheckpointError, DraftConfig, text_config
from .draft_model import DraftModel

HEAD_TENSORS = ("prefix_gru.weight_ih_l0", "prefix_gru.weight_hh_l0", "embed_proj.0.weight", "embed_proj.2.weight")
_PREFIXES = ("model.", "draft_model.")
_HEAD_NESTS = ("logit_head.", "domino_head.", "logits_correction.")


def canonical_name(name: str) -> str:
    stripped = True
    while stripped:  # e.g. "draft_model.model.layers.0..." from nested wrappers
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    for nest in _HEAD_NESTS:
        if name.startswith(nest):
            name = name[len(nest):]
    return name


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(path / f)).items():
            key = canonical_name(name)
            if key in state:
                raise CheckpointError(f"tensor {key!r} appears twice in {path} (aliases {name!r})")
            state[key] = t
    return state


def resolve_path(path_or_id: str | Path) -> Path:
    """A local folder, or a Hugging Face hub id fetched with huggingface_hub (needs network)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/", "~")):
        raise CheckpointError(f"drafter checkpoint {path_or_id!r} is not a folder with config.json + safetensors")
    from huggingface_hub import snapshot_download  # only for hub ids

    return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors"]))


def load_draft(path_or_id: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> DraftModel:
    path = resolve_path(path_or_id)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    cfg = DraftConfig.from_hf_dict(raw)
    state = read_state_dict(path)
    model = DraftModel(cfg)
    load_state_strict(model, state)
    model.to(device=device, dtype=dtype or next(t.dtype for t in state.values() if t.is_floating_point()))
    return model.eval().requires_grad_(False)


def load_state_strict(model: DraftModel, state: dict[str, torch.Tensor]) -> None:
    cfg = model.cfg
    expected = model.state_dict()
    if cfg.has_head:
        missing_head = [k for k in HEAD_TENSORS if k not in state]
        if missing_head:
            raise CheckpointError(
                f"projector_type {cfg.projector_type!r} but missing required projector weights {missing_head}"
            )
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[1] != len(cfg.target_layer_ids) * cfg.hidden_size:
        raise CheckpointError(
            f"fc.weight has input width {fc.shape[1]}, expected len(target_layer_ids) x hidden_size = "
            f"{len(cfg.target_layer_ids)} x {cfg.hidden_size} = {len(cfg.target_layer_ids) * cfg.hidden_size}"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if unexpected and not cfg.has_head and any(k in state for k in HEAD_TENSORS):
        raise CheckpointError("checkpoint has Domino head tensors but config.json has projector_type null")
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match its config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(t.shape)}, config implies {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True)
    if cfg.has_head:
        model.prefix_gru.flatten_parameters()


def save_draft(model: DraftModel, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write config.json + model.safetensors in the public layout (flat names, no prefix)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.cfg.to_hf_dict()
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def check_compatible(cfg: DraftConfig, target_cfg) -> None:
    """Raise CheckpointError if the drafter cannot run on this target (HF PretrainedConfig)."""
    tc = text_config(target_cfg)
    problems = []
    if cfg.hidden_size != tc.hidden_size:
        problems.append(f"draft hidden_size {cfg.hidden_size} != target hidden_size {tc.hidden_size}")
    if cfg.vocab_size != tc.vocab_size:
        problems.append(f"draft vocab_size {cfg.vocab_size} != target vocab_size {tc.vocab_size}")
    if cfg.num_target_layers != tc.num_hidden_layers:
        problems.append(f"drafter was built for a {cfg.num_target_layers}-layer target, this one has {tc.num_hidden_layers}")
    if max(cfg.target_layer_ids) >= tc.num_hidden_layers:
        problems.append(f"target_layer_ids {cfg.target_layer_ids} exceed the target's {tc.num_hidden_layers} layers")
    if not 0 <= cfg.mask_token_id < tc.vocab_size:
        problems.append(f"mask_token_id {cfg.mask_token_id} outside the target vocabulary")
    if problems:
        raise CheckpointError("drafter does not match the target: " + "; ".join(problems))
