"""The in-process Domino engine behind the Backend interface."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading

from domino_backend import methods
from domino_backend.engine import GenerationRequest
from domino_backend.quant import weight_format

from agents.code.postprocess import for_request

from .backend import GenRequest, RequestError, StreamJob
from .config import ServerConfig
from .prompting import build_prompt
from .scheduler import EngineThread, Scheduler, Task

log = logging.getLogger("domino.server")


def engine_threads() -> int:
    """Torch threads for the engine's rounds: every core (the load benchmark served 16 clients
    markedly faster on both cores of the 2-core dev box than on one)."""
    return os.cpu_count() or 1


def shared_threads() -> int:
    """Torch threads while the server's own speech recognition or synthesis runs: one core fewer.
    OpenMP threads that find their core busy stall every parallel region (on the 2-core dev box a
    tiny-model forward took 35x longer with 2 threads than with 1 while another process was busy)."""
    return max(1, (os.cpu_count() or 2) - 1)


class EngineBackend:
    name = "engine"

    def __init__(self, cfg: ServerConfig, engine=None):
        """engine: an already built Engine (tests, embedding); None = build from cfg in start()."""
        self.cfg = cfg
        self.engine = engine
        self.model_id = cfg.target
        self.default_method = cfg.method
        self.scheduler: Scheduler | None = None
        self._status, self._error = "loading", None
        self._loader: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Prompt encoding runs off the event loop, concurrently with the engine worker decoding on
        # the engine's tokenizer; HF fast tokenizers raise "Already borrowed" when one object is
        # used from two threads at once, so prompts get their own copy, guarded by its own lock.
        self._tok = None
        self._tok_lock = threading.Lock()
        self._engine_thread = EngineThread()  # loads the engine, then runs the scheduler (see EngineThread)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.engine is not None:
            self._ready()
        else:  # load in the background so the server binds at once and /health can say "loading"
            self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        from domino_backend.loader import build_engine

        c = self.cfg
        try:
            self.engine = await asyncio.wrap_future(self._engine_thread.submit(
                build_engine, c.target, c.draft, c.dtype, c.threads or engine_threads(), c.engine, c.quant))
        except Exception as e:
            log.exception("model load failed")
            self._status, self._error = "error", f"model load failed: {type(e).__name__}: {e}"
            return
        self._ready()

    def _ready(self) -> None:
        e = self.engine
        on_gpu = str(getattr(e.target, "device", "cpu")).startswith("cuda")
        self.default_method = methods.resolve(self.cfg.method, e.draft, not e.placeholder_draft, on_gpu,
                                              self.cfg.engine.adaptive_drafts)
        if self.default_method != self.cfg.method != "auto":
            log.warning("this engine cannot run %s: default method %s", self.cfg.method, self.default_method)
        self._tok = copy.deepcopy(e.target.tokenizer)
        # An explicit --threads is what every round gets; by default every core, one fewer while
        # ASR/TTS runs (scheduler.py). An engine handed in keeps its own.
        built = self._loader is not None
        self.scheduler = Scheduler(e, self.cfg.max_active, self.cfg.max_queue, self._engine_thread,
                                   self.cfg.max_tokens_in_flight,
                                   threads=self.cfg.threads or (engine_threads() if built else None),
                                   shared_threads=self.cfg.threads or (shared_threads() if built else None))
        self.scheduler.start()
        self._status = "ok"
        log.info("engine ready: target=%s method=%s max_context=%d", self.model_id, self.default_method,
                 e.target.max_context)

    async def close(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)

    def health(self) -> dict:
        h = {"status": self._status, "backend": self.name, "model": self.model_id}
        if self._error:
            h["error"] = self._error
        if self._status == "ok":
            h["default_method"] = self.default_method
            h["methods"] = methods.available(self.engine.draft)
            e = self.engine
            h["drafter"] = None if e.draft is None else "untrained placeholder" if e.placeholder_draft else "trained"
            h["weights"] = weight_format(e.target.model)
        return h

    def load(self) -> dict:
        return self.scheduler.load() if self.scheduler else {"active": 0, "queued": 0}

    def _encode(self, req: GenRequest, budget: int) -> list[int]:
        with self._tok_lock:
            ids = build_prompt(self._tok, req, budget)
            if log.isEnabledFor(logging.DEBUG):  # the exact prompt, for "why is my completion empty"; never at info
                log.debug("prompt for %s (%d tokens): %r", req.tag, len(ids), self._tok.decode(ids)[:4000])
            return ids

    async def submit(self, req: GenRequest) -> StreamJob:
        if self._status != "ok":
            msg = self._error or "the model is still loading; poll /health"
            raise RequestError("unavailable", msg, 503)
        cfg = self.cfg
        method = req.method or self.default_method
        try:
            methods.check(method, self.engine.draft)
        except ValueError as e:
            raise RequestError("invalid_request", str(e)) from None
        # max_tokens, stop strings and the prompt's size were checked at the edge (app/edge.check_request)
        post = for_request(req)
        limit = min(cfg.max_prompt_tokens, self.engine.target.max_context - 1)
        ids = await asyncio.to_thread(self._encode, req, limit)  # FIM prompts are trimmed to the limit
        if len(ids) > limit:
            raise RequestError("prompt_too_long", f"the prompt has {len(ids)} tokens; the limit is {limit}")
        greq = GenerationRequest(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                 top_k=req.top_k, stop=req.stop, seed=req.seed, method=method)
        holder: list[Task] = []
        job = StreamJob(self._loop, on_cancel=lambda: holder and self.scheduler.cancel(holder[0]))
        task = Task(job, ids, greq, req.received, req.deadline, post=post, tag=req.tag, priority=req.priority_class)
        holder.append(task)
        self.scheduler.submit(task)
        log.debug("queued %s: %d prompt tokens, method %s", req.tag, len(ids), method)
        return job
