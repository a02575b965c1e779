"""API key, Origin and Host allow-lists, request body limit, and logs that hold no secret and no
forged line."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote_plus, urlsplit

from .config import ServerConfig
from .edge import encode_json, error_body, error_response

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


def is_loopback(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1); brackets allowed."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOST_RE = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::\d*)?")


def host_ok(cfg: ServerConfig, host: str | None) -> bool:
    """The Host header against cfg.allowed_hosts (see there): loopback names always pass; bound to
    loopback, other names only when listed. No Host (HTTP/1.0 tools): allowed, browsers always send one."""
    if not host or "*" in cfg.allowed_hosts or (not cfg.allowed_hosts and not is_loopback(cfg.host)):
        return True
    m = _HOST_RE.fullmatch(host)
    name = m.group(1).strip("[]").lower() if m else ""
    return bool(name) and (is_loopback(name) or name in cfg.allowed_hosts)


async def admit_websocket(websocket, api: str) -> bool:
    """The HTTP checks (Host, Origin, key) for a WebSocket handshake. A refused one gets the HTTP
    answer an HTTP request would (401/403 with the error body), where the server supports it, and
    counts in metrics under `api`; the caller just returns."""
    cfg: ServerConfig = websocket.app.state.cfg
    if not host_ok(cfg, websocket.headers.get("host")):
        code, message = "host_not_allowed", "this Host name is not served here (--allow-host)"
    elif not origin_ok(cfg, websocket.headers.get("origin")):
        code, message = "origin_not_allowed", "this Origin is not on the server's allow-list"
    elif not key_ok(cfg, websocket.headers, websocket.query_params):
        code, message = "unauthorized", "missing or wrong API key"
    else:
        return True
    websocket.app.state.metrics.error(api, code)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(code, message))
    else:  # pragma: no cover - servers without the denial-response extension
        await websocket.close(code=1008, reason=code)
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
        body = encode_json(error_body("message_too_large", f"request body over {self.limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---- logs ---------------------------------------------------------------------------------------
# Client text reaches log lines (request ids, paths, error messages). A control character in it
# could forge a line (\n), rewrite the terminal (ESC), reorder text (bidi controls) or, as a lone
# surrogate, make the handler fail; all are written as \xNN / \uNNNN escapes instead.
_OTHER_CONTROLS = "\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ud800-\udfff"
_CONTROL = re.compile(f"[\x00-\x1f{_OTHER_CONTROLS}]")
_CONTROL_IN_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHER_CONTROLS}]")  # keeps \t and \n
_QUERY_PARAM = re.compile(r"([?&])([^=&\s\"]*)=([^&\s\"]*)")
SECRET_PARAMS = frozenset({"token", "api_key", "apikey", "key", "access_token"})


def _escape(m: re.Match) -> str:
    o = ord(m.group())
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def _mask_query(m: re.Match) -> str:
    # decoded as the server decodes queries: `?%74oken=KEY` is `?token=KEY` to the key check too
    return f"{m.group(1)}{m.group(2)}=***" if unquote_plus(m.group(2)).lower() in SECRET_PARAMS else m.group()


def log_safe(text: str, keep_lines: bool = False) -> str:
    """text with secrets in query strings masked and control characters escaped (`keep_lines`:
    tabs and line breaks stay, for tracebacks and messages written to span lines)."""
    if "=" in text:
        text = _QUERY_PARAM.sub(_mask_query, text)
    return (_CONTROL_IN_LINES if keep_lines else _CONTROL).sub(_escape, text)


def _clean_arg(a):
    if isinstance(a, str):
        return log_safe(a)
    if isinstance(a, BaseException):
        return log_safe(str(a))
    return a


def _clean_record(record: logging.LogRecord) -> None:
    if isinstance(record.msg, str):
        record.msg = log_safe(record.msg, keep_lines=True)
    if isinstance(record.args, tuple):
        record.args = tuple(_clean_arg(a) for a in record.args)
    elif isinstance(record.args, Mapping):
        record.args = {k: _clean_arg(v) for k, v in record.args.items()}
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        # formatted now, once: Formatter.format uses a record's exc_text when it is set
        record.exc_text = log_safe(logging.Formatter().formatException(record.exc_info), keep_lines=True)


def install_log_redaction() -> None:
    """Clean every log record the process creates (any logger, any handler: uvicorn's access log,
    ours, the agents'): a record factory, so no logger or handler can be missed. Idempotent."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "domino_clean", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _clean_record(record)
        return record

    factory.domino_clean = True
    logging.setLogRecordFactory(factory)
