"""Draft proposers, one per method, all behind the same per-request interface.

A proposer is created per request (it holds that request's draft state) and is driven by the
engine loop: `commit(tokens, feats)` after every verification with the tokens now in the target's
KV cache (and their captured features when `layer_ids` is set), then `propose(anchor, pos, k, ...)`
for the next block, where `anchor` is the last committed token, not yet in the target cache, at
absolute position `pos`. With the adaptive draft length the engine first asks `route(anchor)`
which source will draft the round (and its most drafts): it keeps one draft-length policy per
source, since sources (lookup, a drafter's chain, its tree) differ in acceptance and draft cost.

`propose` returns a `Draft` (drafts.py) that the engine verifies and commits. Proposers:
`Proposer` (drafts nothing: `ar`), `NgramProposer` (prompt lookup), `BlockProposer` (the block
drafter, head on or off, chain or tree) and `HybridProposer` (lookup where the text repeats
itself, the block drafter elsewhere); methods.py says which method uses which.
"""

from __future__ import annotations

import numpy as np
import torch

from .batch_invariant import MAX_ROWS
from .draft_model import DraftCache, DraftModel
from .drafts import ChainDraft, Draft, empty_draft
from .head import rollout
from .sampling import SamplingParams
from .settings import NgramConfig, TreeConfig
from .target import Target
from .tree import grow

MAX_BACK_MATCH = 64  # lookup: how far back a match is extended to rank occurrences


class Proposer:
    """Defaults shared by all proposers; `ar` is this base as it is (it proposes nothing)."""

    layer_ids: list[int] | None = None  # target layers whose features `commit` needs (None: none)
    max_k = 0

    def commit(self, tokens: list[int], feats: torch.Tensor | None) -> None:
        pass

    def context(self) -> object | None:
        """What the prefix cache keeps of this proposer's state with a prompt's snapshot, taken
        right after the prompt's prefill (None: nothing beyond the tokens)."""
        return None

    def restore(self, tokens: list[int], context: object | None) -> None:
        """Start from a cached prompt prefix: `tokens`, and the `context()` of a proposer of this
        engine that had committed at least those tokens."""
        self.commit(tokens, None)

    def route(self, anchor: int) -> tuple[str, int]:
        """(source that drafts the next round, its most drafts); "" = the method's only source."""
        return "", self.max_k

    def propose(self, anchor: int, pos: int, k: int, params: SamplingParams, generator) -> Draft:
        return empty_draft()


