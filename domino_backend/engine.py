"""The speculative decoding engine: draft -> verify -> accept, one loop for every method.

Round invariant: the target's KV cache holds every committed token except the last one, the
`anchor`, at position `pos = cache length`. A round drafts K tokens after the anchor, runs the
target once on [anchor, d_1..d_K], accepts a prefix of a drafts plus one bonus token (so every
round makes progress), and rolls the cache back to pos + a + 1. With K = 0 this is plain
decoding, which is how `ar` runs through the same code. A draft tree (greedy, tree.py) is verified
the same way in one pass; the accepted branch's K/V are moved to pos + 1 .. pos + a first.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from .batch_invariant import use_rowwise_attention
from .cpu import pack_linears
from .draft_length import AdaptiveDraftLength
from .draft_model import DraftModel
from .methods import make_proposer
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, select
from .settings import EngineSettings
from .target import Target


MAX_STOPS, MAX_STOP_CHARS = 16, 256  # bounds the per-round stop-string scan


@dataclass
class GenerationRequest:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # extra end tokens (e.g. a FIM family's)
    seed: int | None = None
    method: str = "domino"
    # None: the engine's EngineSettings value (settings.py says what each does).
    max_drafts: int | None = None
    adaptive_drafts: bool | None = None
    draft_tree: bool | None = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k)


@dataclass
class Stats:
    method: str
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens restored from the prefix cache instead of prefilled
    new_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    pos_tried: list[int] = field(default_factory=list)  # rounds that drafted >= j+1 tokens
    pos_accepted: list[int] = field(default_factory=list)  # rounds that accepted draft j+1
    accept_hist: list[int] = field(default_factory=list)  # rounds by accepted count a (index a)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0

    def record(self, k: int, a: int) -> None:
        self.rounds += 1
        self.drafted += k
        self.accepted += a
        for arr, n in ((self.pos_tried, k), (self.pos_accepted, a), (self.accept_hist, a + 1)):
            arr.extend([0] * (n - len(arr)))
        for j in range(k):
            self.pos_tried[j] += 1
        for j in range(a):
            self.pos_accepted[j] += 1
        self.accept_hist[a] += 1

    @property
    def tau(self) -> float:
        """Mean tokens committed per verify round (accepted drafts + the bonus token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        acc = self.pos_accepted + [0] * (len(self.pos_tried) - len(self.pos_accepted))
        return [a / tried for a, tried in zip(acc, self.pos_tried)]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def merge(self, other: Stats) -> None:
        """Add another run's counts and times (a benchmark's total over prompts)."""
        for name in ("prompt_tokens", "reused_tokens", "new_tokens", "rounds", "drafted", "accepted",
                     "prefill_s", "draft_s", "verify_s", "total_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("pos_tried", "pos_accepted", "accept_hist"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, x in enumerate(theirs):
                mine[i] += x

    def to_dict(self) -> dict:
        """The one serialisation: the API's `spec`, benchmark reports, metrics."""
        return {
            "method": self.method, "prompt_tokens": self.prompt_tokens, "reused_tokens": self.reused_tokens,
            "new_tokens": self.new_tokens,
            "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted, "tau": self.tau,
            "per_position_acceptance": self.per_position_acceptance,
            "accepted_per_position": list(self.pos_accepted), "accept_hist": self.accept_hist,
            "prefill_s": self.prefill_s, "draft_s": self.draft_s, "verify_s": self.verify_s,
            "total_s": self.total_s, "tokens_per_s": self.tokens_per_s,
        }


class Engine:
    """Shared model weights + the decoding loop. Each call to `stream` is an independent request."""

    def __init__(self, target: Target, draft: DraftModel | None = None, settings: EngineSettings = EngineSettings(),
                 placeholder_draft: bool = False):
        self.target, self.draft, self.settings = target, draft, settings
        # Snapshots of recent prompts' KV caches for prefix reuse.
        self.prefix_cache = (PrefixCache(settings.prefix_cache, settings.prefix_min_reuse)
                             if settings.prefix_cache else None)
        # True when the drafter is the random-initialised stand-in (lossless, but no speed-up).
        self.placeholder_draft = placeholder_draft
        # Adaptive draft-length state per method (per "method/source" for methods that route rounds
        # to several proposers or draft trees), shared by requests: verify cost is the machine's.
        self.draft_length: dict[str, AdaptiveDraftLength] = {}
        if draft is not None:
            from .checkpoint import check_compatible

            check_compatible(draft.cfg, target.model.config)
            draft.to(device=target.device, dtype=target.dtype)
            pack_linears(draft)
        # Verify must reproduce plain decoding's logits bit for bit (see batch_invariant.py).
        pack_linears(target.model)
        use_rowwise_attention(target.model)

    def stream(self, prompt_ids: list[int], req: GenerationRequest) -> "Generation":
        if not prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        if req.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {req.max_new_tokens}")
        if len(req.stop) > MAX_STOPS or any(len(x) > MAX_STOP_CHARS for x in req.stop):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters")
        s = self.settings
        req = replace(req, max_drafts=s.max_drafts if req.max_drafts is None else req.max_drafts,
                      adaptive_drafts=s.adaptive_drafts if req.adaptive_drafts is None else req.adaptive_drafts,
                      draft_tree=s.draft_tree if req.draft_tree is None else req.draft_tree)
        if req.max_drafts is not None and req.max_drafts < 0:
            raise ValueError(f"max_drafts must be >= 0, got {req.max_drafts}")
        limit = self.target.max_context
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context limit is {limit}")
        bad = [t for t in prompt_ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {self.target.vocab_size})")
        params = req.sampling()  # validates temperature / top-p / top-k now, not on the first round
        proposer = make_proposer(req.method, self.target, self.draft, s, req.draft_tree and params.greedy)
        return Generation(self, list(prompt_ids), req, proposer, params)

    def generate(self, prompt_ids: list[int], req: GenerationRequest) -> "Generation":
        gen = self.stream(prompt_ids, req)
        for _ in gen:
            pass
        return gen

    def token_rounds(self, prompt_ids: list[int], req: GenerationRequest, proposer, params: SamplingParams,
                     stats: Stats) -> Iterator[list[int]]:
        """Yield the tokens committed by prefill, then by each round, until the consumer stops.

        Grad mode is switched off per step, not across the yields, so interleaved generators (a
        scheduler serving many requests) never leak inference mode into each other's callers."""
        t = self.target
        rng = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        # Start from the longest cached prefix of this prompt (an earlier request's snapshot).
        hit = self.prefix_cache.lookup(prompt_ids, proposer.layer_ids) if self.prefix_cache else None
        reused = hit[1] if hit else 0
        feats = []
        with torch.inference_mode():
            sess = t.session(hit[0].kv, reused) if hit else t.session()
            if hit:
                feats = [hit[0].feats[:reused]] if proposer.layer_ids is not None else []
                proposer.commit(prompt_ids[:reused], feats[0] if feats else None)
        stats.reused_tokens = reused
        # Prefill in chunks, yielding nothing between them: a long prompt can then be cancelled
        # mid-prefill and does not stall the rounds of other requests sharing the worker.
        chunk, n = self.settings.prefill_chunk, len(prompt_ids)
        for start in range(reused, n, chunk):
            piece = prompt_ids[start:start + chunk]
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = sess.forward(torch.tensor(piece, dtype=torch.long, device=t.device), proposer.layer_ids,
                                   keep_last=1)
                proposer.commit(piece, out.feats)
                if out.feats is not None:
                    feats.append(out.feats)
                if start + chunk >= n:
                    anchor = int(select(out.logits[-1], params, rng)[0])
                    if self.prefix_cache:
                        self.prefix_cache.store(prompt_ids, sess.cache, torch.cat(feats) if feats else None,
                                                proposer.layer_ids)
            stats.prefill_s += time.perf_counter() - t0
            if start + chunk < n:
                yield []
        yield [anchor]
        produced = 1
        adaptive = req.adaptive_drafts and proposer.max_k > 0
        while True:
            pos = sess.length
            # Never draft past the token budget or the context window: the bonus token is free.
            cap = proposer.max_k if req.max_drafts is None else min(proposer.max_k, req.max_drafts)
            k = max(0, min(cap, req.max_new_tokens - produced - 1, t.max_context - pos - 1))
            policy = None
            if adaptive:
                source, max_k = proposer.route(anchor)
                key = f"{req.method}/{source}" if source else req.method
                policy = self.draft_length.setdefault(key, AdaptiveDraftLength(max_k))
                k = policy.choose(k)
            with torch.inference_mode():
                t0 = time.perf_counter()
                draft = proposer.propose(anchor, pos, k, params, rng)  # a chain or a tree (drafts.py)
                t1 = time.perf_counter()
                out = sess.forward(draft.verify_input(anchor, t.device), proposer.layer_ids, parents=draft.parents)
                rows, bonus = draft.verify(out.logits, params, rng)  # committed rows: anchor first
                draft.commit(sess, pos, rows)
                new = draft.accepted(rows)
                proposer.commit([anchor] + new, None if out.feats is None else out.feats[rows])
            t2 = time.perf_counter()
            a = len(new)
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            stats.record(draft.depth, a)  # per-position statistics of a tree are per depth
            if policy is not None:
                policy.update(draft.priced_k, a, t1 - t0, t2 - t1)
            anchor = bonus
            new.append(bonus)
            produced += len(new)
            yield new


class Generation:
    """An in-flight request: iterate for text deltas (str, one per engine round, possibly empty);
    `cancel()` (any thread) stops it between rounds, or before prefill if it has not started.

    After iteration: `token_ids`, `text`, `finish_reason` (stop | length | cancelled) and `stats`.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], req: GenerationRequest, proposer, params):
        self.engine, self.prompt_ids, self.req = engine, prompt_ids, req
        self._proposer, self._params = proposer, params
        self.stats = Stats(method=req.method, prompt_tokens=len(prompt_ids))
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._cancel = threading.Event()
        self._started = False

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        self._started = True
        tok = self.engine.target.tokenizer
        eos = self.engine.target.eos_ids | set(self.req.stop_token_ids)
        budget = min(self.req.max_new_tokens, self.engine.target.max_context - len(self.prompt_ids))
        stops = [s for s in self.req.stop if s]
        emitted = 0  # characters of self.text already yielded
        t0 = time.perf_counter()
        if self._cancel.is_set():  # cancelled while queued: no prefill at all
            self.finish_reason = "cancelled"
            return
        rounds = self.engine.token_rounds(self.prompt_ids, self.req, self._proposer, self._params, self.stats)
        try:
            for new in rounds:
                for tid in new:
                    if tid in eos:
                        self.finish_reason = "stop"
                        break
                    self.token_ids.append(tid)
                    if len(self.token_ids) >= budget:
                        self.finish_reason = "length"
                        break
                piece = ""
                if tok is not None:
                    self.text = tok.decode(self.token_ids, skip_special_tokens=True)
                    hit = min((i for i in (self.text.find(s) for s in stops) if i >= 0), default=-1)
                    if hit >= 0:
                        self.text, self.finish_reason = self.text[:hit], "stop"
                    safe = len(self.text) if self.finish_reason else _safe_prefix_len(self.text, stops)
                    if safe > emitted:
                        piece, emitted = self.text[emitted:safe], safe
                # One yield per engine round, even when the text is held back: a scheduler gets
                # control back after every target forward (fairness, deadlines).
                yield piece
                if self.finish_reason is None and self._cancel.is_set():
                    self.finish_reason = "cancelled"
                if self.finish_reason:
                    break
        finally:
            rounds.close()
            self.stats.new_tokens = len(self.token_ids)
            self.stats.total_s = time.perf_counter() - t0


def _safe_prefix_len(text: str, stops: list[str]) -> int:
    """Length of text that can be shown now: hold back an incomplete UTF-8 tail and any suffix that
    could still grow into a stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    shown = text[:n]
    for s in stops:  # stop strings are at most MAX_STOP_CHARS long (checked in Engine.stream)
        for m in range(min(len(s) - 1, n), 0, -1):
            if shown.endswith(s[:m]):
                n -= m
                shown = text[:n]
                break
    return n
