"""OpenAI-compatible HTTP: `/v1/models`, `/v1/completions` (with `suffix` = fill-in-the-middle) and
`/v1/chat/completions`, streaming (SSE) and not. Works with the official `openai` client.

Conventions as in SGLang/vLLM: SSE lines `data: {json}` ending with `data: [DONE]`;
`stream_options.include_usage` adds a last chunk with `usage` and no choices. Speculative decoding
stats and timings ride in an extension field `domino` ({finish_reason, timings, spec}) on the
response, or on the last choice chunk when streaming. Extensions accepted in the body (the openai
client sends them with `extra_body`): `method`, `single_line`, `multi_line` (completions),
`deadline_ms`, `top_k`.

OpenAI finish reasons are stop | length: a `deadline` finish is reported as "length" (the text was
cut by a budget), with the precise reason in `domino.finish_reason`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .backend import Backend, GenRequest, Job, RequestError, Result
from .edge import (DeadlineMs, JSONBody, MaxTokens, Seed, Temperature, TopK, TopP, check_request, decode_json,
                   encode_json, error_body, error_response, validation_message)

log = logging.getLogger("domino.server")
router = APIRouter()

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI (and vLLM) default for legacy completions


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown OpenAI parameters are ignored (clients send many); the unsupported ones that would
    # change the output are refused in `_check_unsupported`.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0  # the OpenAI default
    top_p: TopP = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    # extensions
    top_k: TopK = 0
    method: str | None = None
    single_line: bool = False
    deadline_ms: DeadlineMs | None = None


class CompletionBody(_Common):
    multi_line: bool = False  # extension: the block at the cursor (agents.code.postprocess)
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class ChatContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatContentPart] | None = None


class ChatBody(_Common):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    tools: list | None = None


def _check_unsupported(body: _Common) -> None:
    bad = []
    if body.n != 1:
        bad.append("n (only n=1)")
    if getattr(body, "echo", False):
        bad.append("echo")
    if getattr(body, "logprobs", None):
        bad.append("logprobs")
    if (getattr(body, "best_of", None) or 1) != 1:
        bad.append("best_of")
    if getattr(body, "tools", None):
        bad.append("tools")
    if bad:
        raise RequestError("invalid_request", f"unsupported parameter(s): {', '.join(bad)}")


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def completion_request(body: CompletionBody, received: float) -> GenRequest:
    _check_unsupported(body)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise RequestError("invalid_request", "prompt lists must hold exactly one string (batches: send one request each)")
        prompt = prompt[0]
    common = dict(max_tokens=body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS, temperature=body.temperature,
                  top_p=body.top_p, top_k=body.top_k, stop=_stops(body.stop), seed=body.seed, method=body.method,
                  single_line=body.single_line, multi_line=body.multi_line, deadline_ms=body.deadline_ms,
                  received=received)
    if body.suffix is not None:
        return GenRequest(kind="fim", prefix=prompt, suffix=body.suffix, tag="http:completions", **common)
    return GenRequest(kind="text", prompt=prompt, tag="http:completions", **common)


def chat_request(body: ChatBody, default_max_tokens: int, received: float) -> GenRequest:
    _check_unsupported(body)
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return GenRequest(kind="chat", messages=messages,
                      max_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
                      temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, stop=_stops(body.stop),
                      seed=body.seed, method=body.method, single_line=body.single_line,
                      deadline_ms=body.deadline_ms, received=received, tag="http:chat")


async def read_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body as `model`, decoded as every surface decodes (app/edge.py); RequestError else."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise RequestError("unsupported_media_type", f"the body must be JSON: send Content-Type: application/json "
                                                     f"(got {media[:64]!r})")
    data = decode_json(await request.body())
    if not isinstance(data, dict):
        raise RequestError("invalid_message", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestError("invalid_request", validation_message(e)) from None


def openai_finish(r: Result) -> str:
    return "length" if r.finish_reason in ("length", "deadline") else "stop"


def extension(r: Result) -> dict:
    return {"finish_reason": r.finish_reason, "timings": r.timings, "spec": r.spec}


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Non-streaming requests: a client that hangs up must free its engine slot too."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            job.cancel()
            return


async def _run(request: Request, req: GenRequest, stream: bool, include_usage: bool, chat: bool):
    st = request.app.state
    api = "openai"
    kind = "chat" if chat else req.kind
    try:
        job = await st.backend.submit(req)
    except RequestError as e:
        st.metrics.error(api, e.code)
        return error_response(e.code, e.message, e.status)
    except Exception:
        log.exception("%s request failed", req.tag)
        st.metrics.error(api, "internal")
        return error_response("internal", "internal server error")
    # counted however the request ends, also when a streaming client hangs up mid-stream
    job.add_done_callback(functools.partial(st.metrics.observe, api=api, kind=kind))
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    model = st.backend.model_id
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None = None, ext: dict | None = None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if ext is not None:
            payload["domino"] = ext
        return f"data: {encode_json(payload)}\n\n"

    if stream:
        async def events():
            try:
                if chat:
                    yield chunk(None, first=True)
                async for ev in job:
                    if isinstance(ev, str):
                        yield chunk(ev)
                        continue
                    if ev.finish_reason == "error":
                        yield f"data: {encode_json(error_body('internal', ev.error or 'generation failed'))}\n\n"
                    else:
                        yield chunk(None if chat else "", openai_finish(ev), extension(ev))
                        if include_usage:
                            usage = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                                     "usage": ev.usage}
                            yield f"data: {encode_json(usage)}\n\n"
                    yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # no-op when finished; frees the slot when the client went away

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        result: Result | None = None
        async for ev in job:
            if isinstance(ev, Result):
                result = ev
    finally:
        watcher.cancel()
        job.cancel()
    if result.finish_reason == "error":
        return error_response("internal", result.error or "generation failed")
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": openai_finish(result)}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": openai_finish(result)}
    return JSONBody({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                     "model": model, "choices": [choice], "usage": result.usage, "domino": extension(result)})


@router.get("/v1/models")
async def models(request: Request):
    b = request.app.state.backend
    return {"object": "list", "data": [{"id": b.model_id, "object": "model", "created": 0, "owned_by": "domino"}]}


async def _serve(request: Request, model: type[_Common], chat: bool):
    """Decode, validate and check the body (app/edge.py), then run it; every refusal is an OpenAI error."""
    received = time.perf_counter()
    cfg = request.app.state.cfg
    try:
        body = await read_body(request, model)
        req = chat_request(body, cfg.default_max_tokens, received) if chat else completion_request(body, received)
        check_request(req, cfg)
    except RequestError as e:
        request.app.state.metrics.error("openai", e.code)
        return error_response(e.code, e.message, e.status)
    inc = bool(body.stream_options and body.stream_options.include_usage)
    return await _run(request, req, body.stream, inc, chat=chat)


@router.post("/v1/completions")
async def completions(request: Request):
    return await _serve(request, CompletionBody, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _serve(request, ChatBody, chat=True)


def attach(app, backend: Backend, cfg) -> None:
    """`/v1/models`, `/v1/completions`, `/v1/chat/completions` (OpenAI-compatible, SSE streaming)."""
    app.include_router(router)
