"""uvicorn's WebSocket protocol, made tolerant of text frames with invalid UTF-8.

RFC 6455 tells a server to fail the whole connection on such a frame (close 1007). For an IDE
connection that would also kill every other completion in flight on it, so instead the frame is
passed to the app with the bad bytes as lone surrogates (`surrogateescape`), and `/v1/ws` answers
it with an `error` message (code `bad_utf8`). Valid frames are delivered exactly as before. A
handshake refused with an HTTP answer (401/403) counts as complete, so it is not logged as an error.

Only `python -m app` (`app.server.run`) uses this; under a plain `uvicorn app.server:app` the
standard behaviour (close 1007) applies.
"""

from __future__ import annotations

import logging

log = logging.getLogger("domino.server")


def tolerant_ws_protocol():
    """The protocol class for uvicorn's `ws=` option, or "auto" if uvicorn's internals have moved."""
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    except ImportError:  # pragma: no cover
        return "auto"
    if not hasattr(WebSocketsSansIOProtocol, "send_receive_event_to_app"):
        return "auto"  # pragma: no cover

    class TolerantWebSocketProtocol(WebSocketsSansIOProtocol):
        def send_receive_event_to_app(self) -> None:
            if self.curr_msg_data_type == "text" and not self.close_sent:
                data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
                try:
                    data.decode()
                except UnicodeDecodeError:
                    self.frames = []
                    self.queue.put_nowait({"type": "websocket.receive",
                                           "text": data.decode("utf-8", "surrogateescape")})
                    if not self.read_paused:
                        self.read_paused = True
                        self.transport.pause_reading()
                    return
            super().send_receive_event_to_app()

        async def send(self, message) -> None:
            await super().send(message)
            if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
                # A refused handshake (401/403 answer) is complete too: without this uvicorn logs
                # "ASGI callable returned without completing handshake" at ERROR for every refusal.
                self.handshake_complete = True

    return TolerantWebSocketProtocol
