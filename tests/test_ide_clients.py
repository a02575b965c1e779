"""The IDE clients (clients/vscode, clients/nvim) against a real `python -m app` on loopback.

- VS Code: the extension's protocol client and completer, compiled by tsc, run under Node
  (clients/vscode/test/harness.ts, driven over stdin): VS Code itself cannot run here. The `.vsix`
  is packaged with @vscode/vsce and its contents checked.
- Neovim: Debian's `nvim --headless` with the plugin; clients/nvim/test/typing.lua types into a
  Python buffer, reads the ghost-text extmarks, accepts, and writes what it saw as JSON. With
  DOMINO_SCREENSHOTS=1 the screen with ghost text is saved to docs/img/ide-nvim.png.

Both typing sessions print keystroke-to-ghost-text latency (p50/p95; `-s` shows it). The server is
the `tiny` profile unless DOMINO_IDE_PROFILE names another (e.g. coder).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.serving import free_port, spawn_server  # noqa: E402

VSCODE = ROOT / "clients" / "vscode"
NVIM = ROOT / "clients" / "nvim"
KEY = "ide-test-key"
PROFILE = os.environ.get("DOMINO_IDE_PROFILE", "tiny")
# What both typing sessions type, one key at a time, at the end of this file.
HEAD = "import math\n\n\ndef area(r):\n    return math.pi * r * r\n\n\n"
TYPED = "def perimeter(w, h):"


def need(tool: str) -> str:
    """The path of `tool`; a missing one fails the test (bash setup.sh dev installs it), never skips it."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: bash setup.sh dev installs it (npm ci in clients/vscode, Debian's neovim)")
    return path


class Server:
    """`python -m app` with the API key KEY on a fixed loopback port, so it can be restarted in place."""

    def __init__(self, *args: str):
        self.args, self.port, self.proc = args, free_port(), None
        self.url = f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self, timeout_s: float = 600) -> Server:
        self.proc, _ = spawn_server(["--profile", PROFILE, *self.args], timeout_s=timeout_s, port=self.port,
                                    env={**os.environ, "DOMINO_API_KEY": KEY})
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server():
    # One running request at a time: a cancelled request must free the only slot for the next one.
    srv = Server("--max-active", "1").start()
    yield srv
    srv.stop()


def percentiles(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=20, method="inclusive") if len(ms) > 1 else ms * 19
    return f"p50 {statistics.median(ms):.0f} ms, p95 {q[18]:.0f} ms over {len(ms)} keystrokes"


# ---- VS Code: the protocol client under Node ---------------------------------------------------------------
@pytest.fixture(scope="module")
def vscode_build():
    need("node")
    need("npm")
    if not (VSCODE / "node_modules" / ".bin" / "tsc").exists():
        pytest.fail("clients/vscode/node_modules is missing: run `npm ci` there (bash setup.sh dev does)")
    subprocess.run(["npm", "run", "--silent", "compile"], cwd=VSCODE, check=True, timeout=300)
    return VSCODE / "out" / "test" / "harness.js"


