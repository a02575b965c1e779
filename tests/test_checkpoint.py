"""Checkpoint contract: config.json mapping, the 62-tensor manifest, strict loading, aliases, round trips.

Everything runs on CPU in fp32 with tiny random drafters, except the full-size manifest check, which
builds the Qwen3-8B drafter on the `meta` device (shapes only, no memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from domino_backend.checkpoint import (
    HEAD_TENSORS,
    canonical_name,
    check_compatible,
    load_draft,
    load_state_strict,
    read_state_dict,
    save_draft,
)
from domino_backend.config import CheckpointError, DraftConfig
from domino_backend.draft_model import DraftCache, DraftModel
from tiny import HIDDEN, tiny_draft, tiny_target

# ---------------------------------------------------------------------------------------------
# Full-size config (doc §2.1) and manifest (doc §2.2)

QWEN3_8B_DOMINO_CONFIG = {
    "architectures": ["DFlashDraftModel"],
    "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
    "model_type": "qwen3",
    "block_size": 16,
    "num_target_layers": 36,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 5,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "max_position_embeddings": 40960,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "layer_types": ["full_attention"] * 5,
    "sliding_window": None,
    "use_sliding_window": False,
    "max_window_layers": 5,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "emb_dim": 256,
    "dflash_config": {
        "mask_token_id": 151669,
        "target_layer_ids": [1, 9, 17, 25, 33],
        "projector_type": "domino",
        "pure_draft_prefix_len": 1,
        "emb_dim": 256,
        "gru_hidden_dim": 1024,
        "shift_label": True,
    },
}

_LAYER_SHAPES_8B = {
    "input_layernorm.weight": (4096,),
    "post_attention_layernorm.weight": (4096,),
    "self_attn.q_proj.weight": (4096, 4096),
    "self_attn.k_proj.weight": (1024, 4096),
    "self_attn.v_proj.weight": (1024, 4096),
    "self_attn.o_proj.weight": (4096, 4096),
    "self_attn.q_norm.weight": (128,),
    "self_attn.k_norm.weight": (128,),
    "mlp.gate_proj.weight": (12288, 4096),
    "mlp.up_proj.weight": (12288, 4096),
    "mlp.down_proj.weight": (4096, 12288),
}
MANIFEST_8B = {f"layers.{i}.{k}": v for i in range(5) for k, v in _LAYER_SHAPES_8B.items()}
MANIFEST_8B.update({
    "fc.weight": (4096, 20480),
    "hidden_norm.weight": (4096,),
    "norm.weight": (4096,),
    "prefix_gru.weight_ih_l0": (3072, 4096),
    "prefix_gru.weight_hh_l0": (3072, 1024),
    "embed_proj.0.weight": (256, 5120),
    "embed_proj.2.weight": (151936, 256),
})


def test_8b_config_parses_to_the_documented_values():
    cfg = DraftConfig.from_hf_dict(QWEN3_8B_DOMINO_CONFIG)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 12288, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert (cfg.vocab_size, cfg.gru_hidden_dim, cfg.emb_dim) == (151936, 1024, 256)
    assert cfg.target_layer_ids == [1, 9, 17, 25, 33] and cfg.num_target_layers == 36
    assert cfg.mask_token_id == 151669 and cfg.shift_label is True and cfg.projector_type == "domino"
    # shift_label=true: 16 drafts per block, slot 0 is base-only, correction from slot 1 (doc §1.3/1.4).
    assert (cfg.num_drafts, cfg.slot_offset, cfg.suffix_start) == (16, 0, 1)


def test_8b_config_round_trips_through_to_hf_dict():
    out = DraftConfig.from_hf_dict(QWEN3_8B_DOMINO_CONFIG).to_hf_dict()
    for key, value in QWEN3_8B_DOMINO_CONFIG.items():
        assert out[key] == value, key
    assert DraftConfig.from_hf_dict(out) == DraftConfig.from_hf_dict(QWEN3_8B_DOMINO_CONFIG)


def test_8b_drafter_on_meta_device_has_the_62_tensor_manifest():
    cfg = DraftConfig.from_hf_dict(QWEN3_8B_DOMINO_CONFIG)
    with torch.device("meta"):
        model = DraftModel(cfg)
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())  # nothing was allocated
    assert len(state) == 62
    assert set(state) == set(MANIFEST_8B)
    assert {k: tuple(t.shape) for k, t in state.items()} == MANIFEST_8B
    assert set(HEAD_TENSORS) <= set(state)
    # Parameter totals of doc §1.6: backbone ~1.049 B, head ~55.9 M ("+56M").
    head = sum(state[k].numel() for k in HEAD_TENSORS)
    backbone = sum(t.numel() for t in state.values()) - head
    assert head == 3072 * 4096 + 3072 * 1024 + 256 * 5120 + 151936 * 256 == 55_934_976
    assert 1.048e9 < backbone < 1.050e9


def test_8b_plain_dflash_on_meta_device_has_58_tensors_and_no_head():
    raw = json.loads(json.dumps(QWEN3_8B_DOMINO_CONFIG))
    raw["dflash_config"]["projector_type"] = None
    with torch.device("meta"):
        model = DraftModel(DraftConfig.from_hf_dict(raw))
    assert set(model.state_dict()) == set(MANIFEST_8B) - set(HEAD_TENSORS)


# ---------------------------------------------------------------------------------------------
# Helpers for tiny checkpoints on disk


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab=64, layers=4)


@pytest.fixture()
def draft(target):
    return tiny_draft(target, seed=1)


def _copy_ckpt(src: Path, dst: Path, *, state_fn=None, cfg_fn=None) -> Path:
    """Copy a saved checkpoint, optionally editing its raw tensors and config dict."""
    dst.mkdir(parents=True, exist_ok=True)
    state = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if state_fn is not None:
        state = state_fn(state)
    if cfg_fn is not None:
        cfg_fn(cfg)
    save_file(state, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _assert_same_weights(a: DraftModel, b: DraftModel, dtype=torch.float32):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k].to(dtype), sb[k].to(dtype)), k


def _block_forward(model: DraftModel, seed: int = 0) -> torch.Tensor:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    ctx = torch.randn(2, 5, len(cfg.target_layer_ids) * cfg.hidden_size, generator=g).to(dtype)
    emb = torch.randn(2, cfg.block_size, cfg.hidden_size, generator=g).to(dtype)
    pos = torch.arange(5, 5 + cfg.block_size).expand(2, -1)
    cache = DraftCache(cfg.num_hidden_layers)
    model.extend_contexts([(ctx, cache)])
    return model.forward_block(emb, pos, cache)


# ---------------------------------------------------------------------------------------------
# Round trips


def test_save_writes_public_config_json(draft, tmp_path):
    save_draft(draft, tmp_path)
    raw_text = (tmp_path / "config.json").read_text()
    cfg = json.loads(raw_text)
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert cfg["hidden_act"] == "silu"
    dc = cfg["dflash_config"]
    assert cfg["emb_dim"] == dc["emb_dim"] == draft.cfg.emb_dim
    assert dc["shift_label"] is True and '"shift_label": true' in raw_text
    assert dc["projector_type"] == "domino"
    assert dc["gru_hidden_dim"] == draft.cfg.gru_hidden_dim
    assert dc["target_layer_ids"] == draft.cfg.target_layer_ids
    assert dc["mask_token_id"] == draft.cfg.mask_token_id
    assert cfg["dtype"] == "bfloat16"


def test_save_writes_flat_bf16_tensors_without_prefix(draft, tmp_path):
    save_draft(draft, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == set(draft.state_dict())
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert not any(k.startswith(("model.", "draft_model.")) for k in state)


def test_bf16_round_trip_gives_the_bf16_weights(draft, tmp_path):
    save_draft(draft, tmp_path)
    loaded = load_draft(tmp_path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded.cfg.replace(extra={}) == draft.cfg
    _assert_same_weights(draft, loaded, torch.bfloat16)


def test_fp32_round_trip_gives_identical_weights_and_forward(draft, tmp_path):
    save_draft(draft, tmp_path, dtype=torch.float32)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    loaded = load_draft(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _assert_same_weights(draft, loaded)
    assert torch.equal(_block_forward(draft), _block_forward(loaded))
    z = torch.randn(3, draft.cfg.hidden_size)
    s = torch.randn(3, draft.cfg.gru_hidden_dim)
    assert torch.equal(draft.head_delta(z, s), loaded.head_delta(z, s))


def test_load_with_explicit_dtype_casts(draft, tmp_path):
    save_draft(draft, tmp_path, dtype=torch.float32)
    loaded = load_draft(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


@pytest.mark.parametrize("shift_label", [True, False])
def test_round_trip_preserves_shift_label(target, tmp_path, shift_label):
    draft = tiny_draft(target, shift_label=shift_label)
    save_draft(draft, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dflash_config"]["shift_label"] is shift_label
    assert load_draft(tmp_path).cfg.shift_label is shift_label


def test_domino_architecture_and_causal_v5_alias_are_accepted(draft, tmp_path):
    save_draft(draft, tmp_path / "a", dtype=torch.float32)

    def edit(cfg):
        cfg["architectures"] = ["DominoDraftModel"]
        cfg["dflash_config"]["projector_type"] = "causal_v5"

    loaded = load_draft(_copy_ckpt(tmp_path / "a", tmp_path / "b", cfg_fn=edit))
    assert loaded.has_head
    _assert_same_weights(draft, loaded)


# ---------------------------------------------------------------------------------------------
# Name aliases and shards


@pytest.mark.parametrize(
    "rename",
    [
        pytest.param(lambda k: "model." + k, id="model-prefix"),
        pytest.param(lambda k: "draft_model." + k, id="draft_model-prefix"),
        pytest.param(lambda k: ("logit_head." + k) if k in HEAD_TENSORS else k, id="logit_head-nest"),
        pytest.param(lambda k: ("domino_head." + k) if k in HEAD_TENSORS else k, id="domino_head-nest"),
        pytest.param(lambda k: ("logits_correction." + k) if k in HEAD_TENSORS else k, id="logits_correction-nest"),
        pytest.param(
            lambda k: "model." + (("logits_correction." + k) if k in HEAD_TENSORS else k),
            id="model-prefix-and-nest",
        ),
    ],
)
def test_aliased_tensor_names_load_to_the_same_weights(draft, tmp_path, rename):
    save_draft(draft, tmp_path / "flat", dtype=torch.float32)
    src = _copy_ckpt(
        tmp_path / "flat", tmp_path / "alias", state_fn=lambda st: {rename(k): v for k, v in st.items()}
    )
    raw_names = set(load_file(str(src / "model.safetensors")))
    assert raw_names != set(draft.state_dict())  # the rename really happened
    _assert_same_weights(draft, load_draft(src))


def test_canonical_name_strips_prefix_and_head_nest():
    assert canonical_name("model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"
    assert canonical_name("draft_model.fc.weight") == "fc.weight"
    assert canonical_name("logits_correction.embed_proj.2.weight") == "embed_proj.2.weight"
    assert canonical_name("model.logit_head.prefix_gru.weight_hh_l0") == "prefix_gru.weight_hh_l0"
    assert canonical_name("norm.weight") == "norm.weight"


def test_the_same_tensor_under_two_aliases_is_rejected(draft, tmp_path):
    save_draft(draft, tmp_path / "a")
    bad = _copy_ckpt(
        tmp_path / "a", tmp_path / "b", state_fn=lambda st: {**st, "model.norm.weight": st["norm.weight"].clone()}
    )
    with pytest.raises(CheckpointError, match="appears twice"):
        load_draft(bad)


def test_sharded_checkpoint_with_index_loads(draft, tmp_path):
    save_draft(draft, tmp_path / "single", dtype=torch.float32)
    state = load_file(str(tmp_path / "single" / "model.safetensors"))
    dst = tmp_path / "sharded"
    dst.mkdir()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(dst / fname))
        weight_map.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    assert len(read_state_dict(dst)) == len(state)
    _assert_same_weights(draft, load_draft(dst))


def test_sharded_checkpoint_missing_a_shard_fails(draft, tmp_path):
    save_draft(draft, tmp_path / "single")
    state = load_file(str(tmp_path / "single" / "model.safetensors"))
    dst = tmp_path / "sharded"
    dst.mkdir()
    names = sorted(state)
    save_file({k: state[k] for k in names[::2]}, str(dst / "model-00001-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (dst / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    with pytest.raises((CheckpointError, OSError), match="model-00002-of-00002.safetensors"):
        load_draft(dst)


# ---------------------------------------------------------------------------------------------
# Strict-load failures: each raises CheckpointError with a message naming the problem


@pytest.fixture()
def saved(draft, tmp_path):
    return save_draft(draft, tmp_path / "good")


def _load_edited(saved: Path, tmp_path: Path, **edits):
    return load_draft(_copy_ckpt(saved, tmp_path / "edited", **edits))


@pytest.mark.parametrize("name", HEAD_TENSORS)
def test_missing_head_tensor_fails_strict_load(saved, tmp_path, name):
    with pytest.raises(CheckpointError, match="missing required projector weights") as err:
        _load_edited(saved, tmp_path, state_fn=lambda st: {k: v for k, v in st.items() if k != name})
    assert name in str(err.value)


def test_missing_backbone_tensor_fails(saved, tmp_path):
    with pytest.raises(CheckpointError, match=r"missing \['layers\.1\.mlp\.down_proj\.weight'\]"):
        _load_edited(
            saved, tmp_path, state_fn=lambda st: {k: v for k, v in st.items() if k != "layers.1.mlp.down_proj.weight"}
        )


def test_fc_width_not_matching_target_layer_ids_fails(saved, tmp_path):
    def widen(st):
        st["fc.weight"] = torch.zeros(HIDDEN, 3 * HIDDEN, dtype=torch.bfloat16)
        return st

    with pytest.raises(CheckpointError, match=r"fc\.weight has input width 96.*2 x 32 = 64"):
        _load_edited(saved, tmp_path, state_fn=widen)


def test_fc_width_disagrees_when_config_lists_more_target_layers(saved, tmp_path):
    def three_layers(cfg):
        cfg["dflash_config"]["target_layer_ids"] = [0, 1, 2]

    with pytest.raises(CheckpointError, match="fc.weight has input width 64.*3 x 32 = 96"):
        _load_edited(saved, tmp_path, cfg_fn=three_layers)


def test_wrong_tensor_shape_fails(saved, tmp_path):
    def bad(st):
        st["embed_proj.0.weight"] = torch.zeros(7, 44, dtype=torch.bfloat16)
        return st

    with pytest.raises(CheckpointError, match=r"embed_proj\.0\.weight has shape \(7, 44\)"):
        _load_edited(saved, tmp_path, state_fn=bad)


def test_config_hidden_size_disagreeing_with_tensors_fails(saved, tmp_path):
    def smaller(cfg):
        cfg["hidden_size"] = 16

    with pytest.raises(CheckpointError, match="fc.weight has input width 64"):
        _load_edited(saved, tmp_path, cfg_fn=smaller)


def test_mask_token_id_out_of_vocab_fails(saved, tmp_path):
    def bad(cfg):
        cfg["dflash_config"]["mask_token_id"] = cfg["vocab_size"]

    with pytest.raises(CheckpointError, match=r"mask_token_id 64 is outside the vocabulary \[0, 64\)"):
        _load_edited(saved, tmp_path, cfg_fn=bad)


def test_missing_mask_token_id_fails(saved, tmp_path):
    with pytest.raises(CheckpointError, match="lacks dflash_config.mask_token_id"):
        _load_edited(saved, tmp_path, cfg_fn=lambda cfg: cfg["dflash_config"].pop("mask_token_id"))


def test_target_layer_ids_out_of_range_fails(saved, tmp_path):
    def bad(cfg):
        cfg["dflash_config"]["target_layer_ids"] = [1, 4]  # 4-layer target: valid ids are 0..3

    with pytest.raises(CheckpointError, match=r"target_layer_ids \[4\] out of range for a 4-layer target"):
        _load_edited(saved, tmp_path, cfg_fn=bad)


def test_missing_num_target_layers_fails_cleanly(saved, tmp_path):
    with pytest.raises(CheckpointError, match="num_target_layers"):
        _load_edited(saved, tmp_path, cfg_fn=lambda cfg: cfg.pop("num_target_layers"))


def test_num_target_layers_read_from_dflash_config(saved, tmp_path):
    def move(cfg):
        cfg["dflash_config"]["num_target_layers"] = cfg.pop("num_target_layers")

    assert _load_edited(saved, tmp_path, cfg_fn=move).cfg.num_target_layers == 4


def test_unknown_architecture_fails(saved, tmp_path):
    def bad(cfg):
        cfg["architectures"] = ["LlamaForCausalLM"]

    with pytest.raises(CheckpointError, match=r"\['LlamaForCausalLM'\] is not a DFlash/Domino drafter"):
        _load_edited(saved, tmp_path, cfg_fn=bad)


def test_unknown_projector_type_fails(saved, tmp_path):
    def bad(cfg):
        cfg["dflash_config"]["projector_type"] = "causal_v3"

    with pytest.raises(CheckpointError, match="unsupported dflash_config.projector_type 'causal_v3'"):
        _load_edited(saved, tmp_path, cfg_fn=bad)


def test_non_silu_activation_fails(saved, tmp_path):
    def bad(cfg):
        cfg["hidden_act"] = "gelu"

    with pytest.raises(CheckpointError, match="hidden_act must be 'silu'"):
        _load_edited(saved, tmp_path, cfg_fn=bad)


def test_emb_dim_disagreement_between_top_level_and_dflash_config_fails(saved, tmp_path):
    def bad(cfg):
        cfg["emb_dim"] = cfg["dflash_config"]["emb_dim"] + 1

    with pytest.raises(CheckpointError, match="emb_dim disagrees: top level 11 vs dflash_config 10"):
        _load_edited(saved, tmp_path, cfg_fn=bad)


@pytest.mark.parametrize("where", ["top", "dflash_config"])
def test_emb_dim_in_either_location_is_enough(saved, tmp_path, where):
    def keep_one(cfg):
        if where == "top":
            cfg["dflash_config"].pop("emb_dim")
        else:
            cfg.pop("emb_dim")

    assert _load_edited(saved, tmp_path, cfg_fn=keep_one).cfg.emb_dim == 10


def test_domino_without_emb_dim_fails(saved, tmp_path):
    def bad(cfg):
        cfg.pop("emb_dim")
        cfg["dflash_config"].pop("emb_dim")

    with pytest.raises(CheckpointError, match="needs emb_dim"):
        _load_edited(saved, tmp_path, cfg_fn=bad)


@pytest.mark.parametrize("value", ["true", 1, None])
def test_shift_label_not_a_json_bool_fails(saved, tmp_path, value):
    def bad(cfg):
        cfg["dflash_config"]["shift_label"] = value

    with pytest.raises(CheckpointError, match="shift_label must be a JSON bool"):
        _load_edited(saved, tmp_path, cfg_fn=bad)


@pytest.mark.parametrize("extra", ["lm_head.weight", "embed_tokens.weight", "prefix_gru.bias_ih_l0"])
def test_unexpected_extra_tensor_fails(saved, tmp_path, extra):
    def add(st):
        st[extra] = torch.zeros(3, dtype=torch.bfloat16)
        return st

    with pytest.raises(CheckpointError, match=rf"unexpected \['{extra}'\]"):
        _load_edited(saved, tmp_path, state_fn=add)


def test_folder_without_safetensors_fails(saved, tmp_path):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        load_draft(saved)


def test_folder_without_config_json_fails(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_draft(saved)


def test_invalid_json_config_fails(saved):
    (saved / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_draft(saved)


def test_missing_local_folder_fails(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_draft(tmp_path / "nope")


def test_strict_load_rejects_a_state_dict_missing_a_head_tensor(draft):
    fresh = DraftModel(draft.cfg)
    state = {k: v for k, v in draft.state_dict().items() if k != "embed_proj.2.weight"}
    with pytest.raises(CheckpointError, match="embed_proj.2.weight"):
        load_state_strict(fresh, state)


# ---------------------------------------------------------------------------------------------
# Compatibility with the target


def test_compatible_drafter_passes(target, draft):
    check_compatible(draft.cfg, target.config)
    check_compatible(draft.cfg, target.model.config)


def test_vocab_mismatch_with_target_fails(draft):
    other = tiny_target(vocab=80, layers=4)
    with pytest.raises(CheckpointError, match="draft vocab_size 64 != target vocab_size 80"):
        check_compatible(draft.cfg, other.config)


def test_hidden_mismatch_with_target_fails(target):
    cfg = tiny_draft(target, hidden_size=16, head_dim=4).cfg
    with pytest.raises(CheckpointError, match="draft hidden_size 16 != target hidden_size 32"):
        check_compatible(cfg, target.config)


def test_target_with_fewer_layers_fails(draft):
    shallow = tiny_target(vocab=64, layers=2)
    with pytest.raises(CheckpointError) as err:
        check_compatible(draft.cfg, shallow.config)
    msg = str(err.value)
    assert "built for a 4-layer target, this one has 2" in msg
    assert "target_layer_ids [1, 2] exceed the target's 2 layers" in msg


def test_mask_token_outside_smaller_target_vocab_fails(target):
    cfg = tiny_draft(target).cfg.replace(vocab_size=100, mask_token_id=90)
    with pytest.raises(CheckpointError, match="mask_token_id 90 outside the target vocabulary"):
        check_compatible(cfg, target.config)


# ---------------------------------------------------------------------------------------------
# Plain DFlash checkpoints


def test_plain_dflash_checkpoint_loads_without_head(target, tmp_path):
    plain = tiny_draft(target, projector_type=None)
    assert not hasattr(plain, "prefix_gru") and not hasattr(plain, "embed_proj")
    save_draft(plain, tmp_path, dtype=torch.float32)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["dflash_config"]["projector_type"] is None
    assert not set(HEAD_TENSORS) & set(load_file(str(tmp_path / "model.safetensors")))
    loaded = load_draft(tmp_path)
    assert not loaded.has_head and not hasattr(loaded, "prefix_gru")
    _assert_same_weights(plain, loaded)
    assert torch.equal(_block_forward(plain), _block_forward(loaded))


def test_plain_dflash_config_with_head_tensors_fails(saved, tmp_path):
    def plain(cfg):
        cfg["dflash_config"]["projector_type"] = None

    with pytest.raises(CheckpointError, match="has Domino head tensors but config.json has projector_type null"):
        _load_edited(saved, tmp_path, cfg_fn=plain)


# ---------------------------------------------------------------------------------------------
# The SGLang CPU unit-test config (doc §2.3)

SGLANG_TINY_CONFIG = {
    "architectures": ["DFlashDraftModel"],
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "vocab_size": 31,
    "hidden_act": "silu",
    "num_target_layers": 4,
    "block_size": 16,
    "emb_dim": 5,
    "dflash_config": {
        "mask_token_id": 29,
        "target_layer_ids": [1, 3],
        "projector_type": "domino",
        "pure_draft_prefix_len": 1,
        "emb_dim": 5,
        "gru_hidden_dim": 4,
        "shift_label": True,
    },
}


def test_sglang_tiny_config_round_trips(tmp_path):
    cfg = DraftConfig.from_hf_dict(SGLANG_TINY_CONFIG)
    torch.manual_seed(0)
    model = DraftModel(cfg).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 2 * 11 + 3 + 4
    assert shapes["fc.weight"] == (8, 16)
    assert shapes["prefix_gru.weight_ih_l0"] == (12, 8)
    assert shapes["prefix_gru.weight_hh_l0"] == (12, 4)
    assert shapes["embed_proj.0.weight"] == (5, 12)
    assert shapes["embed_proj.2.weight"] == (31, 5)
    assert shapes["layers.0.self_attn.k_proj.weight"] == (4, 8)

    save_draft(model, tmp_path, dtype=torch.float32)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("hidden_size", "vocab_size", "num_target_layers", "emb_dim", "head_dim"):
        assert raw[key] == SGLANG_TINY_CONFIG[key], key
    assert raw["dflash_config"] == SGLANG_TINY_CONFIG["dflash_config"]
    loaded = load_draft(tmp_path)
    assert loaded.cfg.replace(extra={}) == cfg.replace(extra={})
    _assert_same_weights(model, loaded)
    assert torch.equal(_block_forward(model), _block_forward(loaded))


def test_reduced_draft_vocabulary_round_trips_with_its_d2t_table(tmp_path):
    target = tiny_target("qwen3", vocab=64)
    model = tiny_draft(target, draft_vocab_size=20)
    save_draft(model, tmp_path / "ck", dtype=torch.float32)
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert raw["dflash_config"]["draft_vocab_size"] == 20
    loaded = load_draft(tmp_path / "ck")
    assert torch.equal(loaded.draft_token_ids(), model.draft_token_ids())
    assert loaded.embed_proj[2].weight.shape == (20, model.cfg.emb_dim)
    # A reduced-vocabulary config without its table is rejected.
    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    del state["d2t"]
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="d2t"):
        load_draft(tmp_path / "ck")


@pytest.mark.parametrize("draft_vocab_size", [None, 20])
def test_base_logits_of_the_first_k_slots_do_not_copy_the_lm_head(draft_vocab_size):
    # The engine passes z[:, :K] of an S-slot block: a strided view. Unfolded, F.linear runs a
    # batched matmul over an expanded copy of the whole head weight every round.
    from torch.profiler import ProfilerActivity, profile

    target = tiny_target("qwen3", vocab=64)
    model = tiny_draft(target, draft_vocab_size=draft_vocab_size)
    z = torch.randn(1, 8, HIDDEN)[:, 1:3]
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model.base_logits(z, target.lm_head)
    assert not [e.key for e in prof.key_averages() if e.key in ("aten::bmm", "aten::copy_")]
    assert out.shape == (1, 2, draft_vocab_size or 64)
    assert torch.allclose(out, model.base_logits(z.clone(memory_format=torch.contiguous_format), target.lm_head))
