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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "cancelled", "deadline", "error"]


class RequestError(Exception):
    """A request the backend refuses; `code` goes on the wire, `status` is the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


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
        """{"active": n, "queued": n} for metrics."""

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

    def cancel(self) -> None:
        if self._finished.is_set() or self.cancelled.is_set():
            return
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # loop closed during shutdown: nobody is listening any more
            pass

    def put(self, delta: str) -> None:
        if delta and not self._finished.is_set():
            self._post(delta)

    def finish(self, result: Result) -> None:
        if self._finished.is_set():
            return
        self._finished.set()
        self.result = result
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


def clamp_stop(stop: list[str], limit: int) -> list[str]:
    stop = [s for s in stop if s]
    if len(stop) > limit:
        raise RequestError("invalid_request", f"at most {limit} stop strings are allowed, got {len(stop)}")
    return stop
