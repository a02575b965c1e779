"""Engine: what runs (model, drafter, default method, hardware) and live charts of recent requests
(decode speed, τ, acceptance per draft position, queue depth), refreshed while the tab is open.

The charts read the server's own record of finished requests (`Metrics.recent`: every API's
requests, the UI's included), so they show what `/metrics` counts, request by request.
"""

from __future__ import annotations

import os
import time
from collections import deque
from html import escape

import gradio as gr

from ..charts import bars, dots, legend
from ..jobs import Ctx
from ..stats import decode_rate, method_of, tau

REFRESH_S = 2.0
SHOWN = 60  # most recent requests in the per-request charts
LOAD_SAMPLES = 60  # queue-depth samples kept (one per refresh)


def hardware() -> dict:
    """The machine this server runs on (decoding runs here unless --backend-url points elsewhere)."""
    import torch

    from domino_backend.cpu import cpu_name

    hw = {"CPU": f"{cpu_name()} · {os.cpu_count()} cores", "torch": torch.__version__, "threads": str(torch.get_num_threads())}
    try:
        hw["memory"] = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        hw["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return hw


def drafter_text(kind: str | None, path: str | None) -> str:
    """health()["drafter"] ("trained", "untrained placeholder" or None) in words."""
    if kind is None:
        return "none (ar and ngram only)"
    where = path or "the profile's shipped drafter"
    if kind == "trained":
        return f"trained · {where}"
    return "untrained placeholder (random weights: domino and dflash accept almost nothing; output still exact)"


def info_html(ctx: Ctx, health: dict, hw: dict) -> str:
    cfg = ctx.cfg
    rows = {"status": health.get("status", "?"), "model": health.get("model", cfg.target),
            "backend": f"remote {cfg.backend_url}" if cfg.backend_url else "in-process engine"}
    if not cfg.backend_url:
        if "drafter" in health:
            rows["drafter"] = drafter_text(health["drafter"], cfg.draft)
        rows["dtype"] = cfg.dtype
        rows["draft length"] = "adaptive (measured per round)" if cfg.engine.adaptive_drafts else "fixed (full block)"
    if health.get("default_method"):
        rows["default method"] = health["default_method"]
    if health.get("methods"):
        rows["methods"] = ", ".join(health["methods"])
    if health.get("error"):
        rows["error"] = health["error"]
    rows["limits"] = f"{cfg.max_active} running, {cfg.max_queue} queued, {cfg.max_tokens_limit} max tokens"
    rows.update(hw)
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows.items())
    return f'<table class="dm-info">{cells}</table>'


def acceptance_by_method(recent) -> dict[str, list[float]]:
    """Per method: the share of verify rounds that accepted the draft at position 1, 2, ... over the
    recent requests (accepted counts summed, divided by rounds summed)."""
    acc: dict[str, list[int]] = {}
    rounds: dict[str, int] = {}
    for f in recent:
        s = f.result.spec or {}
        if not s.get("rounds") or not s.get("accepted_per_position"):
            continue
        m = s["method"]
        a = acc.setdefault(m, [])
        for j, n in enumerate(s["accepted_per_position"]):
            if j == len(a):
                a.append(0)
            a[j] += n
        rounds[m] = rounds.get(m, 0) + s["rounds"]
    return {m: [x / rounds[m] for x in a] for m, a in acc.items()}


def charts_html(recent: list, load: deque) -> str:
    shown = recent[-SHOWN:]
    speed = [(decode_rate(f.result) or 0.0, method_of(f.result),
              f"{method_of(f.result)} · {f.api}/{f.kind} · {decode_rate(f.result) or 0:.1f} tok/s") for f in shown]
    taus = [(tau(f.result) or 1.0, method_of(f.result), f"{method_of(f.result)} · τ {tau(f.result) or 0:.2f}")
            for f in shown if f.result.spec]
    methods = sorted({m for _, m, _ in speed})
    per_method = acceptance_by_method(shown)
    acc = "".join(f'<div class="dm-chart-title">{escape(m)}</div>{bars(v, label=f"acceptance per position, {m}")}'
                  for m, v in sorted(per_method.items()) if any(v)) or bars([], label="acceptance per position")
    depth = [a + q for _, a, q in load]
    now = load[-1] if load else (0, 0, 0)
    panels = [
        ("Decode speed per request (tok/s)", dots(speed, label="tokens per second per request")),
        ("τ per request (tokens per verify round)", dots(taus, label="tau per request", y_fmt=".2f")),
        ("Acceptance per draft position (recent requests)", acc),
        (f"Requests in the engine: {now[1]} running, {now[2]} queued",
         bars(depth, label="requests running or queued", y_max=1, y_fmt=".0f", names=["" for _ in depth],
              css="dm-bar dm-load")),
    ]
    body = "".join(f'<div class="dm-panel"><div class="dm-chart-title">{escape(t)}</div>{c}</div>' for t, c in panels)
    return (f'<div class="dm-legend-row">{legend(methods)} <span class="dm-muted">{len(recent)} recent requests'
            f'</span></div><div class="dm-grid">{body}</div>')


def build(ctx: Ctx) -> gr.Timer:
    """Returns the refresh timer; the app turns it on only while this tab is selected."""
    hw = hardware()
    load: deque = deque(maxlen=LOAD_SAMPLES)

    def refresh():
        ld = ctx.backend.load()
        load.append((time.time(), ld.get("active", 0), ld.get("queued", 0)))
        return info_html(ctx, ctx.backend.health(), hw), charts_html(list(ctx.metrics.recent), load)

    with gr.Tab("Engine", id="engine") as tab:
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                info = gr.HTML(info_html(ctx, ctx.backend.health(), hw), elem_id="engine-info")
                gr.Markdown("Prometheus metrics: [`/metrics`](/metrics) · health: [`/health`](/health)")
            with gr.Column(scale=3):
                charts = gr.HTML(charts_html([], load), elem_id="engine-charts")
        timer = gr.Timer(REFRESH_S, active=False)
        timer.tick(refresh, outputs=[info, charts], show_progress="hidden", queue=False)
        tab.select(refresh, outputs=[info, charts], show_progress="hidden", queue=False)
    return timer
