"""The served engine does all its torch work on one OS thread: loading, then every round.

Two threads entering OpenMP parallel regions leave two OpenMP teams, and libgomp then makes every
team sleep between regions instead of spinning (see app.scheduler.EngineThread) — the server's
engine ran ~35 % slower than the same engine on the thread that loaded it. These tests pin the
threading, which is what that speed depends on.
"""

import asyncio
import threading

from app.backend import GenRequest
from app.config import ServerConfig
from app.engine_backend import EngineBackend
from app.scheduler import EngineThread
from server_fakes import FakeEngine


def test_engine_thread_runs_work_in_order_on_one_thread_and_hands_back_errors():
    et = EngineThread()
    seen = []
    futs = [et.submit(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(5)]
    for f in futs:
        f.result(5)
    assert [i for i, _ in seen] == list(range(5))
    assert {t for _, t in seen} == {et.thread.ident} != {threading.get_ident()}
    boom = et.submit(lambda: 1 / 0)
    try:
        boom.result(5)
        raise AssertionError("the exception should reach the caller")
    except ZeroDivisionError:
        pass
    assert et.submit(lambda: 42).result(5) == 42  # the thread survives a failing job


def test_backend_loads_and_decodes_on_the_same_thread(monkeypatch):
    threads = {}

    class RecordingEngine(FakeEngine):
        def stream(self, prompt_ids, req):
            threads["decode"] = threading.get_ident()
            return super().stream(prompt_ids, req)

    def fake_build_engine(*args, **kw):
        threads["load"] = threading.get_ident()
        return RecordingEngine()

    import domino_backend.loader

    monkeypatch.setattr(domino_backend.loader, "build_engine", fake_build_engine)

    async def main():
        backend = EngineBackend(ServerConfig(target="tiny", method="ar"))
        await backend.start()
        for _ in range(200):
            if backend.health()["status"] == "ok":
                break
            await asyncio.sleep(0.01)
        job = await backend.submit(GenRequest(kind="text", prompt="hello", max_tokens=3))
        async for _ in job:
            pass
        await backend.close()

    asyncio.run(main())
    assert threads["load"] == threads["decode"] != threading.get_ident()
