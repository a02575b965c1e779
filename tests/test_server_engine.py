"""The server on the real embedded `tiny` profile (SmolLM2-135M): one model load, one shared server.

References are computed with the engine directly, before the server starts (greedy decoding is
deterministic, so every API must return exactly the engine's text).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from websockets.sync.client import connect

from app.config import ServerConfig
from app.engine_backend import EngineBackend
from server_fakes import ServerThread
from domino_backend.engine import GenerationRequest
from domino_backend.loader import build_engine
from domino_backend.prompts import encode

pytestmark = pytest.mark.slow

PREFIXES = ["def add(a, b):\n    ", "import os\n\n\ndef list_files(path):\n", "class Point:\n    def __init__(self",
            "for i in range(10):\n"]
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def ctx():
    engine = build_engine("tiny", dtype="float32")
    tok = engine.target.tokenizer
    ref = {}
    for p in PREFIXES:
        for n in (4, 12):
            ref[(p, n)] = engine.generate(tok.encode(p, add_special_tokens=False),
                                          GenerationRequest(max_new_tokens=n, method="ar")).text
    ref["chat"] = engine.generate(encode(tok, messages=CHAT), GenerationRequest(max_new_tokens=10, method="ar")).text
    cfg = ServerConfig(port=0, target="tiny", method="ar", log_level="warning")
    srv = ServerThread(cfg, EngineBackend(cfg, engine)).start()
    yield srv, ref
    srv.stop()


def ws_run(url, msg, timeout=60.0):
    with connect(url) as ws:
        ws.send(json.dumps(msg))
        deltas = []
        while True:
            m = json.loads(ws.recv(timeout=timeout))
            if m["type"] == "delta":
                deltas.append(m["text"])
            else:
                return deltas, m


def test_health_reports_the_model(ctx):
    srv, _ = ctx
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny" and set(h["methods"]) >= {"ar", "domino"}


def test_streaming_deltas_equal_non_streaming_and_the_engine(ctx):
    srv, ref = ctx
    p = PREFIXES[0]
    want = ref[(p, 12)]
    assert want.strip()
    deltas, done = ws_run(srv.ws_url, {"type": "complete", "id": "a", "prefix": p, "suffix": "\n", "max_tokens": 12})
    assert len(deltas) > 1 and "".join(deltas) == done["text"] == want
    assert done["usage"]["completion_tokens"] == 12 and done["spec"]["method"] == "ar"
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    full = c.completions.create(model="tiny", prompt=p, suffix="\n", max_tokens=12, temperature=0)
    assert full.choices[0].text == want
    parts = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt=p, suffix="\n", max_tokens=12,
                                                               temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == want


def test_chat_over_openai_and_ws_matches_the_engine(ctx):
    srv, ref = ctx
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    full = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert full.choices[0].message.content == ref["chat"]
    stream = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref["chat"]
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 0
    _, done = ws_run(srv.ws_url, {"type": "chat", "id": "c", "messages": CHAT, "max_tokens": 10})
    assert done["text"] == ref["chat"]


def test_domino_method_is_lossless_through_the_server(ctx):
    srv, ref = ctx
    p = PREFIXES[1]
    _, done = ws_run(srv.ws_url, {"type": "complete", "id": "d", "prefix": p, "max_tokens": 12, "method": "domino"})
    assert done["text"] == ref[(p, 12)]
    s = done["spec"]
    assert s["method"] == "domino" and s["drafted"] > 0 and s["rounds"] >= 1 and s["tau"] >= 1.0
    assert len(s["per_position_acceptance"]) > 0


def test_32_concurrent_clients_all_complete_correctly(ctx):
    srv, ref = ctx
    results, errors = {}, []

    def one(i):
        p = PREFIXES[i % len(PREFIXES)]
        try:
            deltas, done = ws_run(srv.ws_url, {"type": "complete", "id": f"k{i}", "prefix": p, "max_tokens": 4},
                                  timeout=120)
            results[i] = ("".join(deltas), done, p)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(results) == 32, errors[:3]
    for i, (text, done, p) in results.items():
        assert done["type"] == "done" and done["finish_reason"] in ("length", "stop"), done
        assert text == done["text"] == ref[(p, 4)], i
    assert time.monotonic() - t0 < 150


def test_cancel_and_deadline_free_the_engine_promptly(ctx):
    srv, ref = ctx
    with connect(srv.ws_url) as ws:
        ws.send(json.dumps({"type": "complete", "id": "long", "prefix": PREFIXES[2], "max_tokens": 400}))
        assert json.loads(ws.recv(timeout=60))["type"] == "delta"
        ws.send(json.dumps({"type": "cancel", "id": "long"}))
        t0 = time.monotonic()
        ws.send(json.dumps({"type": "complete", "id": "next", "prefix": PREFIXES[0], "max_tokens": 4}))
        done = {}
        while len(done) < 2:
            m = json.loads(ws.recv(timeout=60))
            if m["type"] == "done":
                done[m["id"]] = m
        assert done["long"]["finish_reason"] == "cancelled" and done["long"]["usage"]["completion_tokens"] < 100
        assert done["next"]["text"] == ref[(PREFIXES[0], 4)]
        assert time.monotonic() - t0 < 20
        t0 = time.monotonic()
        ws.send(json.dumps({"type": "complete", "id": "dl", "prefix": PREFIXES[3], "max_tokens": 400,
                            "deadline_ms": 400}))
        while (m := json.loads(ws.recv(timeout=60)))["type"] != "done":
            pass
        assert m["finish_reason"] == "deadline" and time.monotonic() - t0 < 10
    assert srv.app.state.backend.load().items() >= {"active": 0, "queued": 0}.items()


def test_python_m_app_serves_and_reports_loading_then_ok():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DOMINO_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--profile", "tiny", "--dtype", "float32", "--port",
                             str(port), "--method", "ar", "--threads", "1", "--log-level", "info"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        seen, t0 = set(), time.monotonic()
        while time.monotonic() - t0 < 120:
            try:
                r = httpx.get(url + "/health", timeout=2)
                seen.add(r.json()["status"])
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()[-2000:]
            time.sleep(0.1)
        assert "ok" in seen
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        assert c.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0).usage.completion_tokens
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Hello" not in out  # prompts are not logged
    assert proc.returncode in (0, -15)
