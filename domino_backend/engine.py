"""The speculative decoding engine: draft -> verify -> accept, one loop for every method, and one
target forward per round for every request in flight.

`Engine.stream` makes a `Generation` (one request); `Engine.step(generations)` advances each of
them by one round (rounds.py: a prefill chunk or draft -> verify -> commit -> account) with all of
their target rows in one forward (forward.py), and returns each one's text delta. A request alone
is a batch of one through the same code, so its tokens are the same alone or in any batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

from .batch_invariant import BLOCK
from .cpu import pack_linears
from .draft_length import AdaptiveDraftLength, DraftGate
from .draft_model import DraftModel
from .forward import ForwardOut, Pass, Preempted
from .methods import make_proposer
from .prefix_cache import PrefixCache
from .rounds import Rounds
from .sampling import SamplingParams
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
        self.prefix_cache = (PrefixCache(settings.prefix_cache, settings.prefix_min_reuse, BLOCK,
                                         settings.prefix_cache_mb << 20)
                             if settings.prefix_cache and settings.prefix_cache_mb else None)
        # True when the drafter is the random-initialised stand-in (lossless, but no speed-up).
        self.placeholder_draft = placeholder_draft
        # Adaptive draft-length state per method (per "method/source" for methods that route rounds
        # to several proposers or draft trees), shared by requests: verify cost is the machine's.
        self.draft_length: dict[str, AdaptiveDraftLength] = {}
        # Whether requests sharing a forward draft at all, from whole steps' measured speed.
        self.draft_gate = DraftGate() if settings.draft_gate else None
        if draft is not None:
            from .checkpoint import check_compatible

            check_compatible(draft.cfg, target.model.config)
            draft.to(device=target.device, dtype=target.dtype)
            pack_linears(draft)
        # Verify must reproduce plain decoding's logits bit for bit, alone or in a batch
        # (batch_invariant.py); the packed forward checks the architecture now, not at the first request.
        pack_linears(target.model)
        _ = target.forward_batch

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

    def step(self, gens: list["Generation"], max_rows: int | None = None, stop=None) -> list[str | Exception]:
        """One round of each generation, all of their target rows in one forward; returns each
        one's text delta, or the exception that ended it. `gens` come most urgent first: every
        round's rows go, then prefill chunks as far as the forward's `max_rows` (None:
        `settings.batch_rows`) allows: cut at attention block boundaries where that changes no bits,
        else waiting a round; the most urgent one's chunk always goes, to the next block boundary
        at least. A generation that fails (drafting, verify, or its rows in the forward) is
        finished with `error` and the others go on; waiting, finished or cancelled ones get ""
        (`finish_reason` says which). stop: asked between the forward's layers; when it answers
        True the step ends there with nothing committed (every generation as if it had not run,
        a seeded one's random stream included) and every result ""."""
        t0 = time.perf_counter()
        results: list[str | Exception] = [""] * len(gens)
        planned: list[tuple[int, Pass]] = []
        rows, chunks = 0, 0
        budget = self.settings.batch_rows if max_rows is None else max_rows
        shared = sum(g.finish_reason is None for g in gens) > 1  # expected: others' rows in this forward
        decoding = [g for g in gens if g.decoding]
        gate = self.draft_gate if len(decoding) > 1 and any(g.can_draft for g in decoding) else None
        drafts = gate.choose(len(decoding)) if gate else True
        before = [len(g.token_ids) for g in decoding]
        for i, g in enumerate(gens):
            try:
                chunk = g.prefill_rows()  # its first call restores a cached prefix: the true chunk
                if chunk and rows + chunk > budget:
                    chunk = g.prefill_rows(max(budget - rows, 0))
                    if not chunk:
                        if chunks:  # no room left: waits a round
                            continue
                        chunk = g.prefill_rows(BLOCK) or g.prefill_rows()  # the forward's first chunk goes
                p = g.plan(shared, chunk or None, drafts)
            except Exception as e:
                results[i] = g.fail(e)
                continue
            if p is not None:
                planned.append((i, p))
                rows += p.ids.shape[0]
                chunks += bool(chunk)
        if not planned:
            return results
        try:
            outs, forward_s = self._forward([p for _, p in planned], stop)
        except Preempted:
            for i, _ in planned:
                gens[i].unplan()
            return results
        for (i, p), out in zip(planned, outs):
            g = gens[i]
            if isinstance(out, Exception):
                results[i] = g.fail(out)
                continue
            try:
                # Each request is charged its rows' share of the forward: the marginal cost of a
                # verified row, which the adaptive draft length weighs against acceptance.
                results[i] = g.absorb(out, forward_s * p.ids.shape[0] / rows, len(planned) > 1)
            except Exception as e:
                results[i] = g.fail(e)
        if self.draft is not None:  # every request's committed rows into its drafter context, in one pass
            self.draft.flush_context()
        if gate and not chunks:
            tokens = sum(len(g.token_ids) - n for g, n in zip(decoding, before))
            gate.update(len(decoding), drafts, tokens, time.perf_counter() - t0)
        return results

    def _forward(self, passes: list[Pass], stop=None) -> tuple[list[ForwardOut | Exception], float]:
        """One forward for all passes; if it fails, each pass alone, so that only the ones that
        fail by themselves fail (a session's length moves only when its forward succeeded).
        `Preempted` (stop said so) goes to the caller."""
        t0 = time.perf_counter()
        try:
            outs: list[ForwardOut | Exception] = list(self.target.forward_batch(passes, stop))
        except Preempted:
            raise
        except Exception as e:
            if len(passes) == 1:
                return [e], time.perf_counter() - t0
            outs = []
            for p in passes:
                try:
                    outs.append(self.target.forward_batch([p])[0])
                except Exception as e1:
                    outs.append(e1)
        return outs, time.perf_counter() - t0


class Generation:
    """An in-flight request: iterate for text deltas (str, one per engine round, possibly empty),
    or let a driver advance it together with others (`Engine.step`); `cancel()` (any thread) stops
    it before its next round, or before prefill if it has not started.

    After it ends: `token_ids`, `text`, `finish_reason` (stop | length | cancelled | error) and
    `stats`; `close()` (also run at the end) frees its KV cache.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], req: GenerationRequest, proposer, params):
        self.engine, self.prompt_ids, self.req = engine, prompt_ids, req
        self.stats = Stats(method=req.method, prompt_tokens=len(prompt_ids))
        self._rounds: Rounds | None = Rounds(engine, prompt_ids, req, proposer, params, self.stats)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._cancel = threading.Event()
        self._started = False
        self._t0: float | None = None
        self._emitted = 0  # characters of self.text already handed out
        self._eos = engine.target.eos_ids | set(req.stop_token_ids)
        self._budget = min(req.max_new_tokens, engine.target.max_context - len(prompt_ids))
        self._stops = [x for x in req.stop if x]

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def decoding(self) -> bool:
        """Past its prompt and not ended: its next round verifies (drafts or the anchor alone)."""
        return self.finish_reason is None and self._rounds is not None and self._rounds.anchor is not None

    @property
    def can_draft(self) -> bool:
        """Its method drafts, adaptively (the engine's gate leaves a fixed draft length alone),
        and no cap (`cap_drafts(0)`) keeps it from drafting."""
        r = self._rounds
        return r is not None and r.proposer.max_k > 0 and bool(self.req.adaptive_drafts) and r.draft_cap != 0

    def plan(self, shared: bool = False, prefill: int | None = None, drafts: bool = True) -> Pass | None:
        """The target rows of this generation's next round, or None when it has ended (a cancel
        seen now ends it); shared: other requests' rows are expected in the same forward;
        prefill: the rows of the next prompt chunk to run (a `prefill_rows` answer; None: all);
        drafts: False verifies no drafts this round if it drafts adaptively (the engine's `DraftGate`)."""
        if self.finish_reason is None and self._cancel.is_set():
            self._end("cancelled")
        if self.finish_reason is not None or self._rounds is None:
            return None
        if self._t0 is None:
            self._t0 = time.perf_counter()
        return self._rounds.plan(shared, prefill, drafts)

    def unplan(self) -> None:
        """Forget the planned round (its forward was preempted): the next `plan` starts it again."""
        if self._rounds is not None:
            self._rounds.unplan()

    def cap_drafts(self, n: int | None) -> None:
        """Verify at most n drafts per round from now on (None: the request's own cap). Any draft
        length is lossless: a scheduler uses this to keep rounds small while a more urgent
        request shares them."""
        if self._rounds is not None:
            self._rounds.draft_cap = n

    def prefill_rows(self, room: int | None = None) -> int:
        """Rows of the prefill chunk the next round would run, within `room` rows if given (the
        first call restores a cached prefix, so this is the true chunk); 0 once the prompt is in
        or when no chunk fits the room."""
        if self._rounds is None or self.finish_reason is not None:
            return 0
        return self._rounds.prefill_rows(room)

    def absorb(self, out: ForwardOut, forward_s: float, shared: bool = False) -> str:
        """Finish the round with the forward's output: the text delta it makes visible (possibly
        empty: a prefill chunk, or text held back until it cannot become a stop string)."""
        for tid in self._rounds.absorb(out, forward_s, shared):
            if tid in self._eos:
                self.finish_reason = "stop"
                break
            self.token_ids.append(tid)
            if len(self.token_ids) >= self._budget:
                self.finish_reason = "length"
                break
        piece = ""
        tok = self.engine.target.tokenizer
        if tok is not None:
            self.text = tok.decode(self.token_ids, skip_special_tokens=True)
            hit = min((i for i in (self.text.find(x) for x in self._stops) if i >= 0), default=-1)
            if hit >= 0:
                self.text, self.finish_reason = self.text[:hit], "stop"
            safe = len(self.text) if self.finish_reason else _safe_prefix_len(self.text, self._stops)
            if safe > self._emitted:
                piece, self._emitted = self.text[self._emitted:safe], safe
        if self.finish_reason is None and self._cancel.is_set():
            self.finish_reason = "cancelled"
        if self.finish_reason is not None:
            self.close()
        else:
            self._account()
        return piece

    def fail(self, error: Exception) -> Exception:
        """End with `error` (the round that raised it changed nothing others can see)."""
        self._end("error")
        return error

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        self.close()

    def _account(self) -> None:
        self.stats.new_tokens = len(self.token_ids)
        if self._t0 is not None:
            self.stats.total_s = time.perf_counter() - self._t0

    def close(self) -> None:
        """Free the KV cache and draft state; the generation advances no further."""
        if self._rounds is not None:
            self._rounds = None
            self._account()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        self._started = True
        try:
            while True:
                if self._cancel.is_set():  # before prefill too: a queued cancel costs nothing
                    self._end("cancelled")
                    return
                piece = self.engine.step([self])[0]
                if isinstance(piece, Exception):
                    raise piece
                # One yield per engine round, even when the text is held back: a consumer gets
                # control back after every target forward (fairness, deadlines).
                yield piece
                if self.finish_reason:
                    return
        finally:
            self.close()


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
