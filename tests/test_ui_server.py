"""The UI on the real server (scripted engine, no model): it is mounted at `/` after the APIs, the
Guard still protects everything, and with an API key the browser gets in through `/?token=KEY`."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.sync.client import connect

from app.config import ServerConfig
from app.engine_backend import EngineBackend
from server_fakes import FakeEngine, ServerThread

KEY = "s3cret-key"


def serve(**kw) -> ServerThread:
    cfg = ServerConfig(port=0, ui=True, target="fake", log_level="warning", **kw)
    return ServerThread(cfg, EngineBackend(cfg, FakeEngine())).start()


@pytest.fixture(scope="module")
def open_srv():
    srv = serve()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed():
    srv = serve(api_key=KEY)
    yield srv
    srv.stop()


def test_ui_and_apis_share_the_port_and_the_apis_keep_their_routes(open_srv):
    assert httpx.get(open_srv.url + "/").status_code == 200
    assert httpx.get(open_srv.url + "/config").json()["title"] == "Domino"
    assert httpx.get(open_srv.url + "/health").json()["status"] == "ok"  # not swallowed by the mount at /
    assert httpx.get(open_srv.url + "/v1/models").json()["data"]
    assert httpx.get(open_srv.url + "/gradio_api/info").status_code == 200


def test_keyless_loopback_page_requests_pass_and_foreign_origins_do_not(open_srv):
    local = {"Origin": f"http://127.0.0.1:{open_srv.port}"}
    assert httpx.get(open_srv.url + "/config", headers=local).status_code == 200
    evil = httpx.post(open_srv.url + "/gradio_api/queue/join", headers={"Origin": "https://evil.example"}, json={})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"


def test_with_a_key_the_ui_needs_it_and_keeps_it_in_a_strict_cookie(keyed):
    assert httpx.get(keyed.url + "/").status_code == 401
    assert httpx.get(keyed.url + "/config").status_code == 401
    assert httpx.get(keyed.url + "/?token=wrong").status_code == 401
    r = httpx.get(keyed.url + "/?token=" + KEY)
    assert r.status_code == 303 and r.headers["location"] == "/"  # the token leaves the address bar
    cookie = r.headers["set-cookie"].lower()
    assert "domino_key=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    with httpx.Client(base_url=keyed.url, cookies=r.cookies) as browser:
        assert browser.get("/").status_code == 200
        assert browser.get("/config").status_code == 200
        assert browser.get("/v1/models").status_code == 200  # the same key, as the Authorization header would be
    with connect(keyed.ws_url, additional_headers={"Cookie": f"domino_key={KEY}"}) as ws:
        ws.send(json.dumps({"type": "complete", "id": "a", "prefix": "x", "max_tokens": 2}))
        while (m := json.loads(ws.recv(timeout=10)))["type"] == "delta":
            pass
        assert m["type"] == "done"
    with pytest.raises(Exception, match="401"):
        connect(keyed.ws_url, additional_headers={"Cookie": "domino_key=wrong"})
