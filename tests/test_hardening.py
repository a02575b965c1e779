"""Hostile input, one test per class: each gets a clear answer, no connection dies or goes silent,
and no key or forged line reaches the log. Real servers on loopback with the scripted engine; the
decode/validate/encode steps they share live in app/edge.py (the fuzz test throws generated input
at the same servers: tests/test_fuzz_server.py)."""

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
import unicodedata
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app import edge
from app import protocol as P
from app.__main__ import parser
from app.backend import ERROR_STATUS, GenRequest, RequestError
from app.config import ServerConfig
from app.engine_backend import EngineBackend
from app.metrics import Metrics
from app.security import host_ok, log_safe
from app.ws import Connection
from server_fakes import FakeEngine, FakeGeneration, FakeTokenizer, ServerThread

ROOT = Path(__file__).resolve().parents[1]


def expected(n: int) -> str:
    return "".join(FakeGeneration.WORDS[i % len(FakeGeneration.WORDS)] for i in range(n))


def serve(round_s=0.01, **cfg):
    c = ServerConfig(port=0, **{"log_level": "warning", "max_message_bytes": 64 << 10, "method": "ar", **cfg})
    return ServerThread(c, EngineBackend(c, FakeEngine(round_s))).start()


@pytest.fixture(scope="module")
def server():
    srv = serve(max_prompt_tokens=100)  # prompts over 1600 characters are refused before tokenizing
    yield srv
    srv.stop()


@contextlib.contextmanager
def log_lines():
    """Formatted lines of every log record (uvicorn's and the app's) in the block. Enter it after
    building the server: uvicorn's config replaces the handlers of its loggers."""
    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            self.lines = []

        def emit(self, record):
            self.lines.extend(self.format(record).split("\n"))

    h = Lines()
    names = ("", "uvicorn", "uvicorn.access")
    level = logging.getLogger("domino").level
    logging.getLogger("domino").setLevel(logging.INFO)
    for n in names:
        logging.getLogger(n).addHandler(h)
    try:
        yield h.lines
    finally:
        for n in names:
            logging.getLogger(n).removeHandler(h)
        logging.getLogger("domino").setLevel(level)


def recv(ws, timeout=10.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def until(ws, rid, types=("done", "error")) -> dict:
    while (m := recv(ws))["type"] not in types or m.get("id") != rid:
        pass
    return m


def assert_pings(ws, pid="alive"):
    ws.send(json.dumps({"type": "ping", "id": pid}))
    assert until(ws, pid, ("pong",)) == {"type": "pong", "id": pid}


def post(srv, path, body: str | bytes, **headers):
    headers.setdefault("content-type", "application/json")
    return httpx.post(srv.url + path, content=body, headers=headers, timeout=20)


def raw_controls(lines):
    return [ln for ln in lines if any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in ln)]


# ---- lone surrogates: replaced by U+FFFD in every string, never an unanswerable frame or a 500 -------
def test_lone_surrogates_are_replaced_and_every_message_is_answered(server):
    with connect(server.ws_url) as ws:
        ws.send('{"type": "ping", "id": "\\ud83d"}')  # the echoed id could not be encoded as UTF-8
        assert recv(ws) == {"type": "pong", "id": "\ufffd"}
        ws.send('{"type": "complete", "id": "c\\udc00", "prefix": "emoji cut \\ud83d", "max_tokens": 2}')
        done = until(ws, "c\ufffd")
        assert (done["type"], done["text"]) == ("done", expected(2))
        ws.send('{"type": "chat", "id": "h", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 1}')
        assert until(ws, "h")["text"] == expected(1)
        assert_pings(ws)
    for path, body in (("/v1/completions", '{"prompt": "a\\ud800", "max_tokens": 2}'),
                       ("/v1/completions", '{"prompt": "a\\ud800", "max_tokens": 2, "stream": true}'),
                       ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}')):
        r = post(server, path, body)  # the tokenizer raised TypeError on these: a plain-text 500
        assert r.status_code == 200 and "alpha" in r.text and '"error"' not in r.text, r.text


def test_decode_keeps_surrogate_pairs_and_replaces_lone_ones_everywhere():
    assert edge.decode_json('"\\ud83d\\ude00"') == "\U0001F600"
    assert edge.decode_json('{"k\\ud800": ["\\udc00", {"x": "a\\ud83db"}]}') == {"k\ufffd": ["\ufffd", {"x": "a\ufffdb"}]}
    with pytest.raises(RequestError) as e:
        edge.decode_json("{\"a\": \"\udcff\"}")  # a text frame whose bytes were not UTF-8 (app/transport.py)
    assert e.value.code == "bad_utf8"
    with pytest.raises(RequestError) as e:
        edge.decode_json(b'{"a": "\xff"}')
    assert e.value.code == "bad_utf8"


