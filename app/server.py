"""The ASGI app: `create_app(cfg, backend)` builds the backend's app and lets each surface attach itself.

A surface is a module with `attach(app, backend, cfg)` that adds its routes (and may read
`app.state.metrics`). `SURFACES` lists them in mount order; the browser UI mounts last because it
takes `/`. A new surface is a module plus one line here.
"""

from __future__ import annotations

import logging
import re
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from .backend import Backend
from .config import ServerConfig
from .metrics import Metrics
from .edge import error_response
from .security import PUBLIC_PATHS, BodyLimit, host_ok, install_log_redaction, key_ok, origin_ok

log = logging.getLogger("domino.server")


# module paths, imported when the app is built; `ui` only when cfg.ui (Gradio is a heavy import)
SURFACES = ("app.metrics", "app.openai_api", "app.ws", "app.voice")
UI_SURFACE = "ui.app"


def attach_surfaces(app: FastAPI, backend: Backend, cfg: ServerConfig) -> None:
    import importlib

    for name in SURFACES + ((UI_SURFACE,) if cfg.ui else ()):
        importlib.import_module(name).attach(app, backend, cfg)


def make_backend(cfg: ServerConfig) -> Backend:
    if cfg.backend_url:
        from .remote import RemoteBackend

        return RemoteBackend(cfg)
    from .engine_backend import EngineBackend

    return EngineBackend(cfg)


def origin_regex(origins: list[str]) -> str:
    """The allow-list as one regex for the CORS middleware (same rules as security.origin_ok)."""
    parts = []
    for o in origins:
        if o == "*":
            return ".*"
        scheme, _, host = o.partition("://")
        if host == "*":
            parts.append(re.escape(scheme) + r"://.+")
        elif re.search(r":\d+$", host):
            parts.append(re.escape(o))
        else:
            parts.append(re.escape(o) + r"(:\d+)?")
    return "|".join(parts) or "(?!)"


class Guard:
    """ASGI middleware for HTTP: Host and Origin allow-lists, then the API key (everything but /health)."""

    def __init__(self, app, cfg: ServerConfig, metrics: Metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") != "OPTIONS":  # CORS preflights carry no key
            req = Request(scope)
            if not host_ok(self.cfg, req.headers.get("host")):  # DNS rebinding (ServerConfig.allowed_hosts)
                self.metrics.error("http", "host_not_allowed")
                return await error_response("host_not_allowed", "this Host name is not served here (--allow-host)")(
                    scope, receive, send)
            if not origin_ok(self.cfg, req.headers.get("origin")):
                self.metrics.error("http", "origin_not_allowed")
                return await error_response("origin_not_allowed", "this Origin is not on the allow-list")(
                    scope, receive, send)
            if scope["path"] not in PUBLIC_PATHS and not key_ok(self.cfg, req.headers, req.query_params):
                self.metrics.error("http", "unauthorized")
                resp = error_response("unauthorized", "missing or wrong API key (Authorization: Bearer KEY)")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(cfg: ServerConfig, backend: Backend | None = None) -> FastAPI:
    backend = backend or make_backend(cfg)
    metrics = Metrics()
    install_log_redaction()  # before the first access log line, whoever runs the app

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        log.info("serving on http://%s:%s (backend %s, key %s)", cfg.host, cfg.port, backend.name,
                 "required" if cfg.api_key else "off")
        yield
        await backend.close()

    app = FastAPI(title="Domino", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.cfg, app.state.backend, app.state.metrics = cfg, backend, metrics

    attach_surfaces(app, backend, cfg)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        msg = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errs[:5])
        metrics.error("openai", "invalid_request")
        return error_response("invalid_request", msg or "invalid request body")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return error_response(code, str(exc.detail), exc.status_code)

    # Outermost last: BodyLimit -> CORS (answers preflights) -> Guard -> routes.
    app.add_middleware(Guard, cfg=cfg, metrics=metrics)
    app.add_middleware(CORSMiddleware, allow_origin_regex=origin_regex(cfg.allowed_origins), allow_methods=["*"],
                       allow_headers=["*"])
    app.add_middleware(BodyLimit, limit=cfg.max_message_bytes)
    return app


def uvicorn_config(app, cfg: ServerConfig):
    import uvicorn

    from .transport import tolerant_ws_protocol

    return uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, ws=tolerant_ws_protocol(),
        ws_max_size=max(cfg.transport_max_bytes, cfg.max_message_bytes + 1024),
        ws_per_message_deflate=False,  # messages are small and mostly on loopback: not worth the CPU
        timeout_graceful_shutdown=5,
    )


def run(cfg: ServerConfig, backend: Backend | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.Server(uvicorn_config(create_app(cfg, backend), cfg)).run()
