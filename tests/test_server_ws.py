"""WebSocket API on a real uvicorn server with a scripted engine (real scheduler, no model weights).

The scripted engine emits the words alpha, beta, gamma, newline, ... one per round (FakeGeneration),
so expected texts are exact; the real-model behaviour is covered in test_server_engine.py.
"""

import json
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app.config import ServerConfig
from app.engine_backend import EngineBackend
from server_fakes import FakeEngine, FakeGeneration, ServerThread

ROUND_S = 0.01


def expected(n: int) -> str:
    return "".join(FakeGeneration.WORDS[i % len(FakeGeneration.WORDS)] for i in range(n))


def serve(engine=None, **cfg):
    c = ServerConfig(port=0, log_level="warning", **{"max_message_bytes": 64 << 10, "method": "domino", **cfg})
    eng = engine or FakeEngine(ROUND_S)
    return ServerThread(c, EngineBackend(c, eng)).start(), eng


@pytest.fixture(scope="module")
def server():
    srv, eng = serve()
    srv.engine = eng
    yield srv
    srv.stop()


def recv(ws, timeout=10.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def run_all(ws, ids, timeout=20.0) -> dict:
    """Read until every id got its done (or error); returns {id: {"deltas": [...], "done"/"error": msg}}."""
    out = {i: {"deltas": []} for i in ids}
    pending = set(ids)
    deadline = time.monotonic() + timeout
    while pending:
        m = recv(ws, max(0.1, deadline - time.monotonic()))
        if m["type"] == "delta":
            out[m["id"]]["deltas"].append(m["text"])
        elif m["type"] in ("done", "error") and m.get("id") in pending:
            out[m["id"]][m["type"]] = m
            pending.discard(m["id"])
    return out


def complete(id, **kw):
    return json.dumps({"type": "complete", "id": id, "prefix": "def f(x):\n    ", "suffix": "\n", **kw})


def assert_alive(ws):
    ws.send(json.dumps({"type": "ping", "id": "alive"}))
    assert recv(ws) == {"type": "pong", "id": "alive"}
    ws.send(complete("alive-c", max_tokens=2))
    assert run_all(ws, ["alive-c"])["alive-c"]["done"]["text"] == expected(2)


def test_complete_round_trip_streams_deltas_and_done(server):
    with connect(server.ws_url) as ws:
        ws.send(complete("r1", max_tokens=6, language="python", filename="f.py"))
        r = run_all(ws, ["r1"])["r1"]
    done = r["done"]
    assert "".join(r["deltas"]) == done["text"] == expected(6)
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 6 and done["usage"]["prompt_tokens"] > 0
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 6
    t = done["timings"]
    assert set(t) == {"queue_ms", "prefill_ms", "ttft_ms", "total_ms"} and 0 <= t["queue_ms"] <= t["ttft_ms"] <= t["total_ms"]
    assert done["spec"]["method"] == "domino" and done["spec"]["drafted"] > 0 and "tau" in done["spec"]


def test_chat_ping_and_method_choice(server):
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "ping"}))
        assert recv(ws) == {"type": "pong", "id": None}
        ws.send(json.dumps({"type": "chat", "id": "c", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 3, "method": "ar"}))
        done = run_all(ws, ["c"])["c"]["done"]
    assert done["text"] == expected(3) and done["spec"]["method"] == "ar" and done["spec"]["drafted"] == 0


def test_many_requests_in_flight_on_one_connection(server):
    with connect(server.ws_url) as ws:
        for i in range(6):
            ws.send(complete(f"m{i}", max_tokens=2 + i))
        r = run_all(ws, [f"m{i}" for i in range(6)])
    for i in range(6):
        assert "".join(r[f"m{i}"]["deltas"]) == r[f"m{i}"]["done"]["text"] == expected(2 + i)


def test_single_line_stops_at_end_of_first_line(server):
    with connect(server.ws_url) as ws:
        ws.send(complete("s", max_tokens=50, single_line=True))
        done = run_all(ws, ["s"])["s"]["done"]
    assert done["text"] == "alpha beta gamma" and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] <= 4  # stopped at the line break, not at max_tokens


def test_stop_strings_are_passed_to_the_engine(server):
    with connect(server.ws_url) as ws:
        ws.send(complete("st", max_tokens=5, stop=[" gamma"]))
        done = run_all(ws, ["st"])["st"]["done"]
    # The scripted engine ignores stop strings; this checks they reach it as the engine field.
    assert done["finish_reason"] == "length"


