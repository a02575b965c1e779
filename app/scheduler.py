"""Serve many requests on one engine: a worker thread interleaves their rounds fairly.

The engine decodes one sequence per call (no cross-request batching yet), and one `next()` on a
`Generation` is one engine round (prefill first, then one target verify per round). So the worker
runs up to `max_active` generations round-robin: every active request advances one round per
cycle, a short completion is not stuck behind a long chat answer, and a cancel or deadline takes
effect at the next round. Requests beyond `max_active` wait in a FIFO; beyond `max_active +
max_queue` in total, `submit` refuses with `overloaded` (HTTP 429) instead of letting latency grow
without bound.

Cancelling a queued request removes it at once (no engine work at all); cancelling a running one
stops it after the current round (a prefill forward cannot be interrupted, so at worst after the
prefill). Only the worker thread touches Generation objects.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from domino_backend.engine import GenerationRequest

from agents.code.postprocess import Postprocessor

from .backend import RequestError, Result, StreamJob

log = logging.getLogger("domino.server")


@dataclass(eq=False)
class Task:
    job: StreamJob
    prompt_ids: list[int]
    req: GenerationRequest
    received: float  # perf_counter() at arrival
    deadline: float | None = None  # perf_counter() time
    post: Postprocessor | None = None  # the request's stop rules (agents.code.postprocess)
    tag: str = ""
    gen: Any = None  # domino_backend.engine.Generation once started
    it: Iterator[str] | None = None
    started: float | None = None
    first: float | None = None
    text: str = ""


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
                 engine_thread: EngineThread | None = None):
        """engine_thread: the thread that built the engine; the worker loop runs on it too."""
        self.engine = engine
        self.max_active, self.max_queue = max_active, max_queue
        self._cv = threading.Condition()
        self._pending: deque[Task] = deque()
        self._active: list[Task] = []
        self._stop = False
        self._engine_thread = engine_thread or EngineThread()
        self._worker: Future | None = None

    # ---- called from the asyncio side -------------------------------------------------------
    def start(self) -> None:
        self._worker = self._engine_thread.submit(self._run)

    def submit(self, task: Task) -> None:
        with self._cv:
            if self._stop:
                raise RequestError("unavailable", "the server is shutting down", 503)
            if len(self._pending) + len(self._active) >= self.max_active + self.max_queue:
                raise RequestError(
                    "overloaded",
                    f"server busy: {len(self._active)} running and {len(self._pending)} queued requests; retry later",
                    429,
                )
            self._pending.append(task)
            self._cv.notify()

    def cancel(self, task: Task) -> None:
        """Thread-safe. A queued task ends now; a running one at the end of its current round."""
        with self._cv:
            queued = task in self._pending
            if queued:
                self._pending.remove(task)
            else:
                self._cv.notify()
        gen = task.gen  # read once: the worker may clear it concurrently
        if queued:
            self._finish(task, "cancelled")
        elif gen is not None:
            gen.cancel()

    def load(self) -> dict:
        with self._cv:
            return {"active": len(self._active), "queued": len(self._pending)}

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
            left = list(self._pending) + list(self._active)
            self._pending.clear()
            self._active.clear()
        for t in left:
            try:
                self._finish(t, "cancelled")
            except ValueError:  # "generator already executing": the worker is still mid-forward
                log.warning("request %s still running at shutdown", t.tag)

    # ---- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            expired: list[Task] = []
            with self._cv:
                while not self._stop and not self._pending and not self._active:
                    self._cv.wait()
                if self._stop:
                    return
                now = time.perf_counter()
                for t in list(self._pending):  # deadlines pass while waiting too
                    if t.deadline is not None and now >= t.deadline:
                        self._pending.remove(t)
                        expired.append(t)
                while self._pending and len(self._active) < self.max_active:
                    self._active.append(self._pending.popleft())
                cycle = list(self._active)
            for t in expired:
                self._finish(t, "deadline")
            for t in cycle:
                if self._stop:
                    return
                self._step(t)

    def _step(self, t: Task) -> None:
        """Advance `t` by one engine round (finishing it when done). Never raises: an unexpected
        error ends this request with `error` and the worker goes on serving everyone else."""
        try:
            self._advance(t)
        except Exception as e:
            log.exception("scheduler error in %s", t.tag)
            try:
                self._finish(t, "error", f"internal error: {type(e).__name__}")
            except Exception:
                log.exception("could not finish %s", t.tag)
                self._release(t)

    def _advance(self, t: Task) -> None:
        if t.job.cancelled.is_set():
            return self._finish(t, "cancelled")
        if t.deadline is not None and time.perf_counter() >= t.deadline:
            return self._finish(t, "deadline")
        if t.gen is None:
            t.started = time.perf_counter()
            try:
                t.gen = self.engine.stream(t.prompt_ids, t.req)
            except ValueError as e:  # the engine's own validation (context size, method, ...)
                return self._finish(t, "error", str(e))
            t.it = iter(t.gen)
        try:
            delta = next(t.it)
        except StopIteration:
            return self._finish(t, t.gen.finish_reason or "stop")
        except Exception as e:
            log.exception("engine error in %s", t.tag)
            return self._finish(t, "error", f"engine error: {type(e).__name__}")
        line_done = False
        if t.post is not None:
            delta, line_done = t.post.feed(delta)
        self._emit(t, delta)
        if line_done:
            return self._finish(t, "stop")
        if t.gen.finish_reason in ("stop", "length"):  # saves one worker cycle per request
            return self._finish(t, t.gen.finish_reason)
        if t.gen.finish_reason == "cancelled" or t.job.cancelled.is_set():
            return self._finish(t, "cancelled")
        if t.deadline is not None and time.perf_counter() >= t.deadline:
            self._finish(t, "deadline")

    def _emit(self, t: Task, delta: str) -> None:
        if delta:
            if t.first is None:
                t.first = time.perf_counter()
            t.text += delta
            t.job.put(delta)

    def _finish(self, t: Task, reason: str, error: str | None = None) -> None:
        if t.post is not None:  # text the stop rules held back is decided now
            self._emit(t, t.post.finish())
        if t.it is not None:
            t.it.close()  # runs the Generation's cleanup (stats totals) and frees its KV cache
            t.it = None
        now = time.perf_counter()
        gen = t.gen
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
            if t in self._active:
                self._active.remove(t)
