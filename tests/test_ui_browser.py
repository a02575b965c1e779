"""The browser UI in real Chromium (Playwright, Debian's chromium) against a real server on loopback
with the embedded `tiny` model. Each test saves a screenshot of its tab: to docs/img/ui-<tab>.png
(the README's pictures) with DOMINO_SCREENSHOTS=1, else to a temporary folder.

The browser's fake microphone plays a WAV made with espeak-ng, so the Voice test speaks for real.
Every test also checks that no request left 127.0.0.1 (the UI must work offline).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.config import ServerConfig
from server_fakes import ServerThread

pytestmark = pytest.mark.slow

IMG = (Path(__file__).resolve().parent.parent / "docs" / "img" if os.environ.get("DOMINO_SCREENSHOTS")
       else Path(tempfile.gettempdir()) / "domino-ui-screenshots")
VIEWPORT = {"width": 1280, "height": 860}
CHROMIUM = os.environ.get("DOMINO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
UTTERANCE = "What is the capital of France?"
LEAD_S = 6  # silence before it


def _needs_browser():
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (bash setup.sh dev)"
    if not CHROMIUM:
        return "no chromium on PATH (bash setup.sh dev installs Debian's)"
    return None


missing = _needs_browser()
if missing and os.environ.get("CI"):
    raise RuntimeError(f"browser tests cannot run in CI: {missing}")
if missing:
    pytest.skip(missing, allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402


def speech_wav(path: Path) -> Path:
    """LEAD_S of silence, UTTERANCE spoken by espeak-ng, then 30 s of silence (Chromium loops the file: the silence
    keeps it to one turn during a test), 16-bit mono."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), UTTERANCE], check=True)
    with wave.open(str(raw)) as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")
    # the lead covers loading the speech models: the client sends audio once the server is ready
    lead, tail = np.zeros(rate * LEAD_S, "<i2"), np.zeros(rate * 30, "<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.concatenate([lead, pcm, tail]).tobytes())
    return path


@pytest.fixture(scope="module")
def server():
    cfg = ServerConfig(port=0, target="tiny", ui=True, log_level="warning")
    srv = ServerThread(cfg).start()
    t0 = time.monotonic()
    while httpx.get(srv.url + "/health").json().get("status") != "ok":
        assert time.monotonic() - t0 < 600, "the tiny model did not load"
        time.sleep(0.5)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    args = ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            "--autoplay-policy=no-user-gesture-required"]
    if shutil.which("espeak-ng"):
        args.append(f"--use-file-for-fake-audio-capture={speech_wav(tmp_path_factory.mktemp('mic') / 'speech.wav')}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


class Page:
    """A page on the UI that records every host it talks to."""

    def __init__(self, browser, server, scheme: str = "light"):
        self.server = server
        self.ctx = browser.new_context(viewport=VIEWPORT, color_scheme=scheme)
        self.page = self.ctx.new_page()
        self.urls: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("websocket", lambda ws: self.urls.append(ws.url))
        self.page.goto(server.url + "/")
        self.page.wait_for_selector(".dm-status.ok", timeout=60_000)

    def tab(self, name: str):
        self.page.get_by_role("tab", name=name).click()
        return self.page

    def shot(self, name: str) -> None:
        IMG.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(IMG / f"ui-{name}.png"), full_page=True)

    def foreign_hosts(self) -> set[str]:
        local = f"127.0.0.1:{self.server.port}"
        return {u.split("/")[2] for u in self.urls if "://" in u and u.split(":", 1)[0] in ("http", "https", "ws", "wss")
                and u.split("/")[2] != local}

    def close(self) -> None:
        assert self.foreign_hosts() == set()
        self.ctx.close()