class Harness:
    """clients/vscode/test/harness.js: one JSON command a line in, answers and state events out."""

    def __init__(self, script: Path):
        self.proc = subprocess.Popen(["node", str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        self.answers: dict[str, dict] = {}
        self.events: list[dict] = []
        self.n = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def send(self, op: str, **kw) -> str:
        self.n += 1
        tag = f"t{self.n}"
        self.proc.stdin.write(json.dumps({"op": op, "tag": tag, **kw}) + "\n")
        return tag

    def answer(self, tag: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while tag not in self.answers:
            try:
                m = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no answer to {tag} within {timeout} s; events {self.events}") from None
            if "event" in m:
                self.events.append(m)
            else:
                self.answers[m["tag"]] = m
        return self.answers.pop(tag)

    def call(self, op: str, timeout: float = 60, **kw) -> dict:
        return self.answer(self.send(op, **kw), timeout)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def node(vscode_build):
    h = Harness(vscode_build)
    yield h
    h.close()


def doc(text: str, name: str = "shapes.py") -> dict:
    return {"key": f"file:///work/{name}", "filename": name, "languageId": "python", "text": text, "offset": len(text)}


@pytest.mark.slow
def test_vscode_completion_arrives_with_speed_stats(server, node):
    assert node.call("connect", url=server.url, apiKey=KEY)["state"] == "connected"
    r = node.call("complete", req={"prefix": HEAD + "def circumference(r):\n    return", "single_line": True,
                                   "max_tokens": 16, "document": "file:///work/a.py"})
    c = r["completion"]
    assert c["finishReason"] in ("stop", "length") and c["text"].strip() and "\n" not in c["text"].strip("\n")
    assert c["usage"]["completion_tokens"] > 0 and c["spec"]["tau"] >= 1 and c["spec"]["tokens_per_s"] > 0
    # The completer (what the editor's provider calls) answers the same way, debounce included.
    s = node.call("type", doc=doc(HEAD + "def circumference(r):\n    return"))["suggestion"]
    assert s["text"].strip() and s["latencyMs"] >= 75


@pytest.mark.slow
def test_vscode_newer_keystroke_supersedes_the_older(server, node):
    node.call("connect", url=server.url, apiKey=KEY)
    key = "file:///work/b.py"
    old = node.send("complete", req={"prefix": HEAD + "def volume(r):\n", "max_tokens": 200, "document": key})
    time.sleep(0.3)
    new = node.send("complete", req={"prefix": HEAD + "def volume(r, h):\n", "max_tokens": 4, "document": key})
    o, n = node.answer(old)["completion"], node.answer(new)["completion"]
    assert o["finishReason"] == "cancelled" and o["usage"]["completion_tokens"] < 200
    assert n["finishReason"] in ("stop", "length") and n["usage"]["completion_tokens"] <= 4
    # Through the completer: three quick keystrokes (inside the debounce) send only the last one.
    tags = [node.send("type", doc=doc(HEAD + TYPED[:i])) for i in (17, 18, 19)]
    answers = [node.answer(t) for t in tags]
    assert [a["suggestion"] is None for a in answers[:2]] == [True, True]
    assert node.call("inflight")["inflight"] == 0


@pytest.mark.slow
def test_vscode_cancel_frees_the_slot(server, node):
    node.call("connect", url=server.url, apiKey=KEY)
    long = node.send("complete", req={"prefix": "Once upon a time", "max_tokens": 400})
    time.sleep(0.5)
    node.call("cancel", target=long)
    short = node.send("complete", req={"prefix": HEAD + "print(", "max_tokens": 4})
    t0 = time.monotonic()
    c = node.answer(short)["completion"]
    assert node.answer(long)["completion"]["finishReason"] == "cancelled"
    # --max-active 1: the short request ran only because the cancel freed the slot at once (400 tokens take a minute here).
    assert c["finishReason"] in ("stop", "length") and c["timings"]["queue_ms"] < 5000
    assert time.monotonic() - t0 < 30
    assert node.call("inflight")["inflight"] == 0


@pytest.mark.slow
def test_vscode_wrong_key_is_reported_as_auth_failure(server, node):
    r = node.call("connect", url=server.url, apiKey="wrong-key")
    assert r["state"] == "unauthorized" and "401" in r["detail"]
    e = node.call("complete", req={"prefix": "x = ", "max_tokens": 2})["error"]
    assert e["code"] == "unauthorized"
    time.sleep(1.5)  # longer than the harness's largest back-off: a refused key is not retried
    node.call("inflight")  # reads every event sent before its answer
    assert [ev["state"] for ev in node.events] == ["connecting", "unauthorized"]


@pytest.mark.slow
def test_vscode_reconnects_after_a_server_restart(server, node):
    assert node.call("connect", url=server.url, apiKey=KEY)["state"] == "connected"
    server.stop()
    assert node.call("state", want="disconnected")["state"] == "disconnected"
    failed = node.call("complete", req={"prefix": "x = ", "max_tokens": 2})["error"]
    assert failed["code"] == "not_connected"  # fails fast while the server is down, no hang
    server.start()
    assert node.call("state", want="connected", timeoutMs=30_000)["state"] == "connected"
    c = node.call("complete", req={"prefix": HEAD + "x = ", "max_tokens": 4})["completion"]
    assert c["finishReason"] in ("stop", "length")
    states = [ev["state"] for ev in node.events]
    assert states.count("connecting") >= 3  # it kept retrying while the server was down


@pytest.mark.slow
def test_vscode_typing_session_latency(server, node):
    node.call("connect", url=server.url, apiKey=KEY)
    shown, latencies = 0, []
    for i in range(1, len(TYPED) + 1):
        r = node.call("type", doc=doc(HEAD + TYPED[:i]))
        assert "error" not in r, r
        if r["suggestion"]:
            shown += 1
            latencies.append(r["suggestion"]["latencyMs"])
    print(f"\nVS Code client, {PROFILE}: keystroke to ghost text {percentiles(latencies)} ({shown} with a suggestion)")
    assert shown >= len(TYPED) // 2


@pytest.mark.parametrize("offset, budget, prefix, suffix", [
    (8, (100, 100), "ab\ncd\nef", "gh\nij\n"),  # everything fits
    (8, (5, 3), "cd\nef", "gh\n"),  # cut at line starts / ends: "cd\nef" is the last whole-line prefix within 5
    (8, (1, 1), "ef", "gh\n"),  # the cursor's line stays whole even over the budget
    (0, (5, 0), "", "ab\n"),
])
def test_vscode_cursor_window_cuts_at_lines(node, offset, budget, prefix, suffix):
    r = node.call("window", text="ab\ncd\nefgh\nij\n", offset=offset, prefixChars=budget[0], suffixChars=budget[1])
    assert (r["prefix"], r["suffix"]) == (prefix, suffix)


def test_vscode_extension_packages_as_vsix(vscode_build, tmp_path):
    vsix = tmp_path / "domino.vsix"
    subprocess.run(["npm", "run", "--silent", "package", "--", "--out", str(vsix)], cwd=VSCODE, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    names = zipfile.ZipFile(vsix).namelist()
    assert "extension/package.json" in names and "extension/out/src/extension.js" in names
    assert "extension/node_modules/ws/package.json" in names  # the runtime dependency ships inside
    assert not [n for n in names if n.endswith(".ts") or "/test/" in n or "/src/" in n and not n.startswith("extension/out/")]
    manifest = json.loads(zipfile.ZipFile(vsix).read("extension/package.json"))
    assert "domino.serverUrl" in manifest["contributes"]["configuration"]["properties"]


def render_screen(dump: dict, path: Path) -> None:
    """Draw the screen headless nvim reported (its cells and their highlight groups) as a PNG."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    regular = ImageFont.truetype(str(fonts / "DejaVuSansMono.ttf"), 18)
    italic = ImageFont.truetype(str(fonts / "DejaVuSansMono-Oblique.ttf"), 18)
    cw, ch = round(regular.getlength("M")), 24
    rows = dump["rows"]
    bg = "#1d2021"
    img = Image.new("RGB", (cw * len(rows[0]) + 24, ch * len(rows) + 24), bg)
    draw = ImageDraw.Draw(img)
    groups, attr_groups = dump["groups"], dump["attr_groups"]
    for r, cells in enumerate(rows):
        for c, (text, attr) in enumerate(cells):
            group = attr_groups.get(str(attr), "Normal")
            colors = groups.get(group) or {}
            x, y = 12 + c * cw, 12 + r * ch
            if group == "StatusLine":
                draw.rectangle([x, y, x + cw, y + ch], fill="#504945")
            fg = colors.get("fg") if group != "StatusLine" and str(colors.get("fg")).startswith("#") else "#ebdbb2"
            draw.text((x, y + 2), text, fill=fg, font=italic if group == "DominoGhost" else regular)
    row, col = dump["cursor"]
    x, y = 12 + (col - 1) * cw, 12 + (row - 1) * ch
    draw.rectangle([x, y + 2, x + 1, y + ch - 2], fill="#ebdbb2")  # the insert-mode cursor
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ---- Neovim: the plugin in headless nvim ------------------------------------------------------------------
def run_nvim(server, tmp_path: Path, screen: Path | None = None) -> dict:
    nvim = need("nvim")
    src = tmp_path / "shapes.py"
    src.write_text(HEAD)
    record = tmp_path / "record.json"
    env = {**os.environ, "DOMINO_URL": server.url, "DOMINO_API_KEY": KEY, "DOMINO_TEST_TYPED": TYPED,
           "DOMINO_TEST_OUT": str(record), **({"DOMINO_TEST_SCREEN": str(screen)} if screen else {})}
    proc = subprocess.run([nvim, "--headless", "-u", str(NVIM / "test" / "minimal_init.lua"), "-c",
                           f"luafile {NVIM / 'test' / 'typing.lua'}", str(src)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert record.exists(), f"nvim wrote no record (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    out = json.loads(record.read_text())
    assert "error" not in out, out["error"]
    return out


@pytest.mark.slow
def test_nvim_ghost_text_supersede_and_accept(server, tmp_path):
    screen = tmp_path / "screen.json"
    out = run_nvim(server, tmp_path, screen)
    keys = out["keystrokes"]
    assert len(keys) == len(TYPED) and all(k["answered"] for k in keys)
    shown = [k for k in keys if k["shown"]]
    assert len(shown) >= len(TYPED) // 2
    for k in shown:  # the extmark holds the suggestion: first line at the cursor, the rest as virtual lines
        (mark,) = k["extmarks"]
        first, *rest = k["ghost"].split("\n")
        assert mark["virt_text"] == first and mark["virt_lines"] == rest and k["ghost"] == k["text"]
    print(f"\nNeovim plugin, {PROFILE}: keystroke to ghost text {percentiles([k['latency_ms'] for k in shown])} "
          f"({len(shown)} with a suggestion)")
    assert out["burst"] == {"keys": 3, "requests": 1}  # keys inside the debounce send one request
    assert out["superseded"]["finish_reasons"] == ["cancelled"]
    acc = out["accept"]
    assert acc["after"] == acc["before"] + acc["ghost"] and acc["mode"] == "i"
    last_line = acc["after"].split("\n")[-1]
    assert acc["cursor"] == [acc["line_count"], len(last_line.encode())]  # the cursor ends after the insertion
    assert out["status"].startswith("Domino: connected") and "ms" in out["status"]
    if os.environ.get("DOMINO_SCREENSHOTS"):
        render_screen(json.loads(screen.read_text()), ROOT / "docs" / "img" / "ide-nvim.png")
