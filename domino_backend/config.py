"""Draft-model configuration in the public DFlash/Domino `config.json` layout.

One dataclass holds everything the drafter needs; `from_hf_dict` / `to_hf_dict` map it to the
Hugging Face config that the published `Huang2020/*-Domino-*` drafters and SGLang 0.5.23 read
(`dflash_config` sub-dict, `emb_dim` duplicated at top level, `DFlashDraftModel` architecture).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DOMINO_PROJECTORS = ("domino", "causal_v5")  # "causal_v5" is the fork's legacy alias
ARCHITECTURES = ("DFlashDraftModel", "DominoDraftModel")


class CheckpointError(ValueError):
    """A drafter checkpoint or config that cannot be used (bad layout, shapes or target mismatch)."""


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash default: evenly spaced from layer 1 to layer L-3 (36 layers, 5 -> [1, 9, 17, 25, 33])."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    span = end - start
    return [int(round(start + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]



def text_config(cfg):
    """The language model's config of a Hugging Face config (multimodal configs nest it)."""
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

@dataclass
class DraftConfig:
    # Draft transformer (Qwen3-style layers). hidden_size must equal the target's: the drafter
    # reads the target's embeddings and LM head.
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    # DFlash block drafting.
    block_size: int = 16
    num_target_layers: int = 36
    target_layer_ids: list[int] = field(default_factory=lambda: [1, 9, 17, 25, 33])
    mask_token_id: int = 151669
    # Domino head; projector_type None means a plain DFlash drafter (no head tensors).
    projector_type: str | None = "domino"
    shift_label: bool = True
    pure_draft_prefix_len: int = 1
    gru_hidden_dim: int = 1024
    emb_dim: int = 256
    # Reduced draft vocabulary (our extension, absent from public checkpoints): the drafter scores
    # only these many target tokens, listed by the `d2t` tensor (token = index + d2t[index], the
    # EAGLE-3/TRT-LLM convention). None = the full target vocabulary, as SGLang requires.
    draft_vocab_size: int | None = None
    # Pass-through keys (bos/eos ids, dtype...) kept so a load/save round trip is lossless.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.projector_type is not None and self.projector_type not in DOMINO_PROJECTORS:
            raise CheckpointError(
                f"unsupported dflash_config.projector_type {self.projector_type!r}; "
                f"expected null (plain DFlash) or one of {DOMINO_PROJECTORS}"
            )
        if not isinstance(self.shift_label, bool):
            raise CheckpointError(f"dflash_config.shift_label must be a JSON bool, got {self.shift_label!r}")
        if self.block_size < 2:
            raise CheckpointError(f"block_size must be >= 2, got {self.block_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise CheckpointError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        if not self.target_layer_ids:
            raise CheckpointError("dflash_config.target_layer_ids is empty")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad:
            raise CheckpointError(
                f"target_layer_ids {bad} out of range for a {self.num_target_layers}-layer target"
            )
        if self.has_head and self.pure_draft_prefix_len < 1:
            raise CheckpointError("pure_draft_prefix_len must be >= 1")
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise CheckpointError(f"draft_vocab_size {self.draft_vocab_size} must be in [1, {self.vocab_size}]")
        if self.has_head and self.pure_draft_prefix_len >= self.num_drafts:
            raise CheckpointError(
                f"pure_draft_prefix_len {self.pure_draft_prefix_len} leaves no corrected slot "
                f"in a block of {self.block_size}"
            )

    @property
    def has_head(self) -> bool:
        return self.projector_type is not None

    @property
    def slot_offset(self) -> int:
        """Block slot that predicts the first draft token: 0 with shift_label, else 1 (slot 0 = anchor)."""
        return 0 if self.shift_label else 1

    @property
    def num_drafts(self) -> int:
        """Draft tokens per block (HF reference semantics): 16 with shift_label, 15 without."""
        return self.block_size - self.slot_offset

    @property
    def scored_vocab(self) -> int:
        """Rows of the drafter's logits (base and head delta)."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def suffix_start(self) -> int:
        """First block slot whose logits get the head's correction (1 with shift, 2 without)."""
        return self.slot_offset + self.pure_draft_prefix_len

    # -- Hugging Face config.json mapping ------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "DraftConfig":
        cfg = dict(cfg)
        dc = dict(cfg.pop("dflash_config", None) or {})
        archs = cfg.get("architectures") or []
        if archs and not any(a in ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"config.json architectures {archs} is not a DFlash/Domino drafter; expected one of {ARCHITECTURES}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act must be 'silu', got {cfg['hidden_act']!r}")
        projector = dc.get("projector_type")
        # emb_dim lives in both places in public checkpoints; prefer dflash_config, require agreement.
        emb_top, emb_dc = cfg.get("emb_dim"), dc.get("emb_dim")
        if emb_top is not None and emb_dc is not None and emb_top != emb_dc:
            raise CheckpointError(f"emb_dim disagrees: top level {emb_top} vs dflash_config {emb_dc}")
        emb_dim = emb_dc if emb_dc is not None else emb_top
        if projector is not None and (emb_dim is None or dc.get("gru_hidden_dim") is None):
            raise CheckpointError("a Domino drafter needs emb_dim and dflash_config.gru_hidden_dim")
        required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise CheckpointError(f"config.json lacks {missing}")
        if "mask_token_id" not in dc:
            raise CheckpointError("config.json lacks dflash_config.mask_token_id")
        n_layers = cfg.get("num_target_layers", dc.get("num_target_layers"))
        if n_layers is None:
            raise CheckpointError("config.json lacks num_target_layers (top level or dflash_config)")
        layer_ids = dc.get("target_layer_ids")
        if layer_ids is None:  # absent: the DFlash default spacing; present but empty is an error below
            layer_ids = build_target_layer_ids(n_layers, cfg["num_hidden_layers"])
        known = {
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta",
            "max_position_embeddings", "block_size", "num_target_layers", "emb_dim",
        }
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 1_000_000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 40960),
            block_size=cfg.get("block_size", dc.get("block_size", 16)),
            num_target_layers=n_layers,
            target_layer_ids=list(layer_ids),
            mask_token_id=dc["mask_token_id"],
            projector_type=projector,
            shift_label=dc.get("shift_label", False),  # the reference's default when the key is absent
            pure_draft_prefix_len=dc.get("pure_draft_prefix_len", 1),
            gru_hidden_dim=dc.get("gru_hidden_dim", 1024),
            emb_dim=emb_dim if emb_dim is not None else 256,
            draft_vocab_size=dc.get("draft_vocab_size"),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    def to_hf_dict(self) -> dict[str, Any]:
        n = self.num_hidden_layers
        cfg: dict[str, Any] = {
            "architectures": ["DFlashDraftModel"],
            "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "layer_types": ["full_attention"] * n,
            "max_window_layers": n,
            "sliding_window": None,
            "use_sliding_window": False,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
        }
        cfg.update(self.extra)
        cfg.update(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=n,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            block_size=self.block_size,
            num_target_layers=self.num_target_layers,
        )
        dc: dict[str, Any] = {
            "mask_token_id": self.mask_token_id,
            "target_layer_ids": list(self.target_layer_ids),
            "projector_type": self.projector_type,
            "shift_label": self.shift_label,
        }
        if self.has_head:
            cfg["emb_dim"] = self.emb_dim
            dc.update(
                pure_draft_prefix_len=self.pure_draft_prefix_len,
                emb_dim=self.emb_dim,
                gru_hidden_dim=self.gru_hidden_dim,
            )
        if self.draft_vocab_size is not None:
            dc["draft_vocab_size"] = self.draft_vocab_size
        cfg["dflash_config"] = dc
        return cfg

    def replace(self, **changes: Any) -> "DraftConfig":
        d = asdict(self)
        d.update(changes)
        return DraftConfig(**d)
