"""What every tab's handlers share: the server's backend, config and metrics, and one way to run a job.

Handlers never talk to the engine: they submit a `GenRequest` to the same `Backend` the APIs use,
so the UI works with the in-process engine and with `--backend-url` alike, and its requests show up
in `/metrics` under api="ui".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from app.backend import Backend, GenRequest, Job, RequestError, Result
from app.config import ServerConfig
from app.edge import check_request
from app.metrics import Metrics

API = "ui"  # the `api` label of the UI's requests in /metrics
# The `kind` of Race requests that shared the engine with each other: their decode speed is over
# shared time, so they do not count as an `ar` baseline (ui.stats.ar_baseline).
RACE_SHARED = "race_shared"


@dataclass
class Ctx:
    backend: Backend
    cfg: ServerConfig
    metrics: Metrics


async def _events(ctx: Ctx, job: Job, kind: str, seen: list[Result]) -> AsyncIterator[str | Result]:
    async for ev in job:
        if isinstance(ev, Result):
            seen.append(ev)
            ctx.metrics.observe(ev, API, kind)
        yield ev


async def _record_when_done(ctx: Ctx, job: Job, kind: str) -> None:
    async for ev in job:  # the rest of a cancelled job: its Result says "cancelled"
        if isinstance(ev, Result):
            ctx.metrics.observe(ev, API, kind)


@asynccontextmanager
async def running(ctx: Ctx, req: GenRequest, label: str | None = None):
    """`async with running(ctx, req) as events: async for ev in events: ...` (str deltas, then a Result).

    `label`: the request's `kind` in /metrics when not `req.kind` (e.g. RACE_SHARED).

    Raises RequestError for a request that the server's limits (app.edge.check_request) or the
    backend refuse. However the block is left (the end, an exception, the Stop button cancelling the
    handler's task), an unfinished backend job is cancelled at once, so the engine slot is freed;
    its final Result is still recorded in /metrics.
    """
    req.tag = req.tag or f"{API}:{req.kind}"
    kind = label or req.kind
    try:
        job = await ctx.backend.submit(check_request(req, ctx.cfg))
    except RequestError as e:
        ctx.metrics.error(API, e.code)
        raise
    seen: list[Result] = []
    try:
        yield _events(ctx, job, kind, seen)
    finally:
        if not seen:
            job.cancel()
            asyncio.get_running_loop().create_task(_record_when_done(ctx, job, kind))


async def stream_text(ctx: Ctx, req: GenRequest, label: str | None = None) -> AsyncIterator[tuple[str, Result | None]]:
    """Run `req` (see `running`): (text so far, None) after each delta, then (text, Result) once."""
    text = ""
    async with running(ctx, req, label) as events:
        async for ev in events:
            if isinstance(ev, Result):
                yield text, ev
            else:
                text += ev
                yield text, None
