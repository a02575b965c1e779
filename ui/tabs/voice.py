"""Voice: talk to the voice agent from the browser (ui/static/voice.js does the audio).

The browser connects to the server's `/v1/voice` WebSocket itself: microphone audio goes straight
to the voice agent and reply audio straight back, with no Python hop in the UI (lowest latency,
and the browser's echo cancellation applies to the microphone). This module only places the
component and says why it cannot work when the server has no voice endpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from ..jobs import Ctx

VOICE_PATH = "/v1/voice"
CLIENT_JS = Path(__file__).parent.parent / "static" / "voice.js"
MISSING = ("The voice agent is not available on this server: it has no <code>/v1/voice</code> endpoint. "
           "Install the voice parts with <code>bash setup.sh</code> (or <code>pip install 'domino[voice]'</code>) "
           "and restart <code>python -m app</code>. Chat, Code, Race and Engine work without it.")


def client_options(available: bool) -> dict:
    return {"path": VOICE_PATH, "available": available, "reason": "" if available else MISSING}


def build(ctx: Ctx, available: bool) -> None:
    """available: whether the server mounted the voice endpoint (the UI is attached after it)."""
    opts = json.dumps(client_options(available))
    with gr.Tab("Voice", id="voice"):
        gr.Markdown("Talk with the assistant: your words are transcribed, answered by the engine and spoken back, "
                    "starting with the first sentence. Speak over a reply to interrupt it. The browser's echo "
                    "cancellation is on; with speakers and no headset, push-to-talk avoids the assistant hearing itself.")
        gr.HTML("", elem_id="voice-client", js_on_load=f"{CLIENT_JS.read_text()}\ndominoVoice(element, {opts});")