class NgramProposer(Proposer):

    def __init__(self, cfg: NgramConfig):
        self.cfg = cfg
        self.max_k = cfg.num_draft
        self._buf = np.empty(1024, dtype=np.int64)  # history: committed tokens, grown by doubling
        self._len = 0
        self._round: tuple[list[int], int] | None = None  # lookup of the current round, once scanned

    def commit(self, tokens: list[int], feats: torch.Tensor | None) -> None:
        end = self._len + len(tokens)
        if end >= self._buf.shape[0]:  # one spare slot: `lookup` writes the anchor after the history
            self._buf = np.resize(self._buf, max(end + 1, 2 * self._buf.shape[0]))
        self._buf[self._len:end] = tokens
        self._len = end
        self._round = None

    def round_lookup(self, anchor: int) -> tuple[list[int], int]:
        """This round's full-length lookup, scanned once (routing, then drafting cut to K)."""
        if self._round is None:
            self._round = self.lookup(anchor, self.max_k)
        return self._round

    def propose(self, anchor, pos, k, params, generator):
        if k <= 0:  # an adaptive round that drafts nothing: no scan
            return empty_draft()
        cont = self.round_lookup(anchor)[0][:k]
        return ChainDraft(torch.tensor(cont, dtype=torch.long)) if cont else empty_draft()

    def lookup(self, anchor: int, k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed an earlier occurrence of the longest recurring suffix
        (max_ngram down to min_ngram tokens) of history + [anchor], and the length of the match;
        ([], 0) when no suffix recurs or k = 0.

        Among the occurrences, the one whose match runs furthest back wins (then the most recent):
        a 3-token suffix like "self.x =" recurs everywhere in code, while the occurrence that also
        matches the line before it is the one being copied.
        """
        if k <= 0 or self._len == 0:
            return [], 0
        self._buf[self._len] = anchor  # history + [anchor] as a view, no copy per round
        seq = self._buf[:self._len + 1]
        n_seq = len(seq)
        for n in range(min(self.cfg.max_ngram, n_seq - 1), self.cfg.min_ngram - 1, -1):
            # starts s of earlier occurrences, all with a continuation (s + n <= n_seq - 1)
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            starts = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if starts.size == 0:
                continue
            best, best_len = -1, -1
            for s in starts[::-1].tolist():  # most recent first: ties keep it
                ext, limit = 0, min(s, MAX_BACK_MATCH)
                while ext < limit and seq[s - 1 - ext] == seq[n_seq - n - 1 - ext]:
                    ext += 1
                if ext > best_len:
                    best, best_len = s, ext
            return seq[best + n:best + n + k].tolist(), n + best_len
        return [], 0


class BlockProposer(Proposer):
    """DFlash block drafting (+ the Domino head when `use_head`); with `tree` (greedy requests,
    head on) a round drafting K tokens proposes a tree of round(tree.width * K) nodes, depth <= K."""

    def __init__(self, model: DraftModel, target: Target, use_head: bool, tree: TreeConfig | None = None):
        self.model, self.target, self.use_head = model, target, use_head
        self.tree = tree if use_head and model.has_head else None
        self.layer_ids = list(model.cfg.target_layer_ids)
        self.max_k = model.cfg.num_drafts
        self.cache = DraftCache(model.cfg.num_hidden_layers)

    def route(self, anchor: int) -> tuple[str, int]:
        return ("tree" if self.tree else ""), self.max_k  # a tree accepts more per K than a chain

    def commit(self, tokens: list[int], feats: torch.Tensor | None) -> None:
        # Into the drafter's context cache within the same engine step (queued, so that a batched
        # step projects every request's rows in one pass; `Engine.step` flushes the queue), not at
        # the next draft: then a draft costs its block alone, also after rounds that drafted nothing
        # (adaptive K = 0, or lookup rounds of domino+ngram). Deferred, the catch-up would make the
        # next draft look several times dearer to the draft length policy, which would then keep
        # choosing K = 0.
        self.model.queue_context(feats, self.cache)

    def _ready(self) -> DraftCache:
        """The context cache with every commit in (a direct caller may not have flushed)."""
        self.model.flush_context()
        if self.cache.error is not None:
            raise self.cache.error
        return self.cache

    def context(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # The cache's tensors are replaced on every append, never written: keeping them is a snapshot.
        cache = self._ready()
        return list(zip(cache.k, cache.v))

    def restore(self, tokens: list[int], context: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # The drafter's context K/V of the restored tokens as computed when they were committed:
        # recomputing them from the target features would cost a projection of the whole prefix.
        n = len(tokens)
        for i, (k, v) in enumerate(context):
            self.cache.k[i], self.cache.v[i] = k[:, :, :n], v[:, :, :n]
        self.cache.length = n

    @torch.inference_mode()
    def draft_slots(self, anchor: int, pos: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One block pass over [anchor, MASK...] at `pos`: the first k draft slots' hiddens z
        [1, K, H] and base logits [1, K, V_draft], over the context committed so far."""
        cfg, dev = self.model.cfg, self.target.device
        block = torch.full((1, cfg.block_size), cfg.mask_token_id, dtype=torch.long, device=dev)
        block[0, 0] = anchor
        positions = torch.arange(pos, pos + cfg.block_size, device=dev)[None]
        z = self.model.forward_block(self.target.embed(block), positions, self._ready())
        z = z[:, cfg.slot_offset:cfg.slot_offset + k]
        return z, self.model.base_logits(z, self.target.lm_head).float()

    @torch.inference_mode()
    def propose(self, anchor: int, pos: int, k: int, params: SamplingParams, generator):
        if k == 0:
            return empty_draft()
        z, base = self.draft_slots(anchor, pos, k)
        # A tree's rows sit in the target's cache until verified: keep them inside the context, and
        # within the rows the verify attention runs one by one (bitwise equal to decoding).
        if self.tree:
            nodes = min(max(1, round(self.tree.width * k)), MAX_ROWS - 1, self.target.max_context - pos - 1)
            return grow(self.model, z[0], base[0], anchor, self.target.embed, nodes, self.tree.beam)
        anchor_t = torch.tensor([anchor], device=self.target.device)
        tokens, probs = rollout(self.model, z, base, anchor_t, self.target.embed, params, generator, self.use_head)
        return ChainDraft(tokens[0].cpu(), q=None if probs is None else probs[0])


class HybridProposer(Proposer):
    """`domino+ngram`: both proposers see every commit; each round drafts with prompt lookup when
    its match is at least `min_match` tokens long, else with the block drafter."""

    def __init__(self, block: BlockProposer, ngram: NgramProposer, min_match: int):
        self.block, self.ngram, self.min_match = block, ngram, min_match
        self.layer_ids = block.layer_ids
        self.max_k = max(block.max_k, ngram.max_k)

    def commit(self, tokens: list[int], feats: torch.Tensor | None) -> None:
        self.block.commit(tokens, feats)
        self.ngram.commit(tokens, feats)

    def context(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.block.context()

    def restore(self, tokens: list[int], context) -> None:
        self.block.restore(tokens, context)
        self.ngram.commit(tokens, None)

    def _by_lookup(self, anchor: int) -> bool:
        cont, n = self.ngram.round_lookup(anchor)
        return bool(cont) and n >= self.min_match

    def route(self, anchor: int) -> tuple[str, int]:
        if self._by_lookup(anchor):
            return "lookup", self.ngram.max_k
        shape, max_k = self.block.route(anchor)
        return "/".join(filter(None, ("drafter", shape))), max_k

    def propose(self, anchor, pos, k, params, generator):
        if self._by_lookup(anchor):
            return self.ngram.propose(anchor, pos, k, params, generator)
        return self.block.propose(anchor, pos, min(k, self.block.max_k), params, generator)