def test_cancel_frees_the_slot_and_next_request_is_prompt():
    srv, _ = serve(FakeEngine(0.05), max_active=1)
    with srv:
        with connect(srv.ws_url) as ws:
            ws.send(complete("long", max_tokens=1000))
            assert recv(ws)["type"] == "delta"
            t0 = time.monotonic()
            ws.send(json.dumps({"type": "cancel", "id": "long"}))
            ws.send(complete("next", max_tokens=2))
            r = run_all(ws, ["long", "next"])
            assert r["long"]["done"]["finish_reason"] == "cancelled"
            assert r["next"]["done"]["text"] == expected(2)
            assert time.monotonic() - t0 < 5.0  # ~3 rounds of 50 ms, not 1000 (50 s); slack for busy CI
            assert r["long"]["done"]["usage"]["completion_tokens"] < 20


def test_cancel_while_queued_never_starts_the_engine():
    srv, eng = serve(FakeEngine(0.05), max_active=1)
    with srv:
        with connect(srv.ws_url) as ws:
            ws.send(complete("a", max_tokens=8))
            ws.send(complete("queued", max_tokens=8))
            ws.send(json.dumps({"type": "cancel", "id": "queued"}))
            r = run_all(ws, ["a", "queued"])
        assert r["queued"]["done"]["finish_reason"] == "cancelled" and r["queued"]["done"]["text"] == ""
        assert r["a"]["done"]["text"] == expected(8)
        assert eng.started == 1


def test_supersede_by_document_cancels_the_older_request():
    srv, _ = serve(FakeEngine(0.05), max_active=1)
    with srv:
        with connect(srv.ws_url) as ws:
            ws.send(complete("old", max_tokens=1000, document="file:///a.py"))
            ws.send(complete("other-doc", max_tokens=2, document="file:///b.py"))
            assert recv(ws)["type"] == "delta"
            ws.send(complete("new", max_tokens=3, document="file:///a.py"))
            r = run_all(ws, ["old", "new", "other-doc"])
        assert r["old"]["done"]["finish_reason"] == "cancelled"
        assert r["new"]["done"]["text"] == expected(3) and r["new"]["done"]["finish_reason"] == "length"
        assert r["other-doc"]["done"]["finish_reason"] == "length"  # other documents are untouched


def test_deadline_returns_partial_text_in_time():
    srv, _ = serve(FakeEngine(0.05))
    with srv:
        with connect(srv.ws_url) as ws:
            t0 = time.monotonic()
            ws.send(complete("d", max_tokens=1000, deadline_ms=300))
            r = run_all(ws, ["d"])["d"]
            elapsed = time.monotonic() - t0
        done = r["done"]
        assert done["finish_reason"] == "deadline"
        assert "".join(r["deltas"]) == done["text"] and done["text"]  # what existed is kept
        assert elapsed < 3.0 and done["timings"]["total_ms"] < 1500  # 1000 rounds would be 50 s


def test_disconnect_cancels_in_flight_work():
    srv, _ = serve(FakeEngine(0.05), max_active=2)
    with srv:
        with connect(srv.ws_url) as ws:
            ws.send(complete("x", max_tokens=1000))
            ws.send(complete("y", max_tokens=1000))
            recv(ws)
        assert srv.wait_idle().items() >= {"active": 0, "queued": 0}.items()


def test_overloaded_when_queue_is_full():
    srv, _ = serve(FakeEngine(0.05), max_active=1, max_queue=1)
    with srv:
        with connect(srv.ws_url) as ws:
            for i in range(3):
                ws.send(complete(f"o{i}", max_tokens=4))
            r = run_all(ws, ["o0", "o1", "o2"])
        assert r["o2"]["error"]["code"] == "overloaded" and "busy" in r["o2"]["error"]["message"]
        assert r["o0"]["done"]["text"] == r["o1"]["done"]["text"] == expected(4)