def test_a_reply_that_cannot_be_sent_closes_the_socket_with_a_reason():
    class BrokenSocket:
        closed_with = None

        async def send_text(self, text):
            raise RuntimeError("transport broke")

        async def close(self, code=1000, reason=""):
            self.closed_with = (code, reason)

    sock = BrokenSocket()
    conn = Connection(sock, None, ServerConfig(), Metrics())
    asyncio.run(conn.send({"type": "pong", "id": None}))
    assert conn.closed and sock.closed_with == (1011, "send failed")  # not open and silent
    assert edge.encode_json({"id": "\ud800"}).encode("utf-8") == b'{"id":"\\ud800"}'  # the encoder itself never fails


# ---- frames that broke the parser: bad_json, and requests in flight go on ---------------------------
HOSTILE_JSON = [
    '{"type": "ping", "n": 1' + "0" * 4300 + "}",  # over Python's int-string limit (a ValueError)
    '{"type": "ping", "x": NaN}', '{"type": "ping", "x": -Infinity}',
    "[" * 20000 + "]" * 20000,  # deeper than the parser's recursion limit
    "", "   ", '{"type": "ping"',
]


def test_frames_the_parser_refuses_get_bad_json_and_requests_in_flight_finish(server):
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "complete", "id": "long", "prefix": "x", "max_tokens": 40}))
        assert recv(ws)["type"] == "delta"
        for frame in HOSTILE_JSON:
            ws.send(frame)
            m = until(ws, None, ("error",))
            assert m["code"] == "bad_json" and m["message"].startswith(("not valid JSON", "the message is empty")), m
        done = until(ws, "long")
        assert (done["finish_reason"], done["text"]) == ("length", expected(40))  # not cancelled
        assert_pings(ws)
    for frame in HOSTILE_JSON:
        r = post(server, "/v1/completions", frame)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json", (frame[:40], r.text)


def test_an_unexpected_error_costs_one_frame_not_the_connection(server, monkeypatch):
    def broken(text, limit):
        raise RuntimeError("bug")

    with connect(server.ws_url) as ws:
        monkeypatch.setattr(P, "parse_client", broken)
        ws.send('{"type": "ping"}')
        m = recv(ws)
        monkeypatch.undo()
        assert (m["type"], m["code"]) == ("error", "internal")
        assert_pings(ws)

    async def submit_fails(req):
        raise TypeError("bug")

    monkeypatch.setattr(server.app.state.backend, "submit", submit_fails)
    r = post(server, "/v1/completions", '{"prompt": "x"}')
    assert r.status_code == 500 and r.json()["error"] == {"message": "internal server error", "type": "server_error",
                                                          "param": None, "code": "internal"}


# ---- parameters the engine cannot honour: 400 at the edge, not a 500 or finish_reason error ---------
BAD_PARAMS = [
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"top_p": 1e-300, "temperature": 1}, "top_p"),
    ({"top_p": 0}, "top_p"), ({"stop": ["x" * 257]}, "256 characters"), ({"stop": list("abcdefghi")}, "at most 8"),
    ({"max_tokens": 2000}, "max_tokens"), ({"temperature": 2.5}, "temperature"), ({"deadline_ms": 0}, "deadline_ms"),
]


@pytest.mark.parametrize("params,named", BAD_PARAMS, ids=[n for _, n in BAD_PARAMS])
def test_out_of_range_parameters_are_refused_at_the_edge(server, params, named):
    r = post(server, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2, **params}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request" and named in r.text, r.text
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "complete", "id": "q", "prefix": "x", "max_tokens": 2, **params}))
        m = recv(ws)
        assert (m["type"], m["code"], m["id"]) == ("error", "invalid_request", "q") and named in m["message"], m


def test_the_engine_honours_the_extremes_the_edge_allows():
    from domino_backend.engine import Engine, GenerationRequest
    from tiny import tiny_target

    engine = Engine(tiny_target())
    for kw in ({"seed": 2**64 - 1}, {"seed": -(2**63)}, {"top_p": edge.TOP_P_MIN}):
        gen = engine.generate([1, 2, 3], GenerationRequest(max_new_tokens=4, temperature=1.0, method="ar", **kw))
        assert len(gen.token_ids) == 4, kw


def test_the_extremes_that_are_allowed_run(server):
    for params in ({"seed": 2**64 - 1, "temperature": 1}, {"seed": -(2**63), "temperature": 1},
                   {"top_p": edge.TOP_P_MIN, "temperature": 1}, {"stop": ["x" * 256] * 8}):
        r = post(server, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2, **params}))
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(2), (params, r.text)


