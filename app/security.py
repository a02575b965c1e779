"""API key, Origin allow-list, request body limit, and keeping secrets out of logs."""

from __future__ import annotations

import hmac
import json
import logging
import re
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

from .config import ServerConfig

# Paths anyone may read: load balancers and the UI poll /health without a key.
PUBLIC_PATHS = ("/health",)
# The browser UI keeps the key here after the user opened `/?token=KEY` once (ui/app.py sets it,
# HttpOnly + SameSite=Strict, so other sites' pages never send it).
KEY_COOKIE = "domino_key"


def presented_key(headers, query_params) -> str | None:
    """The key a client sent: `Authorization: Bearer K`, `X-API-Key: K`, `?token=K` (browsers cannot
    set headers on a WebSocket handshake, so the query parameter is the only way for them), or the UI's
    cookie."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key") or query_params.get("token") or _cookie(headers, KEY_COOKIE)


def _cookie(headers, name: str) -> str | None:
    try:
        morsel = SimpleCookie(headers.get("cookie", "")).get(name)
    except CookieError:
        return None
    return morsel.value if morsel is not None and morsel.value else None


def key_ok(cfg: ServerConfig, headers, query_params) -> bool:
    if cfg.api_key is None:
        return True
    got = presented_key(headers, query_params)
    # constant time: the comparison must not leak how many leading characters matched
    return got is not None and hmac.compare_digest(got.encode(), cfg.api_key.encode())


def origin_ok(cfg: ServerConfig, origin: str | None) -> bool:
    """No Origin header (IDE extensions, curl, the openai client): allowed. A browser Origin must match
    an entry: "*", "scheme://*", "scheme://host" (any port) or "scheme://host:port"."""
    if not origin:
        return True
    try:
        o = urlsplit(origin)
        o_host, o_port = o.hostname, o.port
    except ValueError:
        return False
    for entry in cfg.allowed_origins:
        if entry == "*":
            return True
        e = urlsplit(entry)
        if e.scheme != o.scheme:
            continue
        if e.netloc == "*":
            return True
        try:
            if e.hostname == o_host and (e.port is None or e.port == o_port):
                return True
        except ValueError:
            continue
    return False


class BodyLimit:
    """ASGI middleware: refuse HTTP bodies over `limit` bytes with 413. With Content-Length the header
    decides (the HTTP parser holds the body to it); without (chunked), the body is read here up to the
    limit and replayed to the app, so the app never sees a partial body."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        if length is not None:
            if length > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # disconnected while sending
                return
            body = msg.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await self._refuse(send)
            chunks.append(body)
            more = msg.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        body = json.dumps({"error": {"message": f"request body over {self.limit} bytes", "type": "invalid_request_error",
                                     "param": None, "code": "message_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


_TOKEN_RE = re.compile(r"([?&](?:token|api_key|key)=)[^&\s\"]*", re.IGNORECASE)


class RedactSecrets(logging.Filter):
    """uvicorn's access log prints the full URL, which would include `?token=...`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_RE.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = _TOKEN_RE.sub(r"\1***", record.msg)
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn", "domino.server"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in lg.filters):
            lg.addFilter(RedactSecrets())
