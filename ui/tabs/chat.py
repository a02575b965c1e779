"""Chat: streaming replies from the engine, with each reply's τ, decode speed and speedup under it.

The conversation sent to the model (`conv`) is kept apart from what the chat shows (`shown`, which
adds the stats line under each reply), so the stats never leak into the next prompt.
"""

from __future__ import annotations

import gradio as gr

from app.backend import GenRequest, RequestError

from ..jobs import Ctx, stream_text
from ..stats import ar_baseline, reply_footer

METHOD_CHOICES = ["auto", "domino", "domino+ngram", "ngram", "ar"]
STOPPED = "_(stopped)_"


def text_of(content) -> str:
    """A chat message's text: Gradio hands messages back with content as a list of parts."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content or [] if isinstance(p, dict))


def footer(text: str) -> str:
    return f'\n\n<span class="dm-footer">{text}</span>'


def build(ctx: Ctx) -> None:
    with gr.Tab("Chat", id="chat"):
        conv = gr.State([])  # [{"role", "content"}] as the model sees it
        with gr.Row():
            with gr.Column(scale=4):
                shown = gr.Chatbot(height=460, label="Chat", elem_id="chat-log", buttons=["copy"],
                                   placeholder="Ask anything. Each reply shows its τ (tokens per verify round), "
                                               "decode speed and speedup over plain decoding.")
                with gr.Row():
                    box = gr.Textbox(placeholder="Message (Enter to send)", show_label=False, scale=6,
                                     elem_id="chat-input", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
                clear = gr.Button("New chat", size="sm")
            with gr.Column(scale=1, min_width=220):
                method = gr.Dropdown(METHOD_CHOICES, value="auto", label="Method",
                                     info="auto = the server's default; all are lossless")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature", info="0 = greedy")
                max_tokens = gr.Slider(16, ctx.cfg.max_tokens_limit, step=16,
                                       value=min(256, ctx.cfg.max_tokens_limit), label="Max tokens",
                                       elem_id="chat-max-tokens")

        async def respond(message: str, conv: list, shown: list, method: str, temperature: float, max_tokens: int):
            message = (message or "").strip()
            if not message:
                return
            conv = conv + [{"role": "user", "content": message}]
            shown = shown + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            yield "", conv, shown
            req = GenRequest(kind="chat", messages=conv, max_tokens=int(max_tokens), temperature=float(temperature),
                             method=None if method == "auto" else method)
            try:
                async for text, result in stream_text(ctx, req):
                    if result is None:
                        shown[-1] = {"role": "assistant", "content": text}
                        yield gr.skip(), gr.skip(), shown
            except RequestError as e:
                shown[-1] = {"role": "assistant", "content": f"⚠️ {e.message}"}
                yield gr.skip(), conv[:-1], shown
                return
            if result.finish_reason == "error":
                shown[-1] = {"role": "assistant", "content": f"{text}\n\n⚠️ {result.error}"}
                yield gr.skip(), conv[:-1], shown
                return
            conv = conv + [{"role": "assistant", "content": result.text}]
            shown[-1] = {"role": "assistant", "content": result.text + footer(reply_footer(result, ar_baseline(ctx.metrics.recent)))}
            yield gr.skip(), conv, shown

        def after_stop(conv: list, shown: list):
            """The reply so far stays in the conversation; Gradio has cancelled the handler, which
            cancelled the backend job (ui.jobs.running)."""
            if shown and shown[-1]["role"] == "assistant" and conv and conv[-1]["role"] == "user":
                partial = text_of(shown[-1]["content"])
                conv = conv + [{"role": "assistant", "content": partial}]
                shown = shown[:-1] + [{"role": "assistant", "content": partial + "\n\n" + STOPPED}]
            return conv, shown

        inputs = [box, conv, shown, method, temperature, max_tokens]
        ev1 = box.submit(respond, inputs, [box, conv, shown], show_progress="hidden")
        ev2 = send.click(respond, inputs, [box, conv, shown], show_progress="hidden")
        # Cancel first, then mark the reply stopped: an update the cancelled stream had already
        # sent cannot land after the mark and erase it.
        stop.click(None, None, None, cancels=[ev1, ev2], queue=False).then(
            after_stop, [conv, shown], [conv, shown], queue=False)
        clear.click(lambda: ([], []), None, [conv, shown], cancels=[ev1, ev2], queue=False)
