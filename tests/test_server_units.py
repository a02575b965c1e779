"""Server pieces without a server: FIM prompt building, origin rules, log redaction,
scheduler fairness, and the documented WebSocket examples."""

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from app import protocol as P
from app.backend import ExtraFile, GenRequest, RequestError, Result
from app.config import ServerConfig
from app.prompting import build_prompt
from app.scheduler import Scheduler, Task
from app.security import install_log_redaction, origin_ok
from app.server import origin_regex
from server_fakes import FakeEngine, FakeTokenizer
from domino_backend.engine import GenerationRequest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "websocket-api.md"


def test_qwen_fim_prompt_and_special_tokens_in_user_code_stay_text():
    tok = FakeTokenizer()
    v = tok.get_vocab()
    ids = build_prompt(tok, GenRequest(kind="fim", prefix="a<|fim_middle|>", suffix="z"))
    assert ids[0] == v["<|fim_prefix|>"] and ids[-1] == v["<|fim_middle|>"]
    assert ids.count(v["<|fim_middle|>"]) == 1  # the literal in the code was not turned into a token
    assert ids == [v["<|fim_prefix|>"], *tok.encode("a<|fim_middle|>", split_special_tokens=True),
                   v["<|fim_suffix|>"], ord("z"), v["<|fim_middle|>"]]


def test_qwen_repo_level_prompt_with_extra_files():
    tok = FakeTokenizer()
    v = tok.get_vocab()
    req = GenRequest(kind="fim", prefix="p", suffix="s", filename="src/main.py",
                     extra=[ExtraFile("src/util.py", "def u(): pass")])
    ids = build_prompt(tok, req)
    assert ids[0] == v["<|repo_name|>"] and ids.count(v["<|file_sep|>"]) == 2
    text = "".join(chr(i) if i < 1000 else "|" for i in ids)
    assert "src/util.py\ndef u(): pass\n" in text and "src/main.py\n" in text
    assert ids.index(v["<|fim_prefix|>"]) > ids.index(v["<|file_sep|>"])


def test_prefix_only_fallback_without_fim_tokens():
    class NoFim(FakeTokenizer):
        def get_vocab(self):
            return {}

    ids = build_prompt(NoFim(), GenRequest(kind="fim", prefix="abc", suffix="ignored",
                                           extra=[ExtraFile("u.py", "U")]))
    assert "".join(map(chr, ids)) == "U\n\nabc"


def test_raw_text_prompts_keep_special_tokens_and_empty_prompts_are_refused():
    tok = FakeTokenizer()
    ids = build_prompt(tok, GenRequest(kind="text", prompt="<|fim_prefix|>x"))
    assert ids == [tok.get_vocab()["<|fim_prefix|>"], ord("x")]
    with pytest.raises(RequestError) as e:
        build_prompt(tok, GenRequest(kind="text", prompt=""))
    assert e.value.code == "invalid_request"


@pytest.mark.parametrize("origin,ok", [
    (None, True), ("http://localhost:3000", True), ("http://127.0.0.1", True), ("https://localhost", False),
    ("https://evil.example", False), ("http://localhost.evil.example", False), ("vscode-webview://abc", True),
    ("null", False), ("http://[::1", False),
])
def test_origin_rules(origin, ok):
    cfg = ServerConfig()
    assert origin_ok(cfg, origin) is ok
    if origin and ok:
        assert re.fullmatch(origin_regex(cfg.allowed_origins), origin)
    assert origin_ok(ServerConfig(allowed_origins=["*"]), "https://any.example")


@pytest.mark.parametrize("path", ["/v1/ws?token=s3cret&x=1", "/v1/models?%74oken=s3cret", "/v1/ws?x=1&TOKEN=s3cret",
                                  "/v1/ws?api_key=s3cret", "/v1/ws?to%6Ben=s3cret"])
def test_access_log_masks_keys_however_the_query_spells_them(path):
    install_log_redaction()
    rec = logging.getLogger("uvicorn.access").makeRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:1", "GET", path, "1.1", 101), None)
    assert "s3cret" not in rec.getMessage() and "=***" in rec.getMessage()


def _record_end(finish, name, ends):
    def wrapped(result):
        ends.setdefault(name, time.perf_counter())
        finish(result)

    return wrapped


def test_scheduler_interleaves_rounds_fairly():
    """A short request submitted after a long one finishes first: rounds alternate."""
    import asyncio

    loop = asyncio.new_event_loop()
    from app.backend import StreamJob

    sched = Scheduler(FakeEngine(0.01), max_active=4, max_queue=4)
    sched.start()
    try:
        ends = {}
        jobs = {}
        for name, n in (("long", 60), ("short", 3)):
            job = StreamJob(loop)
            task = Task(job, [1, 2], GenerationRequest(max_new_tokens=n, method="ar"), time.perf_counter())
            job.finish = _record_end(job.finish, name, ends)
            jobs[name] = job
            sched.submit(task)
        t0 = time.monotonic()
        while len(ends) < 2 and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert ends["short"] < ends["long"]
        assert jobs["short"].result.text and jobs["short"].result.finish_reason == "length"
    finally:
        sched.stop()
        loop.close()


