"""Prompt-prefix reuse across requests: an IDE sends a new completion on (almost) every keystroke,
and consecutive prompts share all but their last few tokens. After each prefill the engine keeps a
snapshot of the prompt's target KV cache (and the drafter's context K/V); a later prompt with
a common prefix restores it and prefills only the rest. Output is unchanged: the restored K/V are
exactly what a fresh prefill of those tokens would hold, and the rest of the prefill is bit for
bit a fresh one's (batch_invariant.py). A prompt row's K/V depend on the attention block holding
it (`block` positions, aligned) and on where that block ends (its end, or the prompt's end inside
it): whole blocks always restore; a block's first rows restore (`mid_block`) only where the block
ends at the same place in both prompts, as it does in a keystroke's, whose change sits far ahead
of its end.

The cache is bounded twice: by entries (one per file being typed in, per conversation) and by the
memory its snapshots hold (`max_bytes`); the least recently used go first. Sized by entries alone,
a long prompt's snapshot could claim gigabytes; sized too small, many clients typing in their own
files evict each other's snapshots and every keystroke prefills its whole prompt again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass(eq=False)  # identity: entries hold tensors
class PrefixEntry:
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [kv_heads, T, head_dim]
    draft: object | None  # the proposer's state for these tokens (drafters.Proposer.context), or None
    layer_ids: tuple[int, ...] | None  # the target layers the drafter that made `draft` reads (None: no drafter)
    nbytes: int = 0  # memory held by kv and draft


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in obj (a tensor, or lists/tuples of them, nested); 0 for anything else."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    return 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """An LRU of prompt snapshots (thread-safe; entries are immutable once stored)."""

    def __init__(self, capacity: int = 64, min_reuse: int = 16, block: int = 1, max_bytes: int | None = None):
        """capacity: most entries; max_bytes: most memory their snapshots hold (None: no bound);
        block: the prefill's attention block (module docstring)."""
        self.capacity, self.min_reuse, self.block, self.max_bytes = capacity, min_reuse, block, max_bytes
        self._entries: list[PrefixEntry] = []  # most recently used last
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries = []

    @property
    def nbytes(self) -> int:
        """Memory the cached snapshots hold now."""
        with self._lock:
            return sum(e.nbytes for e in self._entries)

    @property
    def size(self) -> int:
        """Snapshots held now (no __len__: an empty cache is still a cache, `if engine.prefix_cache`)."""
        return len(self._entries)

    def restorable(self, shared: int, old: int, new: int, mid_block: bool) -> int:
        """How many of `shared` common leading tokens of an `old`- and a `new`-token prompt
        restore exactly: whole blocks, and with mid_block the rest too when the block holding
        them ends at the same place in both (module docstring)."""
        start = shared - shared % self.block
        end = start + self.block
        return shared if mid_block and min(end, old) == min(end, new) else start

    def lookup(self, ids: list[int], layer_ids: list[int] | None,
               mid_block: bool = True) -> tuple[PrefixEntry, int] | None:
        """The entry sharing the longest prefix with `ids` that restores exactly (`restorable`;
        at most len(ids) - 1 tokens: the last prompt token must run to produce logits). Entries of
        another drafter (or none) don't count for a request with a drafter (`layer_ids`)."""
        need = tuple(layer_ids) if layer_ids is not None else None
        best, best_n = None, 0
        with self._lock:
            for e in self._entries:
                if need is not None and e.layer_ids != need:
                    continue
                n = self.restorable(min(common_prefix(e.ids, ids), len(ids) - 1), len(e.ids), len(ids), mid_block)
                if n > best_n:
                    best, best_n = e, n
            if best is None or best_n < self.min_reuse:
                return None
            self._entries.remove(best)
            self._entries.append(best)
        return best, best_n

    def store(self, ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]], draft: object | None,
              layer_ids: list[int] | None) -> None:
        """kv: a snapshot of the prompt's keys and values (copies: `TargetSession.snapshot`);
        draft: the proposer's `context()` right after the prompt's prefill (never written later)."""
        entry = PrefixEntry(list(ids), kv, draft, tuple(layer_ids) if layer_ids is not None else None,
                            tensor_bytes(kv) + tensor_bytes(draft))
        if self.max_bytes is not None and entry.nbytes > self.max_bytes:
            return  # larger than the whole budget: it would evict everything and still not fit
        with self._lock:
            # A prompt sharing at least 3/4 of an older one replaces it: the next keystroke in the
            # same file (prefix grown, suffix shifted), the next turn of a conversation. It offers
            # the shared part itself, and many clients' files then fit without evicting each other.
            self._entries = [e for e in self._entries
                             if not (4 * common_prefix(e.ids, ids) >= 3 * len(e.ids) and e.layer_ids == entry.layer_ids)]
            self._entries.append(entry)
            del self._entries[: max(0, len(self._entries) - self.capacity)]
            if self.max_bytes is not None:
                held = sum(e.nbytes for e in self._entries)
                while held > self.max_bytes:
                    held -= self._entries.pop(0).nbytes
