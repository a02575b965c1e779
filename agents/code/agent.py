"""The code agent: completions at a cursor over any `app.backend.Backend` (the in-process engine or
`--backend-url`), for the UI's Code tab and other Python callers.

    agent = CodeAgent(backend, CodeConfig(debounce_ms=150))
    job = await agent.complete(prefix, suffix, mode="block", files=[ExtraFile("util.py", text)],
                               filename="main.py", document="tab-1")
    async for ev in job:   # str deltas, then a Result (finish_reason "cancelled" when superseded)
        ...

The request it sends is the same `GenRequest` the WebSocket and OpenAI APIs send, so prompt
building (`agents.code.fim`, with repo context and budget trimming) and the stop rules
(`agents.code.postprocess`) are the ones every surface gets; the agent adds the debounce and the
per-document supersede (`agents.code.debounce`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from app.backend import Backend, ExtraFile, GenRequest, Job, Result, collect

from .debounce import Supersede

Mode = Literal["line", "block", "raw"]
MODES = ("line", "block", "raw")


@dataclass(frozen=True)
class CodeConfig:
    debounce_ms: int = 0  # wait this long after a request; a newer one for the same document replaces it
    line_max_tokens: int = 64  # per mode, when the caller gives no max_tokens
    block_max_tokens: int = 256
    method: str | None = None  # None: the backend's default


def split_at_marker(text: str, marker: str) -> tuple[str, str]:
    """(prefix, suffix) of an editor text with exactly one cursor marker in it."""
    if not marker:
        raise ValueError("the cursor marker is empty")
    n = text.count(marker)
    if n != 1:
        raise ValueError(f"put exactly one cursor marker {marker!r} in the code (found {n})")
    prefix, _, suffix = text.partition(marker)
    return prefix, suffix


def code_request(prefix: str, suffix: str = "", *, mode: Mode = "line", files=(), filename: str | None = None,
                 language: str | None = None, max_tokens: int | None = None, temperature: float = 0.0,
                 method: str | None = None, config: CodeConfig = CodeConfig(), tag: str = "code") -> GenRequest:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if max_tokens is None:
        max_tokens = config.line_max_tokens if mode == "line" else config.block_max_tokens
    return GenRequest(kind="fim", prefix=prefix, suffix=suffix, extra=[ExtraFile(f.filename, f.text) for f in files],
                      filename=filename, language=language, max_tokens=max_tokens, temperature=temperature,
                      method=method or config.method, single_line=mode == "line", multi_line=mode == "block",
                      tag=tag)


class CodeAgent:
    def __init__(self, backend: Backend, config: CodeConfig | None = None):
        self.backend = backend
        self.config = config or CodeConfig()
        self.supersede = Supersede(self.config.debounce_ms)

    async def complete(self, prefix: str, suffix: str = "", *, document: str | None = None, **options) -> Job:
        """Submit a completion (options: those of `code_request`). With a `document`, a newer
        call for it cancels this one. Raises `RequestError` when the backend refuses it."""
        req = code_request(prefix, suffix, config=self.config, **options)
        ticket = _Ticket(self.supersede, document)
        self.supersede.claim(document, ticket)
        try:
            if not await self.supersede.settle(document, ticket):
                return _Superseded()
            ticket.job = await self.backend.submit(req)
        except BaseException:
            self.supersede.release(document, ticket)
            raise
        if ticket.cancelled:  # superseded while the backend was queueing it
            ticket.job.cancel()
        return ticket

    async def complete_text(self, prefix: str, suffix: str = "", **options) -> Result:
        return await collect(await self.complete(prefix, suffix, **options))


class _Ticket:
    """A submitted completion that holds its document until it ends."""

    def __init__(self, supersede: Supersede, document: str | None):
        self.supersede, self.document = supersede, document
        self.job: Job | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.job is not None:
            self.job.cancel()

    def add_done_callback(self, fn) -> None:
        self.job.add_done_callback(fn)

    async def __aiter__(self):
        try:
            async for ev in self.job:
                yield ev
        finally:
            self.supersede.release(self.document, self)


class _Superseded:
    """A request replaced during its debounce: it never reached the backend."""

    result = Result(text="", finish_reason="cancelled")

    def cancel(self) -> None:
        pass

    def add_done_callback(self, fn) -> None:
        asyncio.get_running_loop().call_soon(fn, self.result)

    async def __aiter__(self):
        yield self.result
