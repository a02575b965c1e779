"""Tiny random targets and drafters that the tests build themselves (fp32, CPU, milliseconds)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from domino_backend.config import DraftConfig
from domino_backend.draft_model import DraftModel
from domino_backend.target import Target

HIDDEN = 32


def tiny_target(family: str = "qwen3", vocab: int = 64, layers: int = 4, seed: int = 0, peak: float = 1.0,
                head_dim: int = 8) -> Target:
    """A random causal LM. `peak` scales the LM head: larger = more confident, more repetitive text.
    head_dim 16 or more lets bf16 attention run the CPU kernel (kernels.attention)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
        eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(family)
    with torch.no_grad():
        model.lm_head.weight.mul_(peak)
    model.eval().requires_grad_(False)
    return Target(model, tokenizer=None)


def tiny_draft_config(target: Target, **overrides) -> DraftConfig:
    n = target.num_layers
    cfg = dict(
        hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=target.vocab_size, max_position_embeddings=256,
        block_size=8, num_target_layers=n, target_layer_ids=[1, n - 2], mask_token_id=target.vocab_size - 1,
        projector_type="domino", shift_label=True, pure_draft_prefix_len=1, gru_hidden_dim=12, emb_dim=10,
    )
    cfg.update(overrides)
    return DraftConfig(**cfg)


def tiny_draft(target: Target, seed: int = 0, **overrides) -> DraftModel:
    """A random drafter; with draft_vocab_size=N it scores a random subset of N target tokens."""
    torch.manual_seed(seed)
    model = DraftModel(tiny_draft_config(target, **overrides)).eval().requires_grad_(False)
    if model.cfg.draft_vocab_size is not None:
        model.set_draft_vocab(torch.randperm(target.vocab_size)[: model.cfg.draft_vocab_size])
    return model


class CharTokenizer:
    """One character per token id (a-z, A-Z, digits, punctuation...): enough to test text streaming."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?0123456789-_()[]{}<>=+*/\n"

    def get_vocab(self) -> dict[str, int]:
        return {}

    def convert_tokens_to_ids(self, tok):
        return None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(self.ALPHABET[i % len(self.ALPHABET)] for i in ids)

    def encode(self, text: str, **_) -> list[int]:
        return [self.ALPHABET.index(c) for c in text]


def strong_head(model: DraftModel) -> DraftModel:
    """Scale a random Domino head up. The default init (std 0.02) makes the delta negligible next to
    the base logits and the GRU state barely moves it; scaled, the head changes most drafts and its
    choice depends on the GRU state (anchor, previous drafts), so head parity tests can fail."""
    h = model.cfg.hidden_size
    with torch.no_grad():
        model.prefix_gru.weight_ih_l0.normal_(0, 0.8)
        model.prefix_gru.weight_hh_l0.normal_(0, 0.8)
        model.embed_proj[0].weight[:, :h].normal_(0, 0.3)  # z columns
        model.embed_proj[0].weight[:, h:].normal_(0, 2.0)  # GRU-state columns
        model.embed_proj[2].weight.normal_(0, 0.5)
    return model


def head_test_draft(vocab: int, block: int, gru: int, emb: int, layers: int, layer_ids: list[int],
                    shift_label: bool = True, prefix: int = 1, projector: str | None = "domino",
                    seed: int = 0) -> DraftModel:
    """A hidden-16 drafter on a 4-layer target for head-level tests, head scaled by strong_head."""
    cfg = DraftConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=vocab, block_size=block, num_target_layers=4, target_layer_ids=layer_ids,
        mask_token_id=vocab - 1, projector_type=projector, shift_label=shift_label, pure_draft_prefix_len=prefix,
        gru_hidden_dim=gru, emb_dim=emb,
    )
    torch.manual_seed(seed)
    model = DraftModel(cfg).eval().requires_grad_(False)
    return strong_head(model) if model.has_head else model
