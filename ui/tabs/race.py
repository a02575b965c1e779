"""Race: one prompt decoded by `ar` and by a speculative method side by side, then the
losslessness check (greedy decoding: both must produce exactly the same text).

Each engine round's text is one coloured chunk, so you see how many tokens a verify round
commits (one for `ar`, τ on average for a speculative method). Side by side, both requests share
the engine, which alternates their rounds: the panes fill at their per-round rates, and each run's
decode speed is measured over shared time. "One after the other" gives each run the engine alone
(exact speeds, one pane at a time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from html import escape

import gradio as gr

from app.backend import GenRequest, RequestError, Result

from ..charts import bars
from ..jobs import RACE_SHARED, Ctx, stream_text
from ..stats import decode_rate, identical_verdict, tau

log = logging.getLogger("domino.ui")

RACE_METHODS = ["auto", "domino", "domino+ngram", "ngram", "dflash"]
EXAMPLES = [
    "Write a Python function that checks whether a string is a palindrome, with a docstring.",
    "Explain in three sentences why the sky is blue.",
    "List five prime numbers and say why each is prime.",
]
FRAME_S = 0.05  # at most ~20 UI updates per second, however fast the rounds come


@dataclass
class Lane:
    title: str
    chunks: list[str] = field(default_factory=list)
    started: float | None = None
    result: Result | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def lane_html(lane: Lane, now: float, shared: bool = False) -> str:
    """One pane: live text in per-round chunks, then decode speed, τ and acceptance per position."""
    chunks = "".join(f'<span class="dm-chunk c{i % 2}">{escape(c)}</span>' for i, c in enumerate(lane.chunks))
    if lane.error:
        stats = f'<div class="dm-lane-stats err">⚠️ {escape(lane.error)}</div>'
    elif lane.result is None:
        secs = now - lane.started if lane.started else 0.0
        state = f"{len(lane.chunks)} rounds · {secs:.1f} s" if lane.started else "waiting"
        stats = f'<div class="dm-lane-stats">{state}</div>'
    else:
        r = lane.result
        rate, t = decode_rate(r), tau(r)
        cells = [f"<b>{rate:.1f}</b> tok/s{' (shared engine)' if shared else ''}" if rate else "", f"τ <b>{t:.2f}</b>" if t else "",
                 f"{r.completion_tokens} tokens", f"{(r.spec or {}).get('rounds', len(lane.chunks))} rounds",
                 f"{r.total_ms / 1000:.2f} s"]
        per_pos = (r.spec or {}).get("per_position_acceptance") or []
        chart = bars(per_pos, label="acceptance per draft position") if per_pos else ""
        stats = (f'<div class="dm-lane-stats">{" · ".join(c for c in cells if c)}</div>'
                 + (f'<div class="dm-lane-chart"><div class="dm-chart-title">acceptance per draft position</div>{chart}</div>'
                    if chart else ""))
    return (f'<div class="dm-lane"><div class="dm-lane-title">{escape(lane.title)}</div>'
            f'<pre class="dm-lane-text">{chunks or "&nbsp;"}</pre>{stats}</div>')


def comparison(ar: Result, spec: Result, title: str, sequential: bool) -> str:
    """How much faster `spec` was: decode speeds when each run had the engine alone; verify rounds
    when they shared it (shared time says little about either's speed)."""
    if sequential:
        ra, rb = decode_rate(ar), decode_rate(spec)
        if not ra or not rb:
            return ""
        return f"{title} decoded {rb / ra:.2f}× as fast as ar" + ("" if rb >= ra else " (slower here)")
    na, nb = (ar.spec or {}).get("rounds"), (spec.spec or {}).get("rounds")
    if not na or not nb:
        return ""
    return (f"{title} needed {nb} verify rounds where ar needed {na} ({na / nb:.2f}× fewer); "
            "tick “one after the other” for wall-clock speeds")


def verdict_html(a: Lane, b: Lane, sequential: bool) -> str:
    if a.result is None or b.result is None:
        return '<div class="dm-verdict">…</div>' if (a.started or b.started) else ""
    same, sentence = identical_verdict(a.result, b.result)
    more = comparison(a.result, b.result, b.title, sequential) if same else ""
    return (f'<div class="dm-verdict {"yes" if same else "no"}" id="race-verdict">{escape(sentence)}'
            f'{"<div class=dm-verdict-more>" + escape(more) + "</div>" if more else ""}</div>')


async def _drive(ctx: Ctx, req: GenRequest, lane: Lane, changed: asyncio.Event, label: str) -> None:
    lane.started = req.received = time.perf_counter()  # one after the other: the second arrives now
    try:
        async for text, r in stream_text(ctx, req, label):
            if r is None:
                lane.chunks.append(text[len(lane.text):])  # one delta = one engine round
            else:
                lane.result, lane.error = r, r.error if r.finish_reason == "error" else None
            changed.set()
    except RequestError as e:
        lane.error = e.message
    except Exception as e:  # a bug must end this lane with a message, not leave the race waiting
        log.exception("race lane %s failed", lane.title)
        lane.error = f"internal error: {type(e).__name__}"
    finally:
        changed.set()


def build(ctx: Ctx) -> None:
    with gr.Tab("Race", id="race"):
        gr.Markdown("One prompt, decoded by plain autoregressive decoding (`ar`) and by a speculative method. "
                    "Greedy decoding, so a lossless method must write **exactly** the same text — faster. "
                    "Each coloured chunk is one verify round.")
        with gr.Row():
            prompt = gr.Textbox(EXAMPLES[0], label="Prompt", lines=2, scale=5, elem_id="race-prompt")
            with gr.Column(scale=2, min_width=240):
                method = gr.Dropdown(RACE_METHODS, value="auto", label="Against ar")
                max_tokens = gr.Slider(16, min(512, ctx.cfg.max_tokens_limit), value=min(96, ctx.cfg.max_tokens_limit),
                                       step=16, label="Max tokens", elem_id="race-max-tokens")
                sequential = gr.Checkbox(False, label="One after the other (exact speeds)")
        gr.Examples([[e] for e in EXAMPLES], [prompt])
        go = gr.Button("Race", variant="primary", elem_id="race-go")
        verdict = gr.HTML("", elem_id="race-verdict-box")
        with gr.Row(equal_height=True):
            left = gr.HTML(lane_html(Lane("ar"), 0), elem_id="race-ar")
            right = gr.HTML(lane_html(Lane("auto"), 0), elem_id="race-spec")

        async def race(prompt: str, method: str, max_tokens: int, sequential: bool):
            messages = [{"role": "user", "content": prompt or EXAMPLES[0]}]
            spec = None if method == "auto" else method
            default = getattr(ctx.backend, "default_method", None) or "default"
            lanes = [Lane("ar"), Lane(spec or f"auto ({default})")]
            reqs = [GenRequest(kind="chat", messages=messages, max_tokens=int(max_tokens), method=m, tag="ui:race")
                    for m in ("ar", spec)]
            changed, shared = asyncio.Event(), not sequential
            if sequential:
                async def both():
                    for req, lane in zip(reqs, lanes):
                        await _drive(ctx, req, lane, changed, "race")
                tasks = [asyncio.create_task(both())]
            else:
                tasks = [asyncio.create_task(_drive(ctx, req, lane, changed, RACE_SHARED))
                         for req, lane in zip(reqs, lanes)]
            try:
                while True:
                    await changed.wait()
                    changed.clear()
                    finished = all(t.done() for t in tasks)  # before rendering: the last frame shows the end
                    now = time.perf_counter()
                    yield verdict_html(*lanes, sequential), lane_html(lanes[0], now, shared), lane_html(lanes[1], now, shared)
                    if finished:
                        return
                    await asyncio.sleep(FRAME_S)
            finally:
                for t in tasks:  # a cancelled race (tab closed) cancels both backend jobs
                    t.cancel()

        go.click(race, [prompt, method, max_tokens, sequential], [verdict, left, right], show_progress="hidden",
                 concurrency_limit=1, concurrency_id="race")
