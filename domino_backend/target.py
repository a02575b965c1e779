"""Target adapter over a Hugging Face causal LM: prefill/verify forwards with a KV cache that can be
rolled back, and capture of the hidden states a DFlash drafter is conditioned on.

A drafter layer id k means the *output* of decoder layer k (0-based), i.e. HF
`hidden_states[k + 1]` (index 0 is the embedding output).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache


END_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>",
    "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>",
)


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [T_kept, V] fp32
    feats: torch.Tensor | None  # [T, L*H] concatenated layer outputs, or None when not captured


class Target:
    """One sequence's view of a target model: its KV cache and the forward passes over it.

    The model and tokenizer are shared; each request gets its own `Target.session()`.
    """

    def __init__(self, model, tokenizer, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.num_layers = self.config.num_hidden_layers
        self.vocab_size = self.embed.weight.shape[0]
        self.max_context = max_context or getattr(self.config, "max_position_embeddings", 32768)
        # transformers 5.x renamed `past_key_values` to `cache`; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.eos_ids = _eos_ids(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def session(self, prefix_kv: list | None = None, length: int = 0) -> "TargetSession":
        """A fresh sequence; with prefix_kv (per-layer keys/values) it starts from their first
        `length` positions instead of an empty cache."""
        sess = TargetSession(self)
        for i, (k, v) in enumerate(prefix_kv or []):
            sess.cache.update(k[..., :length, :], v[..., :length, :], i)
        return sess


class TargetSession:
    def __init__(self, target: Target):
        self.t = target
        self.cache = DynamicCache(config=target.model.config)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, layer_ids: list[int] | None = None, keep_last: int = 0) -> ForwardOut:
        """Run `ids` [T] at positions length..length+T-1, appending their K/V to the cache.

        keep_last: compute logits for the last N positions only (0 = all); prefill needs one row,
        and skipping the rest saves a [T, V] matmul. layer_ids: capture these layers' outputs.
        """
        start = self.length
        pos = torch.arange(start, start + ids.shape[0], device=ids.device)[None]
        out = self.t.model(
            input_ids=ids[None],
            position_ids=pos,
            use_cache=True,
            output_hidden_states=layer_ids is not None,
            logits_to_keep=keep_last,
            **{self.t._cache_kw: self.cache},
        )
        feats = None
        if layer_ids is not None:
            feats = torch.cat([out.hidden_states[i + 1][0] for i in layer_ids], dim=-1)
        return ForwardOut(out.logits[0].float(), feats)

    def rollback(self, length: int) -> None:
        """Drop cached positions >= length (rejected drafts)."""
        remove = self.length - length
        if remove > 0:
            self.cache.crop(-remove)  # negative = number of tokens to drop, in every transformers version


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else eos)
    # Turn ends and FIM/repo markers: normal text never contains them, and a completion that emits
    # one has left the hole (Qwen2.5-Coder FIM stop tokens).
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return ids
