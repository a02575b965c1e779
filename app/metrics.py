"""Prometheus metrics for `/metrics`. Names follow SGLang/vLLM where an equivalent exists
(accept length = tau, per-position acceptance as counters), prefixed `domino_`.

Each app gets its own registry, so several servers can live in one process (tests, embedding).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from .backend import Backend, Result

# Completion latencies that matter sit between ~50 ms and a few seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
TAU_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 17.0)
MAX_POSITIONS = 16
RECENT = 200  # finished requests kept for the UI's charts


class Finished(NamedTuple):
    """One finished request as the UI charts it: its Result without the text (no user data kept)."""

    at: float  # time.time() when it finished
    api: str
    kind: str
    result: Result

# `*_created` timestamp series double the output and no dashboard uses them.
disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("domino_requests", "Finished requests", ["api", "kind", "finish_reason"], registry=r)
        self.errors = Counter("domino_request_errors", "Requests or messages refused, by error code",
                              ["api", "code"], registry=r)
        self.prompt_tokens = Counter("domino_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("domino_generation_tokens", "Generated tokens", ["method"], registry=r)
        self.verify_rounds = Counter("domino_spec_verify_rounds", "Target verify rounds", ["method"], registry=r)
        self.drafted = Counter("domino_spec_draft_tokens", "Draft tokens proposed", ["method"], registry=r)
        self.accepted = Counter("domino_spec_accepted_tokens", "Draft tokens accepted", ["method"], registry=r)
        self.accepted_pos = Counter("domino_spec_accepted_tokens_per_pos",
                                    "Rounds whose draft at this position was accepted", ["method", "position"],
                                    registry=r)
        self.tau = Histogram("domino_spec_accept_length", "Per-request tau: tokens committed per verify round",
                             ["method"], buckets=TAU_BUCKETS, registry=r)
        self.queue = Histogram("domino_queue_seconds", "Arrival to start of prefill", buckets=LATENCY_BUCKETS,
                               registry=r)
        self.ttft = Histogram("domino_time_to_first_token_seconds", "Arrival to first streamed text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.total = Histogram("domino_e2e_request_latency_seconds", "Arrival to the end of the request",
                               ["api"], buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("domino_requests_running", "Requests being decoded", registry=r)
        self.queued = Gauge("domino_requests_queued", "Requests waiting for a slot", registry=r)
        self.engine_rounds = Gauge("domino_engine_rounds", "Batched engine rounds so far", registry=r)
        self.batched = Gauge("domino_engine_batched_requests", "Requests advanced by those rounds (sum of batch "
                             "sizes: the mean batch is this over domino_engine_rounds)", registry=r)
        self.max_batch = Gauge("domino_engine_max_batch", "Most requests advanced by one round", registry=r)
        self.ws_connections = Gauge("domino_ws_connections", "Open WebSocket connections", registry=r)
        self.voice_sessions = Gauge("domino_voice_sessions", "Open /v1/voice sessions", registry=r)
        self.voice_turns = Counter("domino_voice_turns", "Finished voice turns", ["outcome"], registry=r)
        self.voice_stage = Histogram("domino_voice_stage_seconds", "Voice turn latency by stage (voice_to_voice: "
                                     "end of the user's speech to the first reply audio byte)", ["stage"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.recent: deque[Finished] = deque(maxlen=RECENT)  # newest last

    def observe(self, r: Result, api: str, kind: str) -> None:
        self.recent.append(Finished(time.time(), api, kind, dataclasses.replace(r, text="")))
        self.requests.labels(api, kind, r.finish_reason).inc()
        self.prompt_tokens.inc(r.prompt_tokens)
        method = (r.spec or {}).get("method", "remote")
        self.generation_tokens.labels(method).inc(r.completion_tokens)
        self.queue.observe(r.queue_ms / 1000)
        if r.ttft_ms is not None:
            self.ttft.observe(r.ttft_ms / 1000)
        self.total.labels(api).observe(r.total_ms / 1000)
        s = r.spec
        if s and s.get("rounds"):
            self.verify_rounds.labels(method).inc(s["rounds"])
            self.drafted.labels(method).inc(s.get("drafted", 0))
            self.accepted.labels(method).inc(s.get("accepted", 0))
            self.tau.labels(method).observe(s["tau"])
            for j, n in enumerate((s.get("accepted_per_position") or [])[:MAX_POSITIONS]):
                if n:
                    self.accepted_pos.labels(method, str(j)).inc(n)

    def error(self, api: str, code: str) -> None:
        self.errors.labels(api, code).inc()

    def render(self, load: dict) -> bytes:
        self.running.set(load.get("active", 0))
        self.queued.set(load.get("queued", 0))
        self.engine_rounds.set(load.get("rounds", 0))
        self.batched.set(load.get("batched", 0))
        self.max_batch.set(load.get("max_batch", 0))
        return generate_latest(self.registry)


def attach(app, backend: Backend, cfg) -> None:
    """`/health` (open, 503 while the backend is not ready) and `/metrics` (Prometheus text)."""
    from starlette.responses import JSONResponse, Response

    metrics: Metrics = app.state.metrics

    @app.get("/health")
    async def health():
        h = backend.health()
        return JSONResponse(h, status_code=200 if h.get("status") == "ok" else 503)

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(backend.load()), media_type=CONTENT_TYPE_LATEST)
