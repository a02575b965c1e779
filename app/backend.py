"""The interface every text-generation backend offers to the APIs (WebSocket, OpenAI HTTP) and agents.

Two implementations: `EngineBackend` (the in-process Domino engine, `app/engine_backend.py`) and
`RemoteBackend` (any OpenAI-compatible server, `app/remote.py`). Callers only see:

    job = await backend.submit(GenRequest(...))   # raises RequestError (bad input, overloaded, ...)
    async for ev in job:                           # str = text delta, Result = the last event
        ...
    job.cancel()                                   # from any thread; ends with finish_reason "cancelled"
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "cancelled", "deadline", "error"]
# Scheduling classes, most urgent first (app/scheduler.py): a live voice turn, a completion someone
# is waiting for at the cursor, a chat answer, work nobody watches.
PRIORITIES = ("voice", "interactive", "chat", "background")


# The one error vocabulary of every surface: code -> HTTP status. A WebSocket `error` carries the
# code; HTTP answers with the status and OpenAI's error shape (app/edge.py). docs/websocket-api.md
# lists the codes (a test keeps the two in step).
ERROR_STATUS = {
    "bad_json": 400, "bad_utf8": 400, "binary_frame": 400, "invalid_message": 400, "unknown_type": 400,
    "invalid_request": 400, "prompt_too_long": 400, "duplicate_id": 400,
    "unauthorized": 401, "origin_not_allowed": 403, "host_not_allowed": 403, "not_found": 404,
    "method_not_allowed": 405, "message_too_large": 413, "unsupported_media_type": 415,
    "too_many_requests": 429, "overloaded": 429, "internal": 500, "unavailable": 503,
}


class RequestError(Exception):
    """A request refused; `code` (one of ERROR_STATUS) goes on the wire, `status` is its HTTP status."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status or ERROR_STATUS[code]


@dataclass
class ExtraFile:
    filename: str
    text: str


@dataclass
class GenRequest:
    """One generation, already validated by the API layer.

    kind: "fim" (prefix/suffix [+ extra files]), "chat" (messages) or "text" (a raw prompt).
    """

    kind: Literal["fim", "chat", "text"]
    prefix: str = ""
    suffix: str = ""
    prompt: str = ""
    messages: list[dict] = field(default_factory=list)
    extra: list[ExtraFile] = field(default_factory=list)
    filename: str | None = None
    language: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    method: str | None = None  # None = the backend's default
    single_line: bool = False  # stop rules (agents.code.postprocess): the first line with content
    multi_line: bool = False  # ... or the block at the cursor
    deadline_ms: int | None = None  # from `received`
    # perf_counter() when the request arrived: queue and TTFT timings start here, not at submit().
    received: float = field(default_factory=time.perf_counter)
    tag: str = ""  # a label for logs (API + request id); never prompt text
    priority: str | None = None  # one of PRIORITIES; None: "chat" for chat requests, else "interactive"

    @property
    def priority_class(self) -> str:
        return self.priority or ("chat" if self.kind == "chat" else "interactive")

    @property
    def deadline(self) -> float | None:
        return None if self.deadline_ms is None else self.received + self.deadline_ms / 1000


@dataclass
class Result:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float | None = None  # None when no text came out
    total_ms: float = 0.0
    spec: dict | None = None  # domino_backend.engine.Stats.to_dict(): method, tau, rounds, per-position acceptance, times
    error: str | None = None  # message when finish_reason == "error"

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}  # OpenAI's field

    @property
    def timings(self) -> dict:
        r = lambda x: None if x is None else round(x, 2)
        return {"queue_ms": r(self.queue_ms), "prefill_ms": r(self.prefill_ms), "ttft_ms": r(self.ttft_ms),
                "total_ms": r(self.total_ms)}


@runtime_checkable
class Job(Protocol):
    def cancel(self) -> None: ...

    def add_done_callback(self, fn: Callable[[Result], object]) -> None:
        """Call fn(result) on the event loop when the job ends, however it ends and whether or not
        anyone still iterates it (metrics count requests whose client went away)."""

    def __aiter__(self) -> AsyncIterator[str | Result]: ...


@runtime_checkable
class Backend(Protocol):
    name: str  # "engine" | "remote"
    model_id: str
    default_method: str | None

    async def start(self) -> None:
        """Load the model / connect; the server answers /health with "loading" meanwhile."""

    async def close(self) -> None: ...

    def health(self) -> dict:
        """{"status": "ok" | "loading" | "error", ...}; "ok" means requests will be served."""

    def load(self) -> dict:
        """{"active": n, "queued": n, ...} for metrics (the engine adds its batch counts)."""

    async def submit(self, req: GenRequest) -> Job:
        """Validate and enqueue; raises RequestError. The job's last event is a Result."""


class StreamJob:
    """A Job fed from any thread: producers call `put(delta)` then `finish(result)` exactly once.

    The events cross into the asyncio loop with call_soon_threadsafe, so the engine worker thread
    never blocks on a slow client.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel=None):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_cancel = on_cancel
        self._finished = threading.Event()
        self.cancelled = threading.Event()
        self.result: Result | None = None
        self._callbacks: list[Callable[[Result], object]] = []
        self._cb_lock = threading.Lock()  # finish() runs on the worker thread, add_done_callback on the loop

    def cancel(self) -> None:
        if self._finished.is_set() or self.cancelled.is_set():
            return
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def _post(self, item) -> None:
        self._post_call(self._queue.put_nowait, item)

    def _post_call(self, fn, arg) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # loop closed during shutdown: nobody is listening any more
            pass

    def put(self, delta: str) -> None:
        if delta and not self._finished.is_set():
            self._post(delta)

    def add_done_callback(self, fn: Callable[[Result], object]) -> None:
        with self._cb_lock:
            if self.result is None:
                self._callbacks.append(fn)
                return
        self._post_call(fn, self.result)

    def finish(self, result: Result) -> None:
        with self._cb_lock:
            if self._finished.is_set():
                return
            self._finished.set()
            self.result = result
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:  # before the result: whoever reads it next sees the callbacks' effects
            self._post_call(fn, result)
        self._post(result)

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    async def __aiter__(self):
        while True:
            item = await self._queue.get()
            yield item
            if isinstance(item, Result):
                return


async def collect(job: Job) -> Result:
    """Run a job to the end and return its Result (the text is in `Result.text`)."""
    async for ev in job:
        if isinstance(ev, Result):
            return ev
    raise RuntimeError("job ended without a result")  # pragma: no cover - StreamJob always finishes
