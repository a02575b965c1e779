"""WebSocket API messages (`/v1/ws`), validated with pydantic v2. Documented in docs/websocket-api.md.

Client -> server: complete, chat, cancel, ping. Server -> client: delta, done, error, pong.
Validation is strict (no "12" for 12, no 1 for true) so that a client bug surfaces as an error
instead of a silently different request; unknown fields are ignored so that newer clients keep
working with older servers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .backend import ExtraFile, GenRequest, RequestError, Result
from .edge import DeadlineMs, MaxTokens, Seed, Temperature, TopP, decode_message, validation_message

RequestId = Annotated[str, Field(min_length=1, max_length=128)]


class _Msg(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ExtraFileMsg(_Msg):
    filename: str = Field(max_length=1024)
    text: str


class _Sampling(_Msg):
    max_tokens: MaxTokens | None = None  # None = server default
    temperature: Temperature = 0.0  # greedy by default: completions should be stable
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: list[str] = Field(default_factory=list)
    deadline_ms: DeadlineMs | None = None
    method: str | None = None  # ar | ngram | dflash | domino | domino+ngram (default: the server's)
    priority: Literal["voice", "interactive", "chat", "background"] | None = None  # default: by kind (app.backend)


class Complete(_Sampling):
    type: Literal["complete"]
    id: RequestId
    prefix: str = ""
    suffix: str = ""
    language: str | None = Field(None, max_length=64)
    filename: str | None = Field(None, max_length=1024)
    extra: list[ExtraFileMsg] = Field(default_factory=list, max_length=64)
    single_line: bool = False
    multi_line: bool = False
    document: str | None = Field(None, max_length=1024)  # a newer complete on this key supersedes older ones


class ChatMessage(_Msg):
    role: Literal["system", "user", "assistant"]
    content: str


class Chat(_Sampling):
    type: Literal["chat"]
    id: RequestId
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class Cancel(_Msg):
    type: Literal["cancel"]
    id: RequestId


class Ping(_Msg):
    type: Literal["ping"]
    id: str | None = Field(None, max_length=128)


ClientMessage = Annotated[Complete | Chat | Cancel | Ping, Field(discriminator="type")]
_client = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("complete", "chat", "cancel", "ping")


class ProtocolError(RequestError):
    """A RequestError tied to the request id it could be read from (None if none could)."""

    def __init__(self, code: str, message: str, id: str | None = None):
        super().__init__(code, message)
        self.id = id


def parse_client(text: str, limit: int) -> Complete | Chat | Cancel | Ping:
    """Parse one text frame of at most `limit` bytes; ProtocolError with a wire code for anything wrong
    with it."""
    try:
        data = decode_message(text, limit)
    except RequestError as e:
        raise ProtocolError(e.code, e.message) from None
    rid = data.get("id") if isinstance(data.get("id"), str) and 0 < len(data["id"]) <= 128 else None
    mtype = data.get("type")
    if mtype not in CLIENT_TYPES:
        shown = mtype if isinstance(mtype, str) and len(mtype) < 64 else type(mtype).__name__
        raise ProtocolError("unknown_type", f"unknown message type {shown!r}; expected one of "
                                            f"{', '.join(CLIENT_TYPES)}", rid)
    try:
        return _client.validate_python(data)
    except ValidationError as e:
        raise ProtocolError("invalid_request", validation_message(e, skip=1), rid) from None  # loc[0]: the tag


def to_gen_request(msg: Complete | Chat, default_max_tokens: int, received: float) -> GenRequest:
    common = dict(max_tokens=msg.max_tokens or default_max_tokens, temperature=msg.temperature, top_p=msg.top_p,
                  seed=msg.seed, stop=list(msg.stop), deadline_ms=msg.deadline_ms, method=msg.method,
                  priority=msg.priority, received=received, tag=f"ws:{msg.id}")
    if isinstance(msg, Chat):
        return GenRequest(kind="chat", messages=[m.model_dump() for m in msg.messages], **common)
    if not msg.prefix and not msg.suffix:
        raise RequestError("invalid_request", "complete needs a prefix or a suffix")
    return GenRequest(kind="fim", prefix=msg.prefix, suffix=msg.suffix,
                      extra=[ExtraFile(f.filename, f.text) for f in msg.extra], filename=msg.filename,
                      language=msg.language, single_line=msg.single_line, multi_line=msg.multi_line, **common)


# ---- server -> client ---------------------------------------------------------------------------
def delta(id: str, text: str) -> dict:
    return {"type": "delta", "id": id, "text": text}


def done(id: str, r: Result) -> dict:
    msg = {"type": "done", "id": id, "finish_reason": r.finish_reason, "text": r.text, "usage": r.usage,
           "timings": r.timings, "spec": r.spec}
    if r.error:
        msg["error"] = r.error
    return msg


def error(id: str | None, code: str, message: str) -> dict:
    return {"type": "error", "id": id, "code": code, "message": message}


def pong(id: str | None) -> dict:
    return {"type": "pong", "id": id}