def set_number(page, slider: str, value: int) -> None:
    box = page.locator(f"{slider} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


@pytest.fixture
def ui(browser, server):
    page = Page(browser, server)
    yield page
    page.close()


def test_page_loads_offline_with_every_tab(ui):
    for name in ("Voice", "Chat", "Code", "Race", "Engine"):
        assert ui.page.get_by_role("tab", name=name).is_visible()
    assert "tiny" in ui.page.inner_text(".dm-status")
    assert len(ui.urls) > 10 and ui.foreign_hosts() == set()  # scripts, styles, fonts: all from this server


def test_race_shows_identical_output(ui):
    page = ui.tab("Race")
    set_number(page, "#race-max-tokens", 48)
    page.get_by_label("One after the other").check()  # each run alone: the banner compares speeds
    page.click("#race-go")
    page.wait_for_selector("#race-verdict", timeout=240_000)
    verdict = page.inner_text("#race-verdict")
    assert verdict.startswith("identical output: yes") and "as fast as ar" in verdict, verdict
    for lane in ("#race-ar", "#race-spec"):
        assert "tok/s" in page.inner_text(f"{lane} .dm-lane-stats")
    assert page.locator("#race-spec .dm-chunk").count() >= 2
    ui.shot("race")


def test_chat_streams_a_reply_with_its_stats(ui, server):
    api_request(server, "ar")  # an ar run to measure the speedup against
    page = ui.tab("Chat")
    page.fill("#chat-input textarea", "Name three colours.")
    page.click("#chat-send")
    bot = page.locator('#chat-log [data-testid="bot"]').last
    lengths = set()
    t0 = time.monotonic()
    while not page.locator("#chat-log .dm-footer").count():
        assert time.monotonic() - t0 < 120, "no reply"
        if bot.count():
            lengths.add(len(bot.inner_text()))
        time.sleep(0.05)
    assert len(lengths - {0}) >= 2, "the reply did not arrive in pieces"
    footer = page.inner_text("#chat-log .dm-footer")
    assert "tok/s" in footer and "tokens in" in footer and "× vs ar" in footer
    ui.shot("chat")


def test_chat_stop_cancels_the_backend_job(ui, server):
    page = ui.tab("Chat")
    set_number(page, "#chat-max-tokens", 1024)
    page.fill("#chat-input textarea", "Write a very long story about a dragon who learns to cook.")
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-log [data-testid=\"bot\"]')?.innerText.length > 20",
                           timeout=120_000)
    page.click("#chat-stop")
    page.wait_for_selector("#chat-log em:text('stopped')", timeout=10_000)
    assert server.wait_idle(5.0)["active"] == 0  # the engine stopped decoding it
    t0 = time.monotonic()
    while True:
        last = [f for f in server.app.state.metrics.recent if f.api == "ui" and f.kind == "chat"][-1]
        if last.result.finish_reason == "cancelled" or time.monotonic() - t0 > 5:
            break
        time.sleep(0.1)
    assert last.result.finish_reason == "cancelled" and last.result.completion_tokens < 1024


def test_code_completes_at_the_marker_and_at_the_caret(ui):
    page = ui.tab("Code")
    page.click("#code-complete")
    page.wait_for_selector("#code-accept:not([disabled])", timeout=120_000)
    status = page.inner_text("#code-suggestion .dm-code-status")
    assert status.startswith("at the marker") and "tokens" in status
    suggestion = page.inner_text("#code-suggestion .dm-sugg")
    assert suggestion.strip()
    ui.shot("code")
    page.click("#code-accept")
    page.wait_for_function("!document.querySelector('#code-editor .cm-content').innerText.includes('<|cursor|>')")
    text = page.inner_text("#code-editor .cm-content")
    assert suggestion.strip().splitlines()[0].strip() in text

    # no marker: the completion goes where the caret is (read from the editor in the browser)
    page.click("#code-editor .cm-content")
    page.keyboard.press("Control+a")
    page.keyboard.press("Delete")
    page.keyboard.insert_text("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n")
    page.keyboard.press("Control+Home")
    page.keyboard.press("End")  # caret after `def add(a, b):`
    page.click("#code-complete")
    page.wait_for_function("document.querySelector('#code-suggestion .dm-code-status').innerText.startsWith('at the cursor')"
                           " && document.querySelector('#code-suggestion .dm-code-status').innerText.includes('tokens')",
                           timeout=120_000)


def api_request(server, method: str = "ar") -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Count: one, two, three,",
                                                         "max_tokens": 16, "method": method}, timeout=120)
    assert r.json()["usage"]["completion_tokens"] == 16


def test_engine_tab_charts_recent_requests(ui, server):
    api_request(server)
    page = ui.tab("Engine")
    page.wait_for_selector("#engine-charts .dm-dot", timeout=10_000)
    info = page.inner_text("#engine-info")
    assert "tiny" in info and "CPU" in info
    assert page.locator("#engine-charts .dm-legend").filter(has_text="ar").count() == 1
    ui.shot("engine")


def test_voice_transcribes_the_microphone_and_plays_the_reply(ui, server):
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng makes the fake microphone's speech (bash setup.sh)")
    page = ui.tab("Voice")
    assert not page.locator(".dv-start").is_disabled(), page.inner_text(".dv-msg")
    page.click(".dv-start")
    # the fake microphone loops its file: some turn transcribes the question (the first may catch
    # only its end when the speech models finished loading mid-sentence)
    page.wait_for_function("[...document.querySelectorAll('.dv-user:not(.partial)')]"
                           ".some((b) => /capital|france/i.test(b.textContent))", timeout=240_000)
    page.wait_for_function("Number(document.querySelector('.dv').dataset.audioChunks || 0) > 0",
                           timeout=240_000)
    page.wait_for_selector(".dv-lat-row", timeout=240_000)
    assert page.inner_text(".dv-bot").strip()
    ui.shot("voice")


def test_dark_mode_follows_the_browser(browser, server):
    api_request(server, "ngram")
    page = Page(browser, server, scheme="dark")
    page.tab("Engine")
    page.page.wait_for_selector("#engine-charts .dm-dot", timeout=10_000)
    bg = page.page.evaluate("getComputedStyle(document.querySelector('.gradio-container')).backgroundColor")
    assert sum(int(x) for x in bg[bg.index("(") + 1:].split(",")[:3]) < 150, bg  # a dark background
    page.shot("dark")
    page.close()
