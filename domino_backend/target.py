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

from .config import text_config
from .prompts import END_TOKENS


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
        self.config = text_config(model.config)
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
    def forward(self, ids: torch.Tensor, layer_ids: list[int] | None = None, keep_last: int = 0,
                parents: list[int] | None = None) -> ForwardOut:
        """Run `ids` [T] at positions length..length+T-1, appending their K/V to the cache.

        keep_last: compute logits for the last N positions only (0 = all); prefill needs one row,
        and skipping the rest saves a [T, V] matmul. layer_ids: capture these layers' outputs.
        parents: `ids` is a draft tree, ids[0] its root and parents[i] the index of ids[i + 1]'s
        parent (0 = the root; parents before children): each token sits at its depth's position and
        sees the cache, its ancestors and itself. Rows follow `ids`; `keep_path` then keeps a branch.
        """
        start, t = self.length, ids.shape[0]
        mask = None
        if parents is None:
            pos = torch.arange(start, start + t, device=ids.device)
        else:
            block = tree_mask(parents).to(ids.device)  # [T, T]
            pos = start + block.sum(1) - 1  # depth = number of ancestors
            mask = torch.cat([block.new_ones(t, start), block], 1)[None, None]
        out = self.t.model(
            input_ids=ids[None],
            position_ids=pos[None],
            attention_mask=mask,
            use_cache=True,
            output_hidden_states=layer_ids is not None,
            logits_to_keep=keep_last,
            **{self.t._cache_kw: self.cache},
        )
        feats = None
        if layer_ids is not None:
            feats = torch.cat([out.hidden_states[i + 1][0] for i in layer_ids], dim=-1)
        return ForwardOut(out.logits[0].float(), feats)

    @torch.inference_mode()
    def keep_path(self, start: int, rows: list[int]) -> None:
        """After a tree forward at `start`: keep the cache rows start + rows (a root-to-node branch,
        increasing) as positions start .. start + len(rows) - 1, and drop the rest."""
        n = len(rows)
        if rows != list(range(n)):
            idx = torch.tensor(rows, device=self.t.device) + start
            for layer in self.cache.layers:
                layer.keys[:, :, start:start + n] = layer.keys.index_select(2, idx)
                layer.values[:, :, start:start + n] = layer.values.index_select(2, idx)
        self.rollback(start + n)

    def rollback(self, length: int) -> None:
        """Drop cached positions >= length (rejected drafts)."""
        remove = self.length - length
        if remove > 0:
            self.cache.crop(-remove)  # negative = number of tokens to drop, in every transformers version


def tree_mask(parents: list[int]) -> torch.Tensor:
    """[T, T] bool, row i = the nodes node i may see (its ancestors and itself) in a tree of T =
    len(parents) + 1 nodes: node 0 the root, node i + 1's parent parents[i] < i + 1."""
    t = len(parents) + 1
    mask = torch.eye(t, dtype=torch.bool)
    for i, p in enumerate(parents, start=1):
        if not 0 <= p < i:
            raise ValueError(f"tree node {i} has parent {p}: parents must come before their children")
        mask[i] |= mask[p]
    return mask


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else eos)
    # Turn ends and every FIM template's stop tokens (domino_backend.prompts): normal text never
    # contains them, and a completion that emits one has left the hole.
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    return ids
