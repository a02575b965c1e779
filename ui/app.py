"""The browser UI at `/`: one Gradio app on the same server (and port) as the APIs.

`attach(app, backend, cfg)` builds the `gr.Blocks` and mounts it at `/` (app/server.py calls it last,
after the API routes, which therefore keep precedence). Tabs live in `ui/tabs/`, one module each;
their handlers call the same `Backend` as the APIs (ui/jobs.py).

Offline by construction: analytics off before gradio is imported, system font stacks (no web fonts),
every script and style served by this server. Security is the server's: the Guard middleware checks
Origin and the API key for the UI's routes like for any other. With a key set, open
`/?token=KEY` once: the key is kept in an HttpOnly, SameSite=Strict cookie that the server accepts
like the Authorization header (app/security.py), and the address bar drops the token.
"""

from __future__ import annotations

import os

# Must be set before gradio is imported: it reads the variable at import time.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import time  # noqa: E402
from html import escape  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
from starlette.responses import RedirectResponse  # noqa: E402

from app.backend import Backend  # noqa: E402
from app.config import ServerConfig  # noqa: E402
from app.security import KEY_COOKIE  # noqa: E402

from .jobs import Ctx  # noqa: E402
from .tabs import chat, code, engine, race, voice  # noqa: E402

STATIC = Path(__file__).with_name("static")

THEME = gr.themes.Soft(
    primary_hue="indigo", secondary_hue="sky", neutral_hue="slate",
    font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)


def status_html(health: dict, started: float) -> str:
    """The header line: model and method when ready; a progress bar while the model loads."""
    s = health.get("status")
    model = escape(str(health.get("model", "?")))
    if s == "ok":
        method = escape(str(health.get("default_method") or "the remote's"))
        return (f'<div class="dm-status ok"><b>{model}</b> · default method <b>{method}</b> · '
                f'backend {escape(str(health.get("backend", "")))}</div>')
    if s == "error":
        return f'<div class="dm-status err">Model <b>{model}</b> failed to load: {escape(str(health.get("error", "")))}</div>'
    waited = int(time.monotonic() - started)
    detail = escape(str(health.get("error") or "on the first run this joins and converts the model files: a few minutes"))
    return (f'<div class="dm-status loading">Loading <b>{model}</b>… {waited // 60}:{waited % 60:02d} · {detail}'
            f'<div class="dm-progress"><div></div></div></div>')


def build(ctx: Ctx, voice_available: bool = False) -> gr.Blocks:
    started = time.monotonic()
    with gr.Blocks(title="Domino") as blocks:
        with gr.Row(elem_classes="dm-header"):
            gr.HTML('<div class="dm-title">Domino <span>lossless speculative decoding</span></div>')
            status = gr.HTML(status_html(ctx.backend.health(), started))
        poll = gr.Timer(1.0)

        def refresh():
            h = ctx.backend.health()
            return status_html(h, started), gr.Timer(active=h.get("status") == "loading")

        poll.tick(refresh, outputs=[status, poll], show_progress="hidden", queue=False)
        blocks.load(refresh, outputs=[status, poll], show_progress="hidden", queue=False)
        with gr.Tabs() as tabs:
            voice.build(ctx, voice_available)
            chat.build(ctx)
            code.build(ctx)
            race.build(ctx)
            engine_timer = engine.build(ctx)

        def on_tab(evt: gr.SelectData):  # the Engine tab's charts refresh only while it is on screen
            return gr.Timer(active=evt.value == "Engine")

        tabs.select(on_tab, None, engine_timer, queue=False)
    return blocks


class KeyCookie:
    """With an API key set: `GET /?token=KEY` (already checked by the Guard, which runs first) stores
    the key in a cookie and redirects to `/`, so the page's own requests carry it from then on."""

    def __init__(self, app, cfg: ServerConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if (self.cfg.api_key and scope["type"] == "http" and scope["path"] == "/" and scope.get("method") == "GET"
                and b"token=" in scope.get("query_string", b"")):
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(KEY_COOKIE, self.cfg.api_key, httponly=True, samesite="strict", path="/")
            return await resp(scope, receive, send)
        await self.app(scope, receive, send)


def attach(app, backend: Backend, cfg: ServerConfig) -> None:
    ctx = Ctx(backend, cfg, app.state.metrics)
    blocks = build(ctx, voice_available=any(getattr(r, "path", None) == voice.VOICE_PATH for r in app.routes))
    # Handlers that wait on the backend run concurrently: the backend has its own bounded queue and
    # answers `overloaded` itself, so Gradio's default of one run at a time per event would only add a wait.
    blocks.queue(default_concurrency_limit=None)
    app.add_middleware(KeyCookie, cfg=cfg)
    gr.mount_gradio_app(app, blocks, path="/", theme=THEME, css=(STATIC / "ui.css").read_text(),
                        footer_links=["gradio", "settings"], ssr_mode=False, show_error=True)
