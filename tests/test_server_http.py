"""OpenAI-compatible HTTP, /health, /metrics, auth, limits and the remote backend, on real servers
with the scripted engine (no model weights). The official `openai` client is the HTTP client."""

import json
import threading
import time

import httpx
import openai
import pytest
from websockets.sync.client import connect

from app.config import ServerConfig
from app.engine_backend import EngineBackend
from app.remote import RemoteBackend
from server_fakes import FakeEngine, FakeGeneration, ServerThread


def expected(n: int) -> str:
    return "".join(FakeGeneration.WORDS[i % len(FakeGeneration.WORDS)] for i in range(n))


def serve(round_s=0.01, **cfg):
    c = ServerConfig(port=0, log_level="warning", **{"max_message_bytes": 64 << 10, "method": "domino", **cfg})
    return ServerThread(c, EngineBackend(c, FakeEngine(round_s))).start()


def client(srv, key="unused"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def server():
    srv = serve()
    yield srv
    srv.stop()


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["coder"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["backend"] == "engine" and "domino" in h["methods"]


def test_completions_with_suffix_streaming_matches_non_streaming(server):
    c = client(server)
    full = c.completions.create(model="m", prompt="def f(x):\n    ", suffix="\n", max_tokens=7, temperature=0)
    assert full.object == "text_completion" and full.choices[0].text == expected(7)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 7 and full.usage.prompt_tokens > 0
    ext = full.model_extra["domino"]
    assert ext["finish_reason"] == "length" and ext["spec"]["drafted"] > 0 and ext["timings"]["total_ms"] > 0
    chunks = list(c.completions.create(model="m", prompt="def f(x):\n    ", suffix="\n", max_tokens=7, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_chat_streaming_and_not(server):
    c = client(server)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    full = c.chat.completions.create(model="m", messages=msgs, max_tokens=5)
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content == expected(5)
    stream = c.chat.completions.create(model="m", messages=msgs, max_tokens=5, stream=True)
    parts = [ch.choices[0].delta.content for ch in stream if ch.choices and ch.choices[0].delta.content]
    assert "".join(parts) == full.choices[0].message.content


def test_extensions_via_extra_body(server):
    c = client(server)
    r = c.completions.create(model="m", prompt="x = ", max_tokens=50,
                             extra_body={"single_line": True, "method": "ar"})
    assert r.choices[0].text == "alpha beta gamma" and r.model_extra["domino"]["spec"]["method"] == "ar"


def test_deadline_is_reported_as_length_with_the_precise_reason_in_the_extension():
    srv = serve(round_s=0.05)
    with srv:
        r = client(srv).completions.create(model="m", prompt="x", max_tokens=500, extra_body={"deadline_ms": 200})
        assert r.choices[0].finish_reason == "length" and r.model_extra["domino"]["finish_reason"] == "deadline"


def test_bad_requests_get_openai_errors(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt="x", n=2)
    assert "n (only n=1)" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt="x", max_tokens=10**6)
    assert e.value.code == "invalid_request" and "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="m", prompt=["a", "b"])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="m", messages=[])
    r = httpx.post(server.url + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
    assert r.json()["error"]["message"].startswith("not valid JSON: Expecting property name")
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "temperature": "hot"})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_body_limit(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * (100 << 10)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "message_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b"x" * 1024

    r = httpx.post(server.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_overloaded_is_http_429():
    srv = serve(round_s=0.05, max_active=1, max_queue=0)
    with srv:
        c = client(srv)
        box = {}
        t = threading.Thread(target=lambda: box.update(r=c.completions.create(model="m", prompt="x", max_tokens=20)))
        t.start()
        t0 = time.monotonic()
        while srv.app.state.backend.load()["active"] == 0 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="m", prompt="x", max_tokens=2)
        assert e.value.code == "overloaded"
        t.join()
        assert box["r"].choices[0].text == expected(20)


def test_streaming_client_disconnect_frees_the_slot():
    srv = serve(round_s=0.05, max_active=1)
    with srv:
        with httpx.stream("POST", srv.url + "/v1/completions",
                          json={"prompt": "x", "max_tokens": 1000, "stream": True}) as r:
            next(r.iter_lines())
        assert srv.wait_idle()["active"] == 0
        assert client(srv).completions.create(model="m", prompt="x", max_tokens=2).choices[0].text == expected(2)


def test_non_streaming_client_that_hangs_up_frees_the_slot():
    srv = serve(round_s=0.05, max_active=1)
    with srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1000}, timeout=0.5)
        assert srv.wait_idle()["active"] == 0


def test_api_key_on_http(monkeypatch):
    monkeypatch.setenv("DOMINO_API_KEY", "k3y")
    cfg = ServerConfig.with_env(port=0, log_level="warning")
    assert cfg.api_key == "k3y" and cfg.safe_dict()["api_key"] == "set"
    srv = ServerThread(cfg, EngineBackend(cfg, FakeEngine(0.01))).start()
    with srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # open for load balancers
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(srv.url + "/metrics").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(srv, key="wrong").models.list()
        assert client(srv, key="k3y").completions.create(model="m", prompt="x", max_tokens=1).choices[0].text == "alpha"
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer k3y"}).status_code == 200


def test_origin_and_cors(server):
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://127.0.0.1:3000"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://127.0.0.1:3000"
    pre = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200


def test_metrics_exposition(server):
    client(server).completions.create(model="m", prompt="x", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("domino_requests_total", "domino_generation_tokens_total", "domino_prompt_tokens_total",
                 "domino_spec_accept_length_bucket", "domino_spec_draft_tokens_total",
                 "domino_spec_accepted_tokens_total", "domino_queue_seconds_bucket",
                 "domino_time_to_first_token_seconds_bucket", "domino_e2e_request_latency_seconds_bucket",
                 "domino_requests_running", "domino_requests_queued", "domino_request_errors_total"):
        assert name in text, name
    assert 'domino_requests_total{api="openai",finish_reason="length",kind="text"}' in text


# ---- remote backend: a second server fronting the first through its OpenAI API --------------------
def test_remote_backend_serves_ws_and_openai_through_another_server():
    upstream = serve(round_s=0.02, max_active=1)
    cfg = ServerConfig(port=0, log_level="warning", backend_url=upstream.url)
    front = ServerThread(cfg, RemoteBackend(cfg)).start()
    try:
        t0 = time.monotonic()
        while httpx.get(front.url + "/health").status_code != 200:
            assert time.monotonic() - t0 < 10, "remote backend never became ready"
            time.sleep(0.05)
        assert httpx.get(front.url + "/health").json()["model"] == "coder"  # learned from upstream /v1/models
        with connect(front.ws_url) as ws:
            ws.send(json.dumps({"type": "complete", "id": "r", "prefix": "a", "suffix": "b", "max_tokens": 5}))
            ws.send(json.dumps({"type": "chat", "id": "c", "messages": [{"role": "user", "content": "x"}],
                                "max_tokens": 2}))
            ws.send(json.dumps({"type": "complete", "id": "s", "prefix": "a", "single_line": True,
                                "max_tokens": 50}))
            done, deltas = {}, {}
            while len(done) < 3:
                m = json.loads(ws.recv(timeout=20))
                if m["type"] == "delta":
                    deltas[m["id"]] = deltas.get(m["id"], "") + m["text"]
                elif m["type"] == "done":
                    done[m["id"]] = m
        assert done["r"]["text"] == deltas["r"] == expected(5) and done["r"]["finish_reason"] == "length"
        assert done["r"]["usage"]["completion_tokens"] == 5
        assert done["r"]["spec"]["method"] == "domino"  # the upstream's extension came through
        assert done["c"]["text"] == expected(2)
        assert done["s"]["text"] == "alpha beta gamma" and done["s"]["finish_reason"] == "stop"
        r = client(front).completions.create(model="m", prompt="a", suffix="b", max_tokens=3)
        assert r.choices[0].text == expected(3)
        # cancelling on the front closes the upstream stream, which frees the upstream slot
        with connect(front.ws_url) as ws:
            ws.send(json.dumps({"type": "complete", "id": "long", "prefix": "a", "max_tokens": 1000}))
            assert json.loads(ws.recv(timeout=20))["type"] == "delta"
            ws.send(json.dumps({"type": "cancel", "id": "long"}))
            while (m := json.loads(ws.recv(timeout=20)))["type"] != "done":
                pass
            assert m["finish_reason"] == "cancelled"
        assert upstream.wait_idle()["active"] == 0
    finally:
        front.stop()
        upstream.stop()


def test_remote_backend_unreachable_reports_unavailable():
    cfg = ServerConfig(port=0, log_level="warning", backend_url="http://127.0.0.1:9/v1")
    srv = ServerThread(cfg, RemoteBackend(cfg)).start()
    with srv:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        with pytest.raises(openai.InternalServerError) as e:
            client(srv).completions.create(model="m", prompt="x", max_tokens=1)
        assert e.value.status_code == 503