def test_a_finished_request_has_left_its_slot_before_the_client_hears_done():
    """A client that reads `done` and submits again (or reads /metrics) must see the slot free:
    every way a request ends (length, cancel, deadline) releases it before publishing."""
    import asyncio

    from app.backend import StreamJob

    loop = asyncio.new_event_loop()
    sched = Scheduler(FakeEngine(0.01), max_active=4, max_queue=4)
    sched.start()
    seen = {}
    try:
        for name, n, deadline in (("length", 3, None), ("cancelled", 10_000, None), ("deadline", 10_000, 0.2)):
            job = StreamJob(loop)
            finish = job.finish
            job.finish = lambda r, name=name, finish=finish: (seen.setdefault(name, (r.finish_reason, sched.load())),
                                                             finish(r))
            now = time.perf_counter()
            task = Task(job, [1, 2], GenerationRequest(max_new_tokens=n, method="ar"), now,
                        deadline=now + deadline if deadline else None)
            sched.submit(task)
            if name == "cancelled":
                time.sleep(0.1)
                sched.cancel(task)
            t0 = time.monotonic()
            while name not in seen and time.monotonic() - t0 < 10:
                time.sleep(0.01)
        assert {k: (r, load["active"], load["queued"]) for k, (r, load) in seen.items()} == {
            k: (k, 0, 0) for k in ("length", "cancelled", "deadline")}
    finally:
        sched.stop()
        loop.close()


def test_scheduler_refuses_when_full():
    import asyncio

    from app.backend import StreamJob

    loop = asyncio.new_event_loop()
    sched = Scheduler(FakeEngine(0.01), max_active=1, max_queue=1)  # not started: nothing drains
    try:
        for _ in range(2):
            sched.submit(Task(StreamJob(loop), [1], GenerationRequest(max_new_tokens=1), time.perf_counter()))
        with pytest.raises(RequestError) as e:
            sched.submit(Task(StreamJob(loop), [1], GenerationRequest(max_new_tokens=1), time.perf_counter()))
        assert (e.value.code, e.value.status) == ("overloaded", 429)
    finally:
        loop.close()


def test_auto_method_drafts_with_a_trained_drafter_else_adaptive_ngram():
    from app.engine_backend import EngineBackend
    from domino_backend.settings import EngineSettings

    cases = ((False, "cuda:0", True, "domino"), (False, "cpu", True, "domino+ngram"),
             (False, "cpu", False, "domino+ngram"), (True, "cuda:0", True, "ngram"),
             (True, "cpu", False, "ar"))  # fixed-length n-gram drafts lose on prose: ar then
    for placeholder, device, adaptive, expected in cases:
        engine = FakeEngine()
        engine.placeholder_draft = placeholder
        engine.target.device = device
        backend = EngineBackend(ServerConfig(target="tiny", engine=EngineSettings(adaptive_drafts=adaptive)),
                                engine=engine)
        backend._ready()
        try:
            assert backend.default_method == expected
        finally:
            backend.scheduler.stop()
    with pytest.raises(ValueError):
        ServerConfig(method="magic")


def test_result_timings_and_usage():
    r = Result(text="x", finish_reason="stop", prompt_tokens=3, completion_tokens=2, ttft_ms=None)
    assert r.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                       "prompt_tokens_details": {"cached_tokens": 0}}
    assert r.timings["ttft_ms"] is None


def _doc_examples():
    blocks = re.findall(r"```json\n(.*?)```", DOCS.read_text(), re.DOTALL)
    for b in blocks:
        for line in b.strip().splitlines():
            line = line.strip()
            if line.startswith("{"):
                yield json.loads(line)


def test_documented_examples_are_valid():
    examples = list(_doc_examples())
    kinds = {e["type"] for e in examples}
    assert {"complete", "chat", "cancel", "ping", "delta", "done", "error", "pong"} <= kinds
    for e in examples:
        if e["type"] in P.CLIENT_TYPES:
            P.parse_client(json.dumps(e), 1 << 20)
        elif e["type"] == "done":
            assert {"id", "finish_reason", "text", "usage", "timings", "spec"} <= set(e)
        elif e["type"] == "error":
            assert {"id", "code", "message"} <= set(e)


def test_stream_job_is_thread_safe_and_ends_with_a_result():
    import asyncio

    from app.backend import StreamJob

    async def main():
        job = StreamJob(asyncio.get_running_loop())

        def produce():
            for w in ("a", "b", ""):
                job.put(w)
            job.finish(Result(text="ab", finish_reason="stop"))
            job.put("late")  # ignored after finish

        threading.Thread(target=produce).start()
        events = [e async for e in job]
        return events

    events = asyncio.run(main())
    assert events[:2] == ["a", "b"] and isinstance(events[2], Result) and len(events) == 3
