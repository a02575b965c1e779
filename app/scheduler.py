"""Serve many requests on one engine: the engine thread advances them together, one batched round
at a time.

Each round the scheduler picks up to `max_active` requests, the most urgent first: by priority
class (`PRIORITIES`: live voice turns, then interactive completions, then chat, then background
work), within a class by deadline, then by arrival. Their rounds run as one `Engine.step` (one
target forward for all of them, domino_backend/engine.py), so a short completion is not stuck
behind a long chat answer and a spoken reply rides in the next round whatever else is running.
A started request that falls out of the top `max_active` (preempted by a more urgent one) keeps
its KV cache and goes on when a slot frees. A voice reply runs alone until its first words can be
spoken (the first chunk for text-to-speech: the latency a listener waits through); after that,
speech plays far slower than rounds go, so requests already decoding go on beside it without drafts
while other prompts wait to be prefilled (prefill chunks and drafts are the rows that slow a round
down on a CPU). While a voice conversation is live (a turn arrived in the last `VOICE_LIVE_S`),
forwards carry at most `VOICE_ROWS` rows of prefill chunks and other requests go without drafts,
so its next turn never waits behind a long forward; a turn that arrives while a forward without
it runs stops that forward between two layers (nothing committed, redone in a later round). A
cancel (a completion superseded by a newer keystroke) or a deadline takes effect at the next round.

Threads: the engine decodes on `threads` (by default every core), and on `shared_threads` (one
core fewer) while other CPU work of the server (`SIDE_WORK`: ASR, TTS) is in flight: OpenMP
threads that find their core busy stall every parallel region. Rounds that would step only voice
replies already speaking wait while ASR/TTS runs: a reply's text runs far ahead of its audio. The
int8 GEMMs give the same bits on any thread count, so this changes no output.

Admission: beyond `max_active + max_queue` requests, or beyond `max_tokens` tokens in flight
(prompt + max_tokens of every admitted request: the KV memory they may claim), `submit` refuses
with `overloaded` (HTTP 429) instead of letting latency grow without bound; a request alone is
never refused for its size (the edge bounds that).

Cancelling a waiting request removes it at once (no engine work at all); cancelling a started one
stops it before its next round. Only the engine thread touches Generation objects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from domino_backend.batch_invariant import BLOCK
from domino_backend.engine import GenerationRequest

from agents.code.postprocess import Postprocessor
from agents.voice.config import VoiceConfig

from .backend import PRIORITIES, RequestError, Result, StreamJob

log = logging.getLogger("domino.server")
FIRST_CHUNK = VoiceConfig().first_chunker  # the voice agent's first chunk (agents/voice/reply.py)
SIDE_WORK_POLL_S = 0.002  # how often a voice reply paused for speech synthesis looks again
# A voice conversation counts as live for this long after its last turn arrived: the next turn is
# likely soon, and it must not wait behind a long forward.
VOICE_LIVE_S = 20.0
# Rows of a forward while a voice conversation is live: others' prompts prefill one attention
# block per forward (cut at a block boundary, no bits change), so a turn that arrives waits for a
# short forward, never for a batch of keystrokes' prefills.
VOICE_ROWS = BLOCK


class SideWork:
    """The server's CPU work besides the engine (speech recognition, synthesis) now in flight:
    `run` offloads a blocking call to a thread and counts it while it runs."""

    def __init__(self):
        self._n = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._n > 0

    async def run(self, fn, *args):
        with self._lock:
            self._n += 1
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            with self._lock:
                self._n -= 1


SIDE_WORK = SideWork()


@dataclass(eq=False)
class Task:
    job: StreamJob
    prompt_ids: list[int]
    req: GenerationRequest
    received: float  # scheduler clock at arrival
    deadline: float | None = None  # scheduler clock
    post: Postprocessor | None = None  # the request's stop rules (agents.code.postprocess)
    tag: str = ""
    priority: str = "chat"  # one of PRIORITIES
    gen: Any = None  # domino_backend.engine.Generation once started
    started: float | None = None
    first: float | None = None
    text: str = ""
    order: int = 0  # admission order (ties of `received`)
    spoken: bool = False  # a voice reply: its first chunk for text-to-speech is out
    first_chunk: Any = None  # a voice reply's chunker (agents.voice.chunker), fed until `spoken`

    @property
    def tokens(self) -> int:
        """Tokens this request may hold in the KV cache."""
        return len(self.prompt_ids) + self.req.max_new_tokens

    def rank(self) -> tuple:
        deadline = math.inf if self.deadline is None else self.deadline
        return PRIORITIES.index(self.priority), deadline, self.received, self.order


class EngineThread:
    """The one daemon OS thread that does all of the engine's torch work: loading, then serving.

    Why one thread: libgomp gives every thread that enters a parallel region its own OpenMP team,
    and once the process manages more OpenMP threads than it has CPUs, every team switches from
    spin-waiting to sleeping between parallel regions (its "throttled" spin count). Loading on one
    thread and decoding on another left two teams, and each of the hundreds of parallel regions in
    a forward then paid a futex wake-up: the served engine ran ~35 % slower than on the thread
    that loaded it. So the backend loads the engine here and the scheduler's loop runs here too.
    """

    def __init__(self, name: str = "domino-engine"):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn, *args) -> Future:
        """Run fn(*args) on this thread after everything submitted before it."""
        f: Future = Future()
        self._q.put((f, fn, args))
        return f

    def _loop(self) -> None:
        while True:
            f, fn, args = self._q.get()
            if not f.set_running_or_notify_cancel():
                continue
            try:
                f.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the future
                f.set_exception(e)


class Scheduler:
    def __init__(self, engine, max_active: int = 8, max_queue: int = 64,
                 engine_thread: EngineThread | None = None, max_tokens: int | None = None,
                 clock: Callable[[], float] = time.perf_counter, threads: int | None = None,
                 shared_threads: int | None = None, side_work: SideWork = SIDE_WORK):
        """engine_thread: the thread that built the engine; the worker loop runs on it too.
        max_tokens: the tokens-in-flight budget (None: none). clock: what `received`, deadlines
        and timings are measured with. threads / shared_threads: torch threads for rounds, and
        for rounds while `side_work` is busy (None: leave torch's setting)."""
        self.engine = engine
        self.threads, self.shared_threads, self.side_work = threads, shared_threads or threads, side_work
        self.max_active, self.max_queue, self.max_tokens = max_active, max_queue, max_tokens
        self.clock = clock
        self._cv = threading.Condition()
        self._waiting: list[Task] = []  # admitted, not started
        self._running: list[Task] = []  # started: holding a Generation (and its KV cache)
        self._order = itertools.count()
        self._steps = {"rounds": 0, "batched": 0, "max_batch": 0}  # engine steps, requests stepped, largest batch
        self._voice_at = -math.inf  # scheduler clock when the last voice turn arrived
        # Set when a voice turn arrives, cleared once none waits to start: a forward in flight
        # without it stops between layers (Engine.step's `stop`) instead of making the turn wait.
        self._voice_waiting = threading.Event()
        self._stop = False
        self._engine_thread = engine_thread or EngineThread()
        self._worker: Future | None = None

    # ---- called from the asyncio side -------------------------------------------------------
    def start(self) -> None:
        self._worker = self._engine_thread.submit(self._run)

    def submit(self, task: Task) -> None:
        if task.priority not in PRIORITIES:
            raise RequestError("invalid_request", f"priority must be one of {', '.join(PRIORITIES)}")
        with self._cv:
            if self._stop:
                raise RequestError("unavailable", "the server is shutting down", 503)
            admitted = self._waiting + self._running
            busy = f"server busy: {len(self._running)} running and {len(self._waiting)} queued requests"
            if len(admitted) >= self.max_active + self.max_queue:
                raise RequestError("overloaded", f"{busy}; retry later", 429)
            in_flight = sum(t.tokens for t in admitted)
            if self.max_tokens is not None and admitted and in_flight + task.tokens > self.max_tokens:
                raise RequestError("overloaded", f"{busy}, {in_flight} tokens in flight; retry later", 429)
            task.order = next(self._order)
            if task.priority == "voice":
                self._voice_at = self.clock()
                self._voice_waiting.set()
            self._waiting.append(task)
            self._cv.notify()

    def cancel(self, task: Task) -> None:
        """Thread-safe. A waiting task ends now; a started one before its next round."""
        with self._cv:
            waiting = task in self._waiting
            if waiting:
                self._waiting.remove(task)
            else:
                self._cv.notify()
        gen = task.gen  # read once: the worker may clear it concurrently
        if waiting:
            self._finish(task, "cancelled")
        elif gen is not None:
            gen.cancel()

    def load(self) -> dict:
        """Requests running and queued now; engine rounds so far, the requests they stepped (their
        sum: the mean batch is batched / rounds) and the largest batch."""
        with self._cv:
            return {"active": len(self._running), "queued": len(self._waiting), **self._steps}

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._worker is not None:
            try:
                self._worker.result(timeout)
            except Exception:  # still mid-forward after the timeout, or the loop died
                log.warning("the engine worker did not stop cleanly")
        with self._cv:
            left = self._waiting + self._running
            self._waiting, self._running = [], []
        for t in left:
            self._finish(t, "cancelled")

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stop:
                    return
            self.run_round()

    def run_round(self) -> list[Task]:
        """One round: end what was cancelled or ran out of time, then advance the most urgent
        `max_active` requests together by one engine step. Returns the tasks that stepped."""
        now = self.clock()
        with self._cv:
            ended = [t for t in self._waiting + self._running
                     if t.job.cancelled.is_set() or (t.deadline is not None and now >= t.deadline)]
            batch = sorted((t for t in self._waiting + self._running if t not in ended), key=Task.rank)
            batch = batch[:self.max_active]
            voice = [t for t in batch if t.priority == "voice"]
            if any(not t.spoken for t in voice):
                # Until a voice reply's first words can be spoken, its rounds are its own: the
                # first chunk for text-to-speech is the latency a listener waits through.
                batch = voice
            voice = any(t.gen is not None and not t.gen.prefill_rows() for t in voice)
            if voice:
                # Then speech plays far slower than rounds go: other requests share them, but
                # prompts wait to be prefilled and requests already decoding go without drafts
                # (prefill chunks and draft rows are what makes a CPU round slow).
                batch = [t for t in batch if t.priority == "voice" or (t.gen is not None and not t.gen.prefill_rows())]
            for t in batch:
                if t in self._waiting:
                    self._waiting.remove(t)
                    self._running.append(t)
            if not any(t.priority == "voice" and t not in ended for t in self._waiting):  # run now, or ended
                self._voice_waiting.clear()
        for t in ended:
            self._finish(t, "cancelled" if t.job.cancelled.is_set() else "deadline")
        if batch and self.side_work.busy and all(t.priority == "voice" and t.spoken for t in batch):
            # Speech being synthesized goes first: a reply's text runs far ahead of its audio, and
            # the cores are better spent on the chunk the listener is about to hear.
            time.sleep(SIDE_WORK_POLL_S)
            return []
        # While a voice conversation is live, forwards stay short: others' prompts prefill a block
        # per forward and their rounds go without drafts, so a turn waits little for the forward
        # in flight when it arrives.
        live = self.clock() - self._voice_at < VOICE_LIVE_S
        ready = [t for t in batch if self._guard(t, self._begin)]
        for t in ready:
            t.gen.cap_drafts(0 if (voice or live) and t.priority != "voice" else None)
        if not ready or self._stop:
            return []
        self._use_threads(self.shared_threads if self.side_work.busy else self.threads)
        with self._cv:
            st = self._steps
            st["rounds"], st["batched"], st["max_batch"] = (st["rounds"] + 1, st["batched"] + len(ready),
                                                            max(st["max_batch"], len(ready)))
        carries_voice = any(t.priority == "voice" for t in ready)
        try:
            # (a voice reply's own prompt is never cut: while it is in the batch, no other prompt is)
            short = live and not carries_voice
            results = self.engine.step([t.gen for t in ready], VOICE_ROWS if short else None,
                                       stop=None if carries_voice else self._voice_waiting.is_set)
        except Exception as e:  # the batch driver itself broke: this round's requests end, the server goes on
            log.exception("engine step failed")
            results = [e] * len(ready)
        for t, r in zip(ready, results):
            self._guard(t, self._deliver, r)
        return ready

    def _use_threads(self, n: int | None) -> None:
        if n and torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def _guard(self, t: Task, fn, *args) -> bool:
        """fn(t, *args); an unexpected error ends this request with `error` and the engine thread
        goes on serving everyone else."""
        try:
            return fn(t, *args)
        except Exception as e:
            log.exception("scheduler error in %s", t.tag)
            try:
                self._finish(t, "error", f"internal error: {type(e).__name__}")
            except Exception:
                log.exception("could not finish %s", t.tag)
                self._release(t)
            return False

    def _begin(self, t: Task) -> bool:
        """Make sure `t` has a Generation; False when it ended instead."""
        if t.gen is None:
            t.started = self.clock()
            try:
                t.gen = self.engine.stream(t.prompt_ids, t.req)
            except ValueError as e:  # the engine's own validation (context size, method, ...)
                self._finish(t, "error", str(e))
                return False
        return True

    def _deliver(self, t: Task, result: str | Exception) -> bool:
        if isinstance(result, Exception):
            log.error("engine error in %s: %r", t.tag, result)
            self._finish(t, "error", f"engine error: {type(result).__name__}")
            return False
        line_done = False
        delta = result
        if t.post is not None:
            delta, line_done = t.post.feed(delta)
        self._emit(t, delta)
        reason = "stop" if line_done else t.gen.finish_reason
        if reason is None and t.job.cancelled.is_set():
            reason = "cancelled"
        if reason is None and t.deadline is not None and self.clock() >= t.deadline:
            reason = "deadline"
        if reason is not None:
            self._finish(t, reason)
        return True

    def _emit(self, t: Task, delta: str) -> None:
        if delta:
            if t.first is None:
                t.first = self.clock()
            t.text += delta
            t.job.put(delta)
            if not t.spoken and t.priority == "voice":
                t.first_chunk = t.first_chunk or FIRST_CHUNK()
                t.spoken = bool(t.first_chunk.feed(delta))

    def _finish(self, t: Task, reason: str, error: str | None = None) -> None:
        if t.post is not None:  # text the stop rules held back is decided now
            self._emit(t, t.post.finish())
        gen = t.gen
        if gen is not None:
            gen.close()  # frees its KV cache; stats totals are final
        now = self.clock()
        stats = gen.stats if gen is not None else None
        result = Result(
            text=t.text,
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=len(t.prompt_ids),
            completion_tokens=len(gen.token_ids) if gen is not None else 0,
            cached_tokens=stats.reused_tokens if stats else 0,
            queue_ms=((t.started or now) - t.received) * 1000,
            prefill_ms=stats.prefill_s * 1000 if stats else 0.0,
            ttft_ms=(t.first - t.received) * 1000 if t.first else None,
            total_ms=(now - t.received) * 1000,
            spec=stats.to_dict() if stats else None,
            error=error,
        )
        t.gen = None  # drop the reference to the KV cache now, not when the job is collected
        self._release(t)  # before the client hears `done`: it may submit again at once
        t.job.finish(result)

    def _release(self, t: Task) -> None:
        with self._cv:
            for tasks in (self._waiting, self._running):
                if t in tasks:
                    tasks.remove(t)