# ---- logs: no key, no forged line ------------------------------------------------------------------
def test_access_log_never_shows_the_key():
    srv = serve(api_key="k3y-s3cret", log_level="info")
    with srv, log_lines() as lines:
        for q in ("token=k3y-s3cret", "%74oken=k3y-s3cret", "x=1&%54OKEN=k3y-s3cret"):
            r = httpx.get(f"{srv.url}/v1/models?{q}")
            assert r.status_code == (401 if "OKEN" in q else 200)  # the server reads `%74oken` as `token`
        with connect(srv.ws_url + "?%74oken=k3y-s3cret") as ws:
            assert_pings(ws)
    assert sum("/v1/models" in ln for ln in lines) == 3 and any("/v1/ws" in ln for ln in lines)
    assert not [ln for ln in lines if "k3y-s3cret" in ln]


def test_client_text_cannot_forge_a_log_line():
    srv = serve(log_level="info")
    forged = "x\nINFO domino.server: forged \x1b[2J\u202e\r"
    with srv, log_lines() as lines:
        with connect(srv.ws_url) as ws:
            ws.send(json.dumps({"type": "complete", "id": forged, "prefix": "a", "max_tokens": 1}))
            assert until(ws, forged)["type"] == "done"
        httpx.get(srv.url + "/v1/%0Aforged%1B[31m?a=%0a")
    assert any("ws fim x\\x0aINFO" in ln for ln in lines), lines  # the line is there, escaped
    assert any("GET /v1/%0Aforged" in ln for ln in lines)
    assert not [ln for ln in lines if ln.startswith("INFO domino.server: forged")]
    assert not raw_controls(lines)


def test_log_safe_escapes_every_control_and_masks_keys():
    assert log_safe("a\nb\x1b\x00\u2028\u202e\ud800c") == "a\\x0ab\\x1b\\x00\\u2028\\u202e\\ud800c"
    assert log_safe("tb\n  line\t", keep_lines=True) == "tb\n  line\t"
    assert log_safe("/v1/ws?a=1&api_key=K&b=2") == "/v1/ws?a=1&api_key=***&b=2"


# ---- prompt size: bounded by characters before tokenizing; memory stays flat (bench/hostile_session.py)
def test_oversized_prompts_are_refused_before_tokenizing(server):
    limit = server.cfg.max_prompt_chars
    before = FakeTokenizer.chars_encoded
    r = post(server, "/v1/completions", json.dumps({"prompt": "y" * (limit + 1)}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    assert f"{limit + 1} characters; the limit is {limit}" in r.text
    r = post(server, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "y" * limit}] * 2}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "chat", "id": "p", "messages": [{"role": "user", "content": "y" * (limit // 2)}] * 3}))
        m = recv(ws)
        assert (m["code"], m["id"]) == ("prompt_too_long", "p") and "characters" in m["message"], m
        assert FakeTokenizer.chars_encoded == before  # none of them reached the tokenizer
        ws.send(json.dumps({"type": "chat", "id": "t", "messages": [{"role": "user", "content": "y" * 500}]}))
        m = recv(ws)  # under the bound: counted in tokens
        assert (m["code"], m["id"]) == ("prompt_too_long", "t") and "tokens; the limit is 100" in m["message"], m


def test_huge_fim_text_is_cut_around_the_cursor_before_tokenizing(server):
    """FIM prompts are trimmed to the token limit, not refused for their size; what the trimming
    tokenizes is bounded by the character limit, even for one 60 000-character line (minified code)."""
    limit = server.cfg.max_prompt_chars
    before = FakeTokenizer.chars_encoded
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "complete", "id": "f", "prefix": "y" * 30_000, "suffix": "z" * 30_000}))
        m = recv(ws)
        assert (m["code"], m["id"]) == ("prompt_too_long", "f") and "limit is 100" in m["message"], m
        lines = "".join(f"x{i} = {i}\n" for i in range(2000))  # whole lines: trimmed to fit
        ws.send(json.dumps({"type": "complete", "id": "g", "prefix": lines + "y = ", "suffix": "\n" + lines,
                            "max_tokens": 2}))
        done = until(ws, "g")
        assert (done["type"], done["text"]) == ("done", expected(2)) and done["usage"]["prompt_tokens"] <= 100
    assert FakeTokenizer.chars_encoded - before < 6 * limit  # a few passes over 2 x limit, not over 60 000


