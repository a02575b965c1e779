"""`/v1/ws`: the WebSocket completion API for IDE extensions (docs/websocket-api.md).

One connection carries many requests at once. Each accepted request gets `delta` messages and
exactly one `done`; a refused one gets exactly one `error` carrying its id. Nothing a client sends
closes the connection: every bad frame is answered with an `error` and the other requests go on.
Only a frame the transport refuses (over 16 MiB) or a reply that cannot be sent closes it, with a
close code. Closing the socket cancels everything it had in flight, so the engine slots are freed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect

from agents.code.debounce import Supersede

from . import protocol as P
from .backend import Backend, Job, RequestError, Result
from .config import ServerConfig
from .edge import check_request, encode_json
from .metrics import Metrics
from .security import admit_websocket

log = logging.getLogger("domino.server")


@dataclass(eq=False)
class _Inflight:
    id: str
    kind: str  # fim | chat (metrics label, as on the HTTP side)
    document: str | None
    job: Job | None = None
    cancelled: bool = False  # cancel arrived before the backend returned the job

    def cancel(self) -> None:
        self.cancelled = True
        if self.job is not None:
            self.job.cancel()


async def ws_endpoint(websocket: WebSocket) -> None:
    st = websocket.app.state
    if not await admit_websocket(websocket, "ws"):
        return
    await websocket.accept()
    conn = Connection(websocket, st.backend, st.cfg, st.metrics)
    st.metrics.ws_connections.inc()
    try:
        await conn.run()
    finally:
        st.metrics.ws_connections.dec()


class Connection:
    def __init__(self, ws: WebSocket, backend: Backend, cfg: ServerConfig, metrics: Metrics):
        self.ws, self.backend, self.cfg, self.metrics = ws, backend, cfg, metrics
        self.inflight: dict[str, _Inflight] = {}
        self.documents = Supersede()  # a newer `complete` for a document cancels the older one
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.closed = False

    async def run(self) -> None:
        try:
            while not self.closed:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    await self.on_frame(msg, time.perf_counter())
                except Exception:  # a bug must cost one frame an `internal` error, never the connection
                    log.exception("ws frame failed")
                    await self.fail(None, "internal", "internal server error")
        except WebSocketDisconnect:
            pass
        finally:
            self.closed = True
            for entry in list(self.inflight.values()):
                entry.cancel()

    async def send(self, obj: dict) -> None:
        if self.closed:
            return
        text = encode_json(obj)  # always encodable: a send fails only when the socket does
        try:
            async with self._send_lock:  # one writer at a time: many request tasks share the socket
                await self.ws.send_text(text)
        except Exception:  # noqa: BLE001 - the peer went away, or the socket broke: end it, with a reason
            self.closed = True
            try:
                await self.ws.close(1011, "send failed")
            except Exception:  # noqa: BLE001 - already closed
                pass

    async def fail(self, id: str | None, code: str, message: str) -> None:
        self.metrics.error("ws", code)
        await self.send(P.error(id, code, message))

    async def on_frame(self, msg: dict, received: float) -> None:
        text = msg.get("text")
        if text is None:
            return await self.fail(None, "binary_frame", "binary frames are not part of this API; send JSON text frames")
        try:
            m = P.parse_client(text, self.cfg.max_message_bytes)
        except P.ProtocolError as e:
            return await self.fail(e.id, e.code, e.message)
        if isinstance(m, P.Ping):
            return await self.send(P.pong(m.id))
        if isinstance(m, P.Cancel):
            entry = self.inflight.get(m.id)
            if entry is not None:  # an unknown id has usually just finished: nothing to do
                entry.cancel()
            return
        await self.start(m, received)

    async def start(self, m: P.Complete | P.Chat, received: float) -> None:
        if m.id in self.inflight:
            return await self.fail(m.id, "duplicate_id", f"request {m.id!r} is still in flight; ids must be unique")
        if len(self.inflight) >= self.cfg.max_inflight_per_connection:
            return await self.fail(m.id, "too_many_requests", f"at most {self.cfg.max_inflight_per_connection} "
                                                              "requests may be in flight per connection")
        try:
            req = check_request(P.to_gen_request(m, self.cfg.default_max_tokens, received), self.cfg)
        except RequestError as e:
            return await self.fail(m.id, e.code, e.message)
        entry = _Inflight(m.id, req.kind, getattr(m, "document", None))
        self.documents.claim(entry.document, entry)
        self.inflight[m.id] = entry
        task = asyncio.create_task(self.serve(entry, req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, entry: _Inflight, req) -> None:
        try:
            try:
                job = await self.backend.submit(req)
            except RequestError as e:
                return await self.fail(entry.id, e.code, e.message)
            entry.job = job
            job.add_done_callback(functools.partial(self.metrics.observe, api="ws", kind=entry.kind))
            if entry.cancelled or self.closed:
                job.cancel()
            async for ev in job:
                if isinstance(ev, Result):
                    log.info("ws %s %s: %s, %d+%d tokens, ttft %s ms, total %.0f ms", entry.kind, entry.id,
                             ev.finish_reason, ev.prompt_tokens, ev.completion_tokens,
                             None if ev.ttft_ms is None else round(ev.ttft_ms), ev.total_ms)
                    await self.send(P.done(entry.id, ev))
                else:
                    await self.send(P.delta(entry.id, ev))
        except Exception:
            log.exception("ws request %s failed", entry.id)
            await self.fail(entry.id, "internal", "internal server error")
        finally:
            self.inflight.pop(entry.id, None)
            self.documents.release(entry.document, entry)


def attach(app, backend: Backend, cfg: ServerConfig) -> None:
    """`/v1/ws`: the WebSocket completion API."""
    app.add_api_websocket_route("/v1/ws", ws_endpoint)
