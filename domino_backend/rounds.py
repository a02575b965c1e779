"""One request's decoding as steps that a batch driver interleaves with other requests' (engine.py).

Round invariant: the target's KV cache holds every committed token except the last one, the
`anchor`, at position `pos = cache length`. A round drafts K tokens after the anchor, runs the
target once on [anchor, d_1..d_K], accepts a prefix of a drafts plus one bonus token (so every
round makes progress), and rolls the cache back to pos + a + 1. With K = 0 this is plain
decoding, which is how `ar` runs through the same code. A draft tree (greedy, tree.py) is verified
the same way in one pass; the accepted branch's K/V are moved to pos + 1 .. pos + a first.

A round is split at the target forward: `plan()` does this request's part before it (restore a
cached prompt prefix, pick the next prefill chunk, or draft) and returns the rows to run as a
`Pass`; the driver runs the passes of every request in one forward; `absorb(out)` does the rest
(verify, commit, account) and returns the tokens committed.
"""

from __future__ import annotations

import time

import torch

from .batch_invariant import BLOCK
from .draft_length import AdaptiveDraftLength
from .forward import ForwardOut, Pass
from .sampling import SamplingParams, select


class Rounds:
    """Prefill chunks (committing nothing until the prompt's last, which commits the first token),
    then draft -> verify -> commit -> account rounds, until the consumer stops."""

    def __init__(self, engine, prompt_ids: list[int], req, proposer, params: SamplingParams, stats):
        self.engine, self.prompt_ids, self.req = engine, prompt_ids, req
        self.proposer, self.params, self.stats = proposer, params, stats
        self.rng = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        self.sess = None
        self.prefilled = 0  # prompt tokens in the cache
        self.anchor: int | None = None
        self.produced = 0
        self.draft_cap: int | None = None  # most drafts per round, set by a scheduler (None: the request's own)
        self._round = None  # what plan() decided, for absorb()
        self._rng_state = None  # the random stream before plan(), for unplan()
        self._plan_s = 0.0

    def prefill_rows(self, room: int | None = None) -> int:
        """Rows of the next prefill chunk that fits in `room` rows (None: any size), after the
        prefix cache lookup (done here on first call); 0 when done or when none fits.

        A boundary between attention blocks changes no prompt row's bits (batch_invariant.py). So
        with `prefill_chunk` a multiple of BLOCK, a chunk runs from wherever the prefill stands (a
        restored prefix may end mid-block) to the block boundary `prefill_chunk` rows on from the
        start of its block, or to an earlier boundary to fit the room; otherwise chunks end on
        multiples of `prefill_chunk`, fixed positions whatever was restored, and are never cut."""
        if self.anchor is not None:
            return 0
        if self.sess is None:
            self._restore()
        chunk, done = self.engine.settings.prefill_chunk, self.prefilled
        if chunk % BLOCK:
            n = min(len(self.prompt_ids), (done // chunk + 1) * chunk) - done
            return n if room is None or n <= room else 0
        n = min(len(self.prompt_ids) - done, chunk - done % BLOCK)
        return n if room is None or n <= room else max((done + room) // BLOCK * BLOCK - done, 0)

    @torch.inference_mode()
    def plan(self, shared: bool = False, prefill: int | None = None, drafts: bool = True) -> Pass:
        """shared: whether the forward is expected to carry other requests' rows too (the
        adaptive draft length prices verify rows by that, draft_length.py); prefill: the rows of
        the prompt's next chunk to run, a `prefill_rows` answer (None: the whole chunk); drafts:
        False verifies the anchor alone this round if the request drafts adaptively."""
        t0 = time.perf_counter()
        self._rng_state = self.rng.get_state() if self.rng is not None else None
        try:
            return self._plan(int(shared), prefill, drafts)
        finally:
            self._plan_s = time.perf_counter() - t0

    def _plan(self, context: int, prefill: int | None, drafts: bool) -> Pass:
        t, e, proposer = self.engine.target, self.engine, self.proposer
        if self.anchor is None:  # prefill, one chunk per round: other requests' rounds go on meanwhile
            piece = self.prompt_ids[self.prefilled:self.prefilled + (prefill or self.prefill_rows())]
            last = self.prefilled + len(piece) >= len(self.prompt_ids)
            self._round = piece
            return Pass(self.sess, torch.tensor(piece, dtype=torch.long), proposer.layer_ids,
                        keep_last=1 if last else None, prefill=True)
        pos, req = self.sess.length, self.req
        # Never draft past the token budget or the context window: the bonus token is free.
        # The engine's gate (drafts=False) holds back adaptive requests only: one that asked for a
        # fixed draft length gets it every round, alone or batched.
        gated = not drafts and req.adaptive_drafts
        cap = 0 if gated else min(x for x in (proposer.max_k, req.max_drafts, self.draft_cap) if x is not None)
        k = max(0, min(cap, req.max_new_tokens - self.produced - 1, t.max_context - pos - 1))
        policy = None
        # A gated round says nothing about K to the policy.
        if req.adaptive_drafts and proposer.max_k > 0 and not gated:
            source, max_k = proposer.route(self.anchor)
            key = f"{req.method}/{source}" if source else req.method
            policy = e.draft_length.setdefault(key, AdaptiveDraftLength(max_k))
            k = policy.choose(k, context)
        draft = proposer.propose(self.anchor, pos, k, self.params, self.rng)  # a chain or a tree (drafts.py)
        self._round = (draft, pos, policy)
        return Pass(self.sess, draft.verify_input(self.anchor, t.device), proposer.layer_ids, parents=draft.parents)

    def unplan(self) -> None:
        """Undo `plan` once its forward was preempted: nothing was committed (the cache's length
        did not move); the random stream goes back to where the round began, so a seeded request
        draws the same drafts when the round runs again."""
        if self._rng_state is not None:
            self.rng.set_state(self._rng_state)
        self._round = None

    def _restore(self) -> None:
        """Start from the longest cached prefix of this prompt (an earlier request's snapshot)."""
        e, proposer = self.engine, self.proposer
        # Mid-block restores need chunks that end on block boundaries (prefill_rows).
        mid_block = e.settings.prefill_chunk % BLOCK == 0
        hit = e.prefix_cache.lookup(self.prompt_ids, proposer.layer_ids, mid_block) if e.prefix_cache else None
        if hit is None:
            self.sess = e.target.session()
            return
        entry, reused = hit
        self.sess = e.target.session(entry.kv, reused)
        self.prefilled = self.stats.reused_tokens = reused
        proposer.restore(self.prompt_ids[:reused], entry.draft)

    @torch.inference_mode()
    def absorb(self, out: ForwardOut, forward_s: float, shared: bool = False) -> list[int]:
        """Finish the planned step with its forward's output; forward_s: this request's share of
        the forward's time, shared: whether other requests' rows were in it. Returns the tokens
        committed (none for a prefill chunk but the last)."""
        t0 = time.perf_counter()
        if self.anchor is None:
            new = self._absorb_prefill(out)
            self.stats.prefill_s += self._plan_s + forward_s + time.perf_counter() - t0
            return new
        draft, pos, policy = self._round
        rows, bonus = draft.verify(out.logits, self.params, self.rng)  # committed rows: anchor first
        draft.commit(self.sess, pos, rows)
        new = draft.accepted(rows)
        self.proposer.commit([self.anchor] + new, None if out.feats is None else out.feats[rows])
        verify_s = forward_s + time.perf_counter() - t0
        a = len(new)
        self.stats.draft_s += self._plan_s
        self.stats.verify_s += verify_s
        self.stats.record(draft.depth, a)  # per-position statistics of a tree are per depth
        if policy is not None:
            policy.update(draft.priced_k, a, self._plan_s, verify_s, int(shared))
        self.anchor = bonus
        new.append(bonus)
        self.produced += len(new)
        return new

    def _absorb_prefill(self, out: ForwardOut) -> list[int]:
        piece, e = self._round, self.engine
        self.proposer.commit(piece, out.feats)
        self.prefilled += len(piece)
        if self.prefilled < len(self.prompt_ids):
            return []
        self.anchor = int(select(out.logits[-1], self.params, self.rng)[0])
        if e.prefix_cache:
            e.prefix_cache.store(self.prompt_ids, self.sess.snapshot(len(self.prompt_ids)),
                                 self.proposer.context(), self.proposer.layer_ids)
        self.produced = 1
        return [self.anchor]