# ---- metrics count every request, also streams the client dropped ----------------------------------
def test_a_cancelled_http_stream_is_counted_in_metrics():
    srv = serve(round_s=0.05)
    with srv:
        with httpx.stream("POST", srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1000, "stream": True},
                          timeout=20) as r:
            next(r.iter_lines())
        pattern = re.compile(r'domino_requests_total\{api="openai",finish_reason="cancelled",kind="text"\} 1\.0')
        t0 = time.monotonic()
        while not pattern.search(text := httpx.get(srv.url + "/metrics").text):
            assert time.monotonic() - t0 < 5, text
            time.sleep(0.05)
        tokens = float(re.search(r'domino_generation_tokens_total\{method="ar"\} (\S+)', text).group(1))
        assert tokens >= 1


# ---- one error vocabulary, with messages that say what to do ---------------------------------------
def test_bodies_that_are_not_json_objects_say_what_to_send(server):
    r = httpx.post(server.url + "/v1/completions", data={"prompt": "x"})  # what `curl -d prompt=x` sends
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert "send Content-Type: application/json" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", '{"prompt": "x"}', **{"content-type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}')  # no content type
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(1)
    r = post(server, "/v1/chat/completions", "[1, 2]")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_message"
    r = post(server, "/v1/completions", '{"prompt": "x", "max_tokens": "many"}')
    assert r.json()["error"]["message"] == "max_tokens: Input should be a valid integer, unable to parse string as an integer"


def test_websocket_and_http_refusals_have_the_same_shape():
    srv = serve(api_key="k")
    with srv, log_lines() as lines:
        http = httpx.get(srv.url + "/v1/models")
        with pytest.raises(InvalidStatus) as e:
            connect(srv.ws_url)
        ws = e.value.response
        assert http.status_code == ws.status_code == 401
        for body in (http.json()["error"], json.loads(ws.body)["error"]):
            assert body["message"].startswith("missing or wrong API key")
            assert (body["type"], body["code"], body["param"]) == ("authentication_error", "unauthorized", None)
    assert not [ln for ln in lines if ln.startswith("ERROR")]  # a refusal is not a server error


def test_every_error_code_is_in_the_vocabulary_and_documented():
    used = set()
    for path in (ROOT / "app").glob("*.py"):
        used |= set(re.findall(r'(?:RequestError|ProtocolError|fail|error_response|_deny)\([^"\n]*"([a-z0-9_]+)"',
                               path.read_text()))
    assert used and used <= set(ERROR_STATUS), used - set(ERROR_STATUS)
    docs = (ROOT / "docs" / "websocket-api.md").read_text()
    table = docs[docs.index("### Error codes"):]
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.MULTILINE))
    assert documented == set(ERROR_STATUS)


# ---- Host header: loopback names only when bound to loopback (DNS rebinding) -----------------------
def test_host_header_is_checked_on_http_and_websocket(server):
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]", "127.0.0.2"):
        assert httpx.get(server.url + "/metrics", headers={"Host": host}).status_code == 200, host
    for host in (f"rebind.example:{port}", "localhost.example", "evil@127.0.0.1"):
        r = httpx.get(server.url + "/metrics", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
    with pytest.raises(InvalidStatus) as e:  # a page at rebind.example, its name resolved to 127.0.0.1
        connect(f"ws://rebind.example:{port}/v1/ws", sock=socket.create_connection(("127.0.0.1", port)))
    assert e.value.response.status_code == 403
    srv = serve(allowed_hosts=["MyBox"])
    with srv:
        assert httpx.get(srv.url + "/v1/models", headers={"Host": "mybox:80"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models", headers={"Host": "other"}).status_code == 403


def test_host_rules_by_bind_address_and_flag():
    assert host_ok(ServerConfig(host="0.0.0.0"), "gpu-box.lan")  # exposed on purpose: any name (use a key)
    assert not host_ok(ServerConfig(host="0.0.0.0", allowed_hosts=["gpu-box.lan"]), "other.lan")
    assert host_ok(ServerConfig(host="0.0.0.0", allowed_hosts=["gpu-box.lan"]), "localhost:8000")
    assert host_ok(ServerConfig(allowed_hosts=["*"]), "anything")
    assert host_ok(ServerConfig(), None)  # HTTP/1.0 tools send no Host; browsers always do
    assert parser().parse_args(["--allow-host", "a.lan", "--allow-host", "b"]).allow_host == ["a.lan", "b"]


def test_stop_string_limit_cannot_exceed_the_engines():
    from domino_backend.engine import MAX_STOPS

    with pytest.raises(ValueError):
        ServerConfig(max_stop_strings=MAX_STOPS + 1)
    req = edge.check_request(GenRequest(kind="text", prompt="x", stop=["", "a", ""]), ServerConfig())
    assert req.stop == ["a"]
