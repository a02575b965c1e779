"""Target adapter over a Hugging Face causal LM: per-sequence KV caches that can be rolled back,
their forwards (one sequence, or many packed into one forward: forward.py), and capture of the
hidden states a DFlash drafter is conditioned on.

A drafter layer id k means the *output* of decoder layer k (0-based), i.e. HF
`hidden_states[k + 1]` (index 0 is the embedding output; the last layer's is after the final norm).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import attention

from .config import text_config
from .forward import ForwardOut, Pass, PackedForward
from .prompts import END_TOKENS

__all__ = ["ForwardOut", "Pass", "Target", "TargetSession"]


class Target:
    """A target model shared by every request; each request gets its own `Target.session()`."""

    def __init__(self, model, tokenizer, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = text_config(model.config)
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.num_layers = self.config.num_hidden_layers
        self.vocab_size = self.embed.weight.shape[0]
        self.max_context = max_context or getattr(self.config, "max_position_embeddings", 32768)
        self.eos_ids = _eos_ids(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @functools.cached_property
    def forward_batch(self) -> PackedForward:
        """`forward_batch(passes)`: one forward for several sequences' rows (ValueError for an
        architecture it does not support)."""
        return PackedForward(self.model)

    @torch.inference_mode()
    def session(self, prefix_kv: list | None = None, length: int = 0) -> "TargetSession":
        """A fresh sequence; with prefix_kv (per-layer keys/values [KV, T, D]) it starts from their
        first `length` positions instead of an empty cache."""
        sess = TargetSession(self)
        if prefix_kv:
            sess.reserve(length)
            for i, (k, v) in enumerate(prefix_kv):
                sess.keys[i][:, :length] = k[:, :length]
                sess.values[i][:, :length] = v[:, :length]
            sess.length = length
        return sess


class TargetSession:
    """One sequence's KV cache: per layer keys/values [KV, capacity, D], of which the first `length`
    positions are the sequence's; capacity doubles as it grows, and rows past `length` (rejected
    drafts, a failed forward) are garbage that the next write overwrites.

    Where the attention kernel multiplies with AMX tiles, each layer also keeps the cache packed
    as the tiles' operands (`kernels.attention.packed_cache`) so that a forward packs only its own
    rows: `packed[layer]` positions are packed, and a write below a forward's start position
    (`keep_path`) lowers it."""

    MIN_CAPACITY = 64

    def __init__(self, target: Target):
        self.t = target
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.packs: list = []
        self.packed = (ctypes.c_int64 * target.num_layers)()  # written by the kernel, so not a tensor

    def reserve(self, n: int) -> None:
        """Room for n positions (the stored ones kept)."""
        cap = self.keys[0].shape[1] if self.keys else 0
        if n <= cap:
            return
        cap = max(self.MIN_CAPACITY, cap)
        while cap < n:
            cap *= 2
        f = self.t.forward_batch
        shape, kw = (f.kv_heads, cap, f.head_dim), dict(dtype=self.t.dtype, device=self.t.device)
        for cache in (self.keys, self.values):
            for i in range(self.t.num_layers):
                new = torch.empty(shape, **kw)
                if i < len(cache):
                    new[:, :self.length] = cache[i][:, :self.length]
                    cache[i] = new
                else:
                    cache.append(new)
        kernel_rows = self.t.device.type == "cpu" and self.t.dtype == torch.bfloat16  # what the kernel takes
        self.packs = [attention.packed_cache(f.kv_heads, cap, f.head_dim) if kernel_rows else None
                      for _ in range(self.t.num_layers)]
        ctypes.memset(self.packed, 0, ctypes.sizeof(self.packed))

    def pack(self, layer: int) -> tuple | None:
        """The packed copy of `layer`'s cache and the address of its count, for the attention kernel
        (None: none kept)."""
        p = self.packs[layer] if self.packs else None
        return None if p is None else (*p, ctypes.addressof(self.packed) + layer * ctypes.sizeof(ctypes.c_int64))

    def snapshot(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the first n positions' keys and values, per layer ([KV, n, D] each)."""
        return [(k[:, :n].clone(), v[:, :n].clone()) for k, v in zip(self.keys, self.values)]

    def forward(self, ids: torch.Tensor, layer_ids: list[int] | None = None, keep_last: int | None = 0,
                parents: list[int] | None = None, prefill: bool = False) -> ForwardOut:
        """This sequence alone: `Pass` says what the arguments mean."""
        return self.t.forward_batch([Pass(self, ids, layer_ids, keep_last, parents, prefill)])[0]

    @torch.inference_mode()
    def keep_path(self, start: int, rows: list[int]) -> None:
        """After a tree forward at `start`: keep the cache rows start + rows (a root-to-node branch,
        increasing) as positions start .. start + len(rows) - 1, and drop the rest."""
        n = len(rows)
        if rows != list(range(n)):
            idx = torch.tensor(rows, device=self.t.device) + start
            for cache in (self.keys, self.values):
                for layer in cache:
                    layer[:, start:start + n] = layer.index_select(1, idx)
            for layer, count in enumerate(self.packed):
                self.packed[layer] = min(count, start)
        self.rollback(start + n)

    def rollback(self, length: int) -> None:
        """Drop cached positions >= length (rejected drafts)."""
        self.length = min(self.length, length)


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