# ---- bad input: an error message, and the connection goes on ------------------------------------
BAD_FRAMES = [
    ("{not json", "bad_json", None),
    ("[1, 2]", "invalid_message", None),
    ('"just a string"', "invalid_message", None),
    ('{"id": "q"}', "unknown_type", "q"),
    ('{"type": "explode", "id": "q"}', "unknown_type", "q"),
    ('{"type": 7}', "unknown_type", None),
    ('{"type": "complete", "prefix": "x"}', "invalid_request", None),  # no id
    ('{"type": "complete", "id": "q", "prefix": "x", "max_tokens": "12"}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": "x", "max_tokens": 1.5}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": "x", "temperature": "hot"}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": "x", "single_line": 1}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": 5}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": "x", "extra": "nope"}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": "x", "stop": [1]}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": "x", "temperature": -1}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": "x", "deadline_ms": 0}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q"}', "invalid_request", "q"),  # neither prefix nor suffix
    ('{"type": "complete", "id": "", "prefix": "x"}', "invalid_request", None),
    ('{"type": "chat", "id": "q", "messages": []}', "invalid_request", "q"),
    ('{"type": "chat", "id": "q", "messages": [{"role": "robot", "content": "x"}]}', "invalid_request", "q"),
    ('{"type": "cancel"}', "invalid_request", None),
    ('{"type": "complete", "id": "q", "prefix": "x", "max_tokens": 100000}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": "x", "method": "magic"}', "invalid_request", "q"),
    ('{"type": "complete", "id": "q", "prefix": "x", "stop": ["a","b","c","d","e","f","g","h","i"]}',
     "invalid_request", "q"),
]


@pytest.mark.parametrize("frame,code,rid", BAD_FRAMES, ids=[c + ":" + f[:40] for f, c, _ in BAD_FRAMES])
def test_bad_frames_get_an_error_and_the_connection_lives(server, frame, code, rid):
    with connect(server.ws_url) as ws:
        ws.send(frame)
        m = recv(ws)
        assert m["type"] == "error" and m["code"] == code and m["id"] == rid, m
        assert m["message"]
        assert_alive(ws)


def test_invalid_utf8_binary_and_huge_frames(server):
    with connect(server.ws_url, max_size=None) as ws:
        ws.send(b'{"type": "ping", "id": "\xff\xfe"}', text=True)  # a text frame that is not UTF-8
        assert recv(ws)["code"] == "bad_utf8"
        ws.send(b'{"type": "ping"}')  # binary frame
        assert recv(ws)["code"] == "binary_frame"
        ws.send(json.dumps({"type": "complete", "id": "big", "prefix": "x" * (100 << 10)}))  # over 64 KiB
        m = recv(ws)
        assert m["code"] == "message_too_large" and "65536" in m["message"]
        assert_alive(ws)


def test_prompt_too_long_and_per_connection_limits():
    srv, _ = serve(FakeEngine(0.05), max_prompt_tokens=100, max_inflight_per_connection=2)
    with srv:
        with connect(srv.ws_url) as ws:
            ws.send(complete("long-prompt", prefix="y" * 500))
            m = recv(ws)
            assert (m["code"], m["id"]) == ("prompt_too_long", "long-prompt")
            assert "limit is 100" in m["message"]
            ws.send(complete("a", max_tokens=1000))
            ws.send(complete("a", max_tokens=1))
            m = recv(ws)
            assert (m["type"], m["code"], m["id"]) == ("error", "duplicate_id", "a")
            ws.send(complete("b", max_tokens=1000))
            ws.send(complete("c", max_tokens=1))
            m = recv(ws)
            while m["type"] == "delta":
                m = recv(ws)
            assert (m["code"], m["id"]) == ("too_many_requests", "c")
            for i in ("a", "b"):
                ws.send(json.dumps({"type": "cancel", "id": i}))
            ws.send(json.dumps({"type": "cancel", "id": "never-existed"}))  # ignored, no error
            r = run_all(ws, ["a", "b"])
            assert {r[i]["done"]["finish_reason"] for i in "ab"} == {"cancelled"}
            assert_alive(ws)


# ---- auth and origin ------------------------------------------------------------------------------
def test_api_key_on_websocket():
    srv, _ = serve(api_key="s3cret")
    with srv:
        with pytest.raises(InvalidStatus) as e:
            connect(srv.ws_url)
        assert e.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            connect(srv.ws_url, additional_headers={"Authorization": "Bearer wrong"})
        for kw, url in (({"additional_headers": {"Authorization": "Bearer s3cret"}}, srv.ws_url),
                        ({"additional_headers": {"X-API-Key": "s3cret"}}, srv.ws_url),
                        ({}, srv.ws_url + "?token=s3cret")):
            with connect(url, **kw) as ws:
                assert_alive(ws)


def test_origin_allow_list(server):
    with pytest.raises(InvalidStatus) as e:
        connect(server.ws_url, origin="https://evil.example")
    assert e.value.response.status_code == 403
    with connect(server.ws_url, origin="http://localhost:5173") as ws:
        assert_alive(ws)
