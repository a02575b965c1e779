"""Any OpenAI-compatible server (SGLang, vLLM, llama.cpp, another Domino) behind the Backend interface.

Requests stream from the remote (`stream: true`), so deltas, cancellation, deadlines and the stop
rules (`single_line`, `multi_line`) behave as with the in-process engine: cancelling closes the
HTTP stream, which makes the remote server drop the request. Concurrency is bounded the same way (`max_active` in flight,
`max_queue` waiting, then `overloaded`). Spec stats come through when the remote is a Domino server
(its `domino` extension field); otherwise `spec` is null.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx

from agents.code.fim import remote_prompt
from agents.code.postprocess import Postprocessor, for_request

from .backend import GenRequest, RequestError, Result, StreamJob
from .config import ServerConfig

log = logging.getLogger("domino.server")


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class RemoteBackend:
    name = "remote"
    default_method = None

    def __init__(self, cfg: ServerConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.cfg = cfg
        self.base = _base_url(cfg.backend_url or "")
        self.model_id = cfg.backend_model or "remote"
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._status, self._error = "loading", None
        self._active = self._queued = 0
        self._sem: asyncio.Semaphore | None = None
        self._probe: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        headers = {"Authorization": f"Bearer {self.cfg.backend_api_key}"} if self.cfg.backend_api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base, headers=headers, transport=self._transport,
            timeout=httpx.Timeout(self.cfg.backend_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=self.cfg.max_active + 4),
        )
        self._sem = asyncio.Semaphore(self.cfg.max_active)
        self._probe = asyncio.create_task(self._discover())

    async def _discover(self) -> None:
        """Learn the model name from /models; retry until the remote answers."""
        while True:
            try:
                r = await self._client.get("/models", timeout=10.0)
                r.raise_for_status()
                models = [m["id"] for m in r.json().get("data", [])]
                if self.cfg.backend_model is None and models:
                    self.model_id = models[0]
                self._status, self._error = "ok", None
                log.info("remote backend %s ready, model %s", self.base, self.model_id)
                return
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                self._status, self._error = "loading", f"remote backend not reachable yet: {type(e).__name__}"
            await asyncio.sleep(2.0)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._client is not None:
            await self._client.aclose()

    def health(self) -> dict:
        h = {"status": self._status, "backend": self.name, "model": self.model_id, "url": self.base}
        if self._error:
            h["error"] = self._error
        return h

    def load(self) -> dict:
        return {"active": self._active, "queued": self._queued}

    async def submit(self, req: GenRequest) -> StreamJob:
        if self._status != "ok":
            raise RequestError("unavailable", self._error or "the remote backend is not ready", 503)
        if self._active + self._queued >= self.cfg.max_active + self.cfg.max_queue:
            raise RequestError("overloaded", "server busy; retry later", 429)
        post = for_request(req)
        holder: list[asyncio.Task] = []
        loop = self._loop
        job = StreamJob(loop, on_cancel=lambda: holder and loop.call_soon_threadsafe(holder[0].cancel))
        self._queued += 1  # counted now, so a burst of submits sees the queue fill up
        holder.append(asyncio.create_task(self._run(req, job, post)))
        return job

    def _body(self, req: GenRequest) -> tuple[str, dict]:
        body = {"model": self.model_id, "max_tokens": req.max_tokens, "temperature": req.temperature,
                "top_p": req.top_p, "stream": True, "stream_options": {"include_usage": True}}
        if req.stop:
            body["stop"] = req.stop
        if req.seed is not None:
            body["seed"] = req.seed
        if req.top_k:
            body["top_k"] = req.top_k
        if req.method:
            body["method"] = req.method  # understood by Domino servers, ignored by others
        if req.kind == "chat":
            return "/chat/completions", {**body, "messages": req.messages}
        if req.kind == "fim":  # remote FIM templates take prompt + suffix; context files go in front
            return "/completions", {**body, "prompt": remote_prompt(req.prefix, req.extra), "suffix": req.suffix}
        return "/completions", {**body, "prompt": req.prompt}

    async def _run(self, req: GenRequest, job: StreamJob, post: Postprocessor | None) -> None:
        st = {"text": "", "first": None, "started": None, "usage": {}, "ext": None, "finish": None}
        reason, error = "stop", None
        queued = True
        try:
            timeout = None if req.deadline is None else max(0.0, req.deadline - time.perf_counter())
            async with asyncio.timeout(timeout):
                async with self._sem:
                    self._queued -= 1
                    queued = False
                    self._active += 1
                    try:
                        st["started"] = time.perf_counter()
                        reason, error = await self._stream(req, job, st, post)
                    finally:
                        self._active -= 1
        except TimeoutError:
            reason = "deadline"
        except asyncio.CancelledError:
            reason = "cancelled"  # job.cancel(): leaving the `async with` closed the HTTP stream
        except httpx.HTTPError as e:
            reason, error = "error", f"remote backend failed: {type(e).__name__}"
        except Exception as e:
            log.exception("remote request %s failed", req.tag)
            reason, error = "error", f"remote backend failed: {type(e).__name__}"
        finally:
            if queued:
                self._queued -= 1
        now = time.perf_counter()
        if post is not None:  # text the stop rules held back is decided now
            self._emit(job, st, post.finish())
        usage = st["usage"] or {}
        ext = st["ext"] or {}
        job.finish(Result(
            text=st["text"], finish_reason=reason, prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            queue_ms=((st["started"] or now) - req.received) * 1000,
            prefill_ms=(ext.get("timings") or {}).get("prefill_ms") or 0.0,
            ttft_ms=(st["first"] - req.received) * 1000 if st["first"] else None,
            total_ms=(now - req.received) * 1000, spec=ext.get("spec"), error=error,
        ))

    @staticmethod
    def _emit(job: StreamJob, st: dict, text: str) -> None:
        if text:
            st["first"] = st["first"] or time.perf_counter()
            st["text"] += text
            job.put(text)

    async def _stream(self, req: GenRequest, job: StreamJob, st: dict,
                      post: Postprocessor | None) -> tuple[str, str | None]:
        path, body = self._body(req)
        chat = req.kind == "chat"
        async with self._client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread())[:500].decode("utf-8", "replace")
                if resp.status_code == 429:
                    return "error", "remote backend overloaded (429)"
                return "error", f"remote backend answered {resp.status_code}: {detail}"
            async for raw in resp.aiter_lines():
                if not raw.startswith("data:"):
                    continue
                data = raw[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return "error", f"remote backend error: {str(chunk['error'])[:300]}"
                st["usage"] = chunk.get("usage") or st["usage"]
                st["ext"] = chunk.get("domino") or st["ext"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if choice.get("finish_reason"):
                        st["finish"] = choice["finish_reason"]
                    if not text:
                        continue
                    done = False
                    if post is not None:
                        text, done = post.feed(text)
                    self._emit(job, st, text)
                    if done:
                        return "stop", None  # leaving the block closes the stream: the remote stops
        ext_reason = (st["ext"] or {}).get("finish_reason")
        if ext_reason in ("stop", "length"):
            return ext_reason, None
        return ("length" if st["finish"] == "length" else "stop"), None
