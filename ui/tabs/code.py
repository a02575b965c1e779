"""Code: completion at the cursor in a code editor, single-line or multi-line, accept or reject.

Where the completion goes (Gradio's editor has no cursor API, so in this order):
1. the marker `<|cursor|>` if the text has one (type or paste it anywhere; it is removed on accept);
2. else the editor's caret, read in the browser from the CodeMirror view when Complete is pressed
   (or Alt+\\ inside the editor);
3. else the end of the text.
Other open files (uploaded) go to the model as repo context, in the model family's multi-file
format where it has one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from html import escape
from pathlib import Path

import gradio as gr

from agents.code import code_request, split_at_marker
from app.backend import ExtraFile, RequestError, Result

from ..jobs import Ctx, stream_text
from ..stats import decode_rate, method_of, tau

MARKER = "<|cursor|>"
MAX_CONTEXT_FILE_CHARS = 20_000  # per uploaded file: context is a hint, the prompt limit still applies
CONTEXT_LINES = (4, 3)  # lines of code shown before and after a suggestion
LANGUAGES = ["python", "javascript", "typescript", "c", "cpp", "shell", "sql", "json", "html", "css", "yaml",
             "markdown", "r", "dockerfile"]
EXAMPLE = '''import csv


def read_rows(path):
    """Return the rows of a CSV file as dicts."""
    with open(path, newline="") as f:
        <|cursor|>


def mean(values):
    return sum(values) / len(values)
'''

# Reads the caret from CodeMirror 6's view (its DOM node carries the view: `cmTile` in current
# versions, `cmView` in older ones) as a code-point offset, which is what Python string indices are.
# -1 when the view cannot be found: the handler then falls back to the marker or the end of the text.
CARET_JS = """
(code, caret, ...rest) => {
  const el = document.querySelector('#code-editor .cm-content');
  const view = el && ((el.cmTile && el.cmTile.root && el.cmTile.root.view) || (el.cmView && el.cmView.view));
  if (!view) return [code, -1, ...rest];
  const doc = view.state.doc.toString();
  return [doc, [...doc.slice(0, view.state.selection.main.head)].length, ...rest];
}
"""
# After Accept: put the caret right after the inserted text (a code-point offset).
PLACE_CARET_JS = """
(pos) => { setTimeout(() => {
  const el = document.querySelector('#code-editor .cm-content');
  const view = el && ((el.cmTile && el.cmTile.root && el.cmTile.root.view) || (el.cmView && el.cmView.view));
  if (!view || pos < 0) return;
  const at = [...view.state.doc.toString()].slice(0, pos).join('').length;
  view.dispatch({selection: {anchor: Math.min(at, view.state.doc.length)}}); view.focus();
}, 80); return []; }
"""
# Alt+\\ in the editor completes, Alt+Enter accepts (the buttons' own handlers run).
KEYS_JS = """
document.addEventListener('keydown', (e) => {
  if (!e.altKey || !e.target.closest || !e.target.closest('#code-editor')) return;
  const id = e.key === '\\\\' ? 'code-complete' : e.key === 'Enter' ? 'code-accept' : null;
  if (!id) return;
  e.preventDefault(); e.stopPropagation();
  document.getElementById(id)?.click();
}, true);
"""


@dataclass
class Split:
    prefix: str
    suffix: str
    where: str  # "marker" | "cursor" | "end"


def split_at_cursor(code: str, caret: int) -> Split:
    """Where to complete: the marker, else the caret (code points), else the end of the text.
    ValueError when the text has more than one marker."""
    if MARKER in code:
        return Split(*split_at_marker(code, MARKER), "marker")
    if 0 <= caret <= len(code):
        return Split(code[:caret], code[caret:], "cursor")
    return Split(code, "", "end")


def preview_html(s: Split, completion: str, status: str) -> str:
    before = s.prefix.split("\n")[-CONTEXT_LINES[0]:]
    after = s.suffix.split("\n")[:CONTEXT_LINES[1]]
    body = (f'<span class="dm-ctx">{escape(chr(10).join(before))}</span>'
            f'<span class="dm-sugg">{escape(completion) or "&#8203;"}</span>'
            f'<span class="dm-ctx">{escape(chr(10).join(after))}</span>')
    return f'<div class="dm-code-status">{escape(status)}</div><pre class="dm-preview">{body}</pre>'


def status_line(r: Result, where: str) -> str:
    parts = [f"at the {where}", f"{r.total_ms:.0f} ms", f"{r.completion_tokens} tokens"]
    if r.ttft_ms is not None:
        parts.append(f"first text {r.ttft_ms:.0f} ms")
    t, rate = tau(r), decode_rate(r)
    if t:
        parts.append(f"τ {t:.2f}")
    if rate:
        parts.append(f"{rate:.0f} tok/s")
    parts.append(method_of(r))
    if r.finish_reason == "error":
        parts.append(f"error: {r.error}")
    return " · ".join(parts)


def read_context(paths: list[str] | None) -> list[ExtraFile]:
    files = []
    for p in paths or []:
        text = Path(p).read_text(encoding="utf-8", errors="replace")[:MAX_CONTEXT_FILE_CHARS]
        files.append(ExtraFile(Path(p).name, text))
    return files


def build(ctx: Ctx) -> None:
    with gr.Tab("Code", id="code"):
        pending = gr.State(None)  # {"prefix", "suffix", "text"} of the suggestion on screen
        caret = gr.Number(-1, visible=False)
        with gr.Row():
            with gr.Column(scale=3):
                editor = gr.Code(EXAMPLE, language="python", lines=18, max_lines=30, interactive=True,
                                 label=f"Editor · completes at {MARKER}, else at the caret (Alt+\\), else at the end",
                                 elem_id="code-editor")
                with gr.Row():
                    complete = gr.Button("Complete (Alt+\\)", variant="primary", elem_id="code-complete")
                    accept = gr.Button("Accept (Alt+Enter)", elem_id="code-accept", interactive=False)
                    reject = gr.Button("Reject", elem_id="code-reject", interactive=False)
                suggestion = gr.HTML(preview_html(Split("", "", "end"), "", "No suggestion yet."),
                                     elem_id="code-suggestion", js_on_load=KEYS_JS)
            with gr.Column(scale=1, min_width=240):
                mode = gr.Radio(["Single line", "Multi-line"], value="Multi-line", label="Mode")
                language = gr.Dropdown(LANGUAGES, value="python", label="Language")
                filename = gr.Textbox("main.py", label="File name", info="sent with the repo context")
                max_tokens = gr.Slider(8, min(256, ctx.cfg.max_tokens_limit), value=min(96, ctx.cfg.max_tokens_limit),
                                       step=8, label="Max tokens (multi-line)")
                context = gr.File(file_count="multiple", type="filepath", label="Other open files (repo context)",
                                  elem_id="code-context")

        async def run(code: str, pos: float, mode: str, language: str, filename: str, max_tokens: int, files):
            off = gr.Button(interactive=False)
            try:
                s = split_at_cursor(code or "", int(pos if pos is not None else -1))
            except ValueError as e:
                yield preview_html(Split("", "", "end"), "", f"⚠️ {e}"), None, off, off
                return
            single = mode == "Single line"
            req = code_request(s.prefix, s.suffix, mode="line" if single else "block", files=read_context(files),
                               filename=filename or None, language=language,
                               max_tokens=None if single else int(max_tokens), tag="ui:code")
            t0 = time.perf_counter()
            try:
                async for text, r in stream_text(ctx, req):
                    if r is None:
                        ms = (time.perf_counter() - t0) * 1000
                        yield preview_html(s, text, f"completing at the {s.where}… {ms:.0f} ms"), None, off, off
            except RequestError as e:
                yield preview_html(s, "", f"⚠️ {e.message}"), None, off, off
                return
            ok = r.finish_reason != "error" and bool(r.text)
            status = status_line(r, s.where)  # where it completed, whatever came of it
            if not r.text and r.finish_reason != "error":
                status += " · the model suggested nothing here"
            pend = {"prefix": s.prefix, "suffix": s.suffix, "text": r.text} if ok else None
            yield preview_html(s, r.text, status), pend, gr.Button(interactive=ok), gr.Button(interactive=ok)

        def do_accept(code: str, pend):
            if not pend:
                return gr.skip(), None, -1, *_cleared("Nothing to accept.")
            s = split_at_cursor(code or "", len(pend["prefix"]))
            if (s.prefix, s.suffix) != (pend["prefix"], pend["suffix"]):
                return gr.skip(), None, -1, *_cleared("The code changed since this suggestion; press Complete again.")
            new = pend["prefix"] + pend["text"] + pend["suffix"]
            return new, None, len(pend["prefix"]) + len(pend["text"]), *_cleared("Accepted.")

        def _cleared(msg: str):
            return (preview_html(Split("", "", "end"), "", msg), gr.Button(interactive=False),
                    gr.Button(interactive=False))

        outs = [suggestion, pending, accept, reject]
        complete.click(run, [editor, caret, mode, language, filename, max_tokens, context], outs, js=CARET_JS,
                       show_progress="hidden", trigger_mode="always_last")
        accept.click(do_accept, [editor, pending], [editor, pending, caret, suggestion, accept, reject]).then(
            None, [caret], None, js=PLACE_CARET_JS)
        reject.click(lambda: (None, *_cleared("Rejected.")), None, [pending, suggestion, accept, reject])
        language.change(lambda lang: gr.Code(language=lang), language, editor)
