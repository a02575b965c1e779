"""What every surface does with what a client sends and what it gets back: one JSON decoder, one set
of sampling fields and request limits, one error shape, one JSON encoder.

The WebSocket API (`app.ws`), the OpenAI HTTP API (`app.openai_api`) and any later surface (voice,
agents) use these, so one kind of bad input gets one answer everywhere:

    obj = decode_json(frame_or_body)      # RequestError bad_json | bad_utf8, never anything else
    msg = decode_message(ws_text, limit)  # the same for a WebSocket frame: a size-checked JSON object
    ...validate obj with a pydantic model built from Temperature, TopP, Seed, ...
    check_request(gen_request, cfg)       # the server's limits, before any tokenizing
    text = encode_json(reply)             # always encodable as UTF-8
    error_response(code, message)         # HTTP: OpenAI's error shape, status from ERROR_STATUS

Invariant: strings that come out of `decode_json` are valid Unicode (lone surrogates, which JSON's
`\\ud800` escapes can produce and which no tokenizer, socket or log accepts, become U+FFFD), so
nothing downstream can fail on encoding them.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import Field, ValidationError
from starlette.responses import JSONResponse

from domino_backend.engine import MAX_STOP_CHARS

from .backend import ERROR_STATUS, ExtraFile, GenRequest, RequestError
from .config import ServerConfig

# ---- sampling fields, shared by every request model ---------------------------------------------
# Ranges are what the engine can honour: below this top_p the nucleus cut rounds to nothing in fp32
# (every token dropped, a NaN distribution); seeds must fit torch.Generator.manual_seed.
TOP_P_MIN = 1e-6
MaxTokens = Annotated[int, Field(ge=1)]  # the upper bound is a server limit: check_request
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=TOP_P_MIN, le=1.0)]
TopK = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=-(1 << 63), le=(1 << 64) - 1)]
DeadlineMs = Annotated[int, Field(ge=1, le=3_600_000)]


# ---- decode -------------------------------------------------------------------------------------
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # Python refuses integers over 4300 digits
        raise ValueError(f"a number with {len(digits)} digits is too large") from None


def decode_json(data: str | bytes) -> Any:
    """Parse one message or body. RequestError `bad_utf8` (bytes that are not UTF-8, or a WebSocket
    frame the transport passed on with its bad bytes as surrogates) or `bad_json` (syntax, NaN or
    Infinity, huge integers, nesting too deep); lone surrogates from `\\u` escapes become U+FFFD."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("bad_utf8", "the body is not valid UTF-8") from None
    elif _SURROGATE.search(data):  # see app/transport.py
        raise RequestError("bad_utf8", "the text frame is not valid UTF-8")
    if not data.strip():
        raise RequestError("bad_json", "the message is empty: send a JSON object")
    try:
        obj = json.loads(data, parse_int=_int, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError("bad_json", "not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise RequestError("bad_json", f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except ValueError as e:
        raise RequestError("bad_json", f"not valid JSON: {e}") from None
    return _replace_surrogates(obj) if _SURROGATE_ESCAPE.search(data) else obj


def decode_message(text: str, limit: int) -> dict:
    """One WebSocket text frame of at most `limit` UTF-8 bytes, decoded as decode_json, that must be a
    JSON object (`message_too_large`, `invalid_message`); every WebSocket surface reads frames so."""
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise RequestError("message_too_large", f"message over {limit} bytes")
    obj = decode_json(text)
    if not isinstance(obj, dict):
        raise RequestError("invalid_message", 'a message must be a JSON object with a "type" field')
    return obj


def _replace_surrogates(obj: Any) -> Any:
    """Every string in obj (keys too) with lone surrogates replaced by U+FFFD, in place; iterative,
    so nesting that json.loads accepted cannot overflow the stack here."""
    fix = lambda s: _SURROGATE.sub("\ufffd", s)  # noqa: E731
    if isinstance(obj, str):
        return fix(obj)
    stack = [obj]
    while stack:
        c = stack.pop()
        if isinstance(c, list):
            for i, v in enumerate(c):
                if isinstance(v, str):
                    c[i] = fix(v)
                elif isinstance(v, (list, dict)):
                    stack.append(v)
        elif isinstance(c, dict):
            items = list(c.items())
            c.clear()
            for k, v in items:
                if isinstance(v, str):
                    v = fix(v)
                elif isinstance(v, (list, dict)):
                    stack.append(v)
                c[fix(k)] = v
    return obj


def validation_message(e: ValidationError, skip: int = 0) -> str:
    """A pydantic error as one line naming the fields (`loc[skip:]`; WebSocket unions put the tag
    first). Input values are not repeated: the client has them, and they may be huge."""
    parts = []
    for err in e.errors(include_input=False, include_url=False)[:5]:
        loc = ".".join(str(x)[:64] for x in err["loc"][skip:]) or "message"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{e.error_count() - 5} more)" if e.error_count() > 5 else ""
    return "; ".join(parts)[:1000] + more


# ---- limits ---------------------------------------------------------------------------------------
def check_request(req: GenRequest, cfg: ServerConfig) -> GenRequest:
    """The server's limits on a request, checked at the edge before any tokenizing. Raises
    RequestError (`invalid_request`, `prompt_too_long`); returns `req` normalized: empty stop
    strings dropped, FIM text cut to the character bound around the cursor."""
    if not 1 <= req.max_tokens <= cfg.max_tokens_limit:
        raise RequestError("invalid_request", f"max_tokens must be between 1 and {cfg.max_tokens_limit}, "
                                              f"got {req.max_tokens}")
    req.stop = [s for s in req.stop if s]
    if len(req.stop) > cfg.max_stop_strings:
        raise RequestError("invalid_request", f"at most {cfg.max_stop_strings} stop strings are allowed, "
                                              f"got {len(req.stop)}")
    if any(len(s) > MAX_STOP_CHARS for s in req.stop):
        raise RequestError("invalid_request", f"stop strings may have at most {MAX_STOP_CHARS} characters")
    n = cfg.max_prompt_chars
    if req.kind == "fim":
        # FIM prompts are trimmed to the token limit around the cursor (agents.code.fim), never
        # refused for their size; text farther from the cursor than the bound could not be kept,
        # so it goes now, before the trimming tokenizes anything.
        req.prefix, req.suffix = req.prefix[-n:], req.suffix[:n]
        req.extra = [f if len(f.text) <= n else ExtraFile(f.filename, f.text[:n]) for f in req.extra]
        return req
    chars = len(req.prompt) + sum(len(m.get("content") or "") for m in req.messages)
    if chars > n:
        raise RequestError("prompt_too_long", f"the prompt has {chars} characters; the limit is {n} "
                                              f"(and {cfg.max_prompt_tokens} tokens)")
    return req


# ---- encode -------------------------------------------------------------------------------------
def encode_json(obj: Any) -> str:
    """Compact JSON text that always encodes as UTF-8 (a string with a lone surrogate, which should
    not exist past decode_json, is sent \\u-escaped rather than failing the send)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if _SURROGATE.search(text):
        text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    return text


class JSONBody(JSONResponse):
    """starlette's JSONResponse, encoded with encode_json."""

    def render(self, content: Any) -> bytes:
        return encode_json(content).encode("utf-8")


# OpenAI's error `type` by HTTP status; everything else is invalid_request_error (4xx) / server_error.
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 429: "rate_limit_error"}


def error_body(code: str, message: str, status: int | None = None) -> dict:
    """OpenAI's error shape, used by every HTTP answer (and the refused WebSocket handshake)."""
    status = status or ERROR_STATUS[code]
    kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(code: str, message: str, status: int | None = None) -> JSONBody:
    """The HTTP answer for an error code; the status comes from ERROR_STATUS unless given."""
    return JSONBody(error_body(code, message, status), status_code=status or ERROR_STATUS[code])
