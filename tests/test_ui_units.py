"""The UI's logic without a browser: numbers under replies, the race verdict, charts, where a code
completion goes, and how a UI job is run, cancelled and recorded."""

from __future__ import annotations

import asyncio

import pytest

from app.backend import GenRequest, RequestError, Result, StreamJob
from app.config import ServerConfig
from app.metrics import Finished, Metrics
from ui import charts
from ui.stats import (ar_baseline, decode_rate, first_difference, identical_verdict, reply_footer, speedup)


def result(method="domino", tokens=100, total_ms=2000.0, queue_ms=0.0, prefill_ms=0.0, tau=2.5, finish="length",
           text="x", rounds=40, per_pos=None, acc_per_pos=None) -> Result:
    spec = {"method": method, "tau": tau, "rounds": rounds, "per_position_acceptance": per_pos or [],
            "accepted_per_position": acc_per_pos or []}
    return Result(text=text, finish_reason=finish, completion_tokens=tokens, total_ms=total_ms, queue_ms=queue_ms,
                  prefill_ms=prefill_ms, spec=spec)


def done(r: Result, api="ws") -> Finished:
    return Finished(0.0, api, "fim", r)


# ---- stats ---------------------------------------------------------------------------------------
def test_decode_rate_leaves_out_queue_and_prefill():
    assert decode_rate(result(tokens=100, total_ms=3000, queue_ms=500, prefill_ms=500)) == pytest.approx(50.0)
    assert decode_rate(result(tokens=0)) is None
    assert decode_rate(result(tokens=5, total_ms=100, queue_ms=100)) is None  # no decode time at all


def test_ar_baseline_is_the_median_of_measurable_finished_ar_runs():
    recent = [done(result("ar", tokens=20, total_ms=1000)), done(result("ar", tokens=40, total_ms=1000)),
              done(result("ar", tokens=60, total_ms=1000)),
              done(result("ar", tokens=3, total_ms=10)),  # too short to measure
              done(result("ar", tokens=500, total_ms=1000, finish="cancelled")),
              done(result("domino", tokens=900, total_ms=1000)),
              Finished(0.0, "ui", "race_shared", result("ar", tokens=10, total_ms=1000))]  # over shared time
    assert ar_baseline(recent) == pytest.approx(40.0)
    assert ar_baseline([done(result("domino"))]) is None


def test_reply_footer_says_tau_speed_and_speedup_against_the_measured_baseline():
    r = result("domino+ngram", tokens=100, total_ms=2000, tau=3.25)
    line = reply_footer(r, baseline=25.0)
    assert line.startswith("τ 3.25 · 50.0 tok/s · ≈2.00× vs ar · domino+ngram · 100 tokens in 2.0 s")
    assert "max tokens reached" in line
    assert "not measured yet" in reply_footer(r, baseline=None)
    assert "the ar baseline" in reply_footer(result("ar", tau=1.0, finish="stop"), baseline=25.0)
    assert reply_footer(result(finish="cancelled"), 25.0).endswith("stopped")
    assert speedup(r, None) is None


def test_first_difference_and_the_identical_verdict():
    assert first_difference("abc", "abc") is None
    assert first_difference("abc", "abd") == 2
    assert first_difference("ab", "abc") == 2
    same, text = identical_verdict(result(text="hello", tokens=3), result(text="hello", tokens=3))
    assert same and text == "identical output: yes (3 tokens, 5 characters)"
    same, text = identical_verdict(result(text="hello"), result(text="help!"))
    assert not same and "first difference at character 3" in text
    same, text = identical_verdict(result(text="a"), result(text="a", finish="cancelled"))
    assert not same and "did not finish" in text


# ---- charts --------------------------------------------------------------------------------------
def test_bars_draw_one_bar_per_value_with_escaped_labels():
    svg = charts.bars([0.5, 0.25, 0.0], label="acc <per> pos", names=["a<b", "2", "3"])
    assert svg.count("<rect") == 3 and "a&lt;b: 50%" in svg and 'aria-label="acc &lt;per&gt; pos"' in svg
    assert "no data yet" in charts.bars([], label="x")


def test_dots_colour_each_request_by_its_method():
    svg = charts.dots([(10.0, "ar", "ar 10"), (25.0, "domino+ngram", "fast")], label="tok/s")
    assert svg.count("<circle") == 2 and "m-ar" in svg and "m-domino-ngram" in svg and "<polyline" in svg
    assert charts.method_class("domino+ngram") == "m-domino-ngram"


# ---- code tab -------------------------------------------------------------------------------------
def test_completion_goes_to_the_marker_then_the_caret_then_the_end():
    from ui.tabs.code import MARKER, split_at_cursor

    s = split_at_cursor(f"def f():\n    {MARKER}\nx = 1\n", caret=3)
    assert (s.prefix, s.suffix, s.where) == ("def f():\n    ", "\nx = 1\n", "marker")
    s = split_at_cursor("ab😀cd", caret=3)  # a code-point offset, as the browser side computes it
    assert (s.prefix, s.suffix, s.where) == ("ab😀", "cd", "cursor")
    assert split_at_cursor("abc", caret=-1).where == "end" and split_at_cursor("abc", caret=99).prefix == "abc"
    with pytest.raises(ValueError, match="exactly one cursor marker"):
        split_at_cursor(f"a{MARKER}b{MARKER}", caret=0)


def test_preview_shows_the_suggestion_between_escaped_context_lines():
    from ui.tabs.code import Split, preview_html

    html = preview_html(Split("p1\np2\np3\np4\np5\nif a <", "\nend\nq2\nq3\nq4", "cursor"), " b:", "ok")
    assert '<span class="dm-sugg"> b:</span>' in html and "if a &lt;" in html
    assert "p2" not in html and "p3" in html  # the line and three lines before
    assert "q2" in html and "q3" not in html  # the rest of the line and two more


def test_context_files_are_read_and_capped(tmp_path):
    from ui.tabs.code import MAX_CONTEXT_FILE_CHARS, read_context

    p = tmp_path / "util.py"
    p.write_text("x" * (MAX_CONTEXT_FILE_CHARS + 10))
    (f,) = read_context([str(p)])
    assert f.filename == "util.py" and len(f.text) == MAX_CONTEXT_FILE_CHARS
    assert read_context(None) == []


# ---- race tab -------------------------------------------------------------------------------------
def test_race_compares_rounds_when_sharing_and_speeds_when_sequential():
    from ui.tabs.race import Lane, comparison, lane_html, verdict_html

    ar = result("ar", tokens=48, total_ms=4800, rounds=47, tau=1.0, text="same")
    spec = result("domino", tokens=48, total_ms=1600, rounds=16, tau=3.0, text="same")
    assert comparison(ar, spec, "domino", sequential=True) == "domino decoded 3.00× as fast as ar"
    assert comparison(ar, spec, "domino", sequential=False).startswith("domino needed 16 verify rounds where ar needed 47")
    html = verdict_html(Lane("ar", result=ar), Lane("domino", result=spec), sequential=True)
    assert 'class="dm-verdict yes"' in html and "identical output: yes" in html
    bad = verdict_html(Lane("ar", result=ar), Lane("domino", result=result(text="other")), sequential=True)
    assert 'class="dm-verdict no"' in bad and "as fast" not in bad
    lane = lane_html(Lane("ar", chunks=["<a>", "b"], started=1.0), now=3.0)
    assert '<span class="dm-chunk c0">&lt;a&gt;</span><span class="dm-chunk c1">b</span>' in lane and "2 rounds" in lane


# ---- engine tab / header -----------------------------------------------------------------------------
def test_acceptance_per_position_is_summed_over_recent_requests():
    from ui.tabs.engine import acceptance_by_method

    recent = [done(result("domino", rounds=10, acc_per_pos=[8, 4])), done(result("domino", rounds=10, acc_per_pos=[6])),
              done(result("ar", rounds=20, acc_per_pos=[]))]
    assert acceptance_by_method(recent) == {"domino": [0.7, 0.2]}


def test_engine_info_names_the_drafter_and_the_remote():
    from ui.jobs import Ctx
    from ui.tabs.engine import drafter_text, info_html

    assert drafter_text(None, None).startswith("none")
    assert "placeholder" in drafter_text("untrained placeholder", None)
    assert drafter_text("trained", "/ckpt") == "trained · /ckpt"
    ctx = Ctx(backend=None, cfg=ServerConfig(backend_url="http://gpu:30000/v1"), metrics=Metrics())
    html = info_html(ctx, {"status": "ok", "model": "m"}, {"CPU": "x"})
    assert "remote http://gpu:30000/v1" in html and "drafter" not in html


def test_header_shows_progress_while_loading_and_the_error_when_it_failed():
    from ui.app import status_html

    assert "dm-progress" in status_html({"status": "loading", "model": "coder"}, started=0.0)
    assert "failed to load" in status_html({"status": "error", "model": "c", "error": "no <file>"}, 0.0)
    assert "no &lt;file&gt;" in status_html({"status": "error", "model": "c", "error": "no <file>"}, 0.0)
    ok = status_html({"status": "ok", "model": "tiny", "default_method": "ngram", "backend": "engine"}, 0.0)
    assert "tiny" in ok and "ngram" in ok


def test_chat_text_of_reads_gradio_message_parts():
    from ui.tabs.chat import text_of

    assert text_of("plain") == "plain"
    assert text_of([{"type": "text", "text": "a"}, {"type": "file", "file": {}}, {"type": "text", "text": "b"}]) == "ab"


def test_voice_tab_explains_a_missing_endpoint():
    from ui.tabs.voice import client_options

    assert client_options(True) == {"path": "/v1/voice", "available": True, "reason": ""}
    assert "/v1/voice" in client_options(False)["reason"]


# ---- running a job ------------------------------------------------------------------------------------
class SlowBackend:
    """Streams one word every 10 ms until cancelled (then finishes with `cancelled`)."""

    name, model_id, default_method = "fake", "fake", "ar"

    def __init__(self):
        self.jobs: list[StreamJob] = []

    async def submit(self, req: GenRequest) -> StreamJob:
        loop = asyncio.get_running_loop()
        job = StreamJob(loop)
        self.jobs.append(job)

        async def feed():
            n = 0
            while not job.cancelled.is_set() and n < req.max_tokens:
                job.put("w ")
                n += 1
                await asyncio.sleep(0.01)
            job.finish(Result(text="w " * n, finish_reason="cancelled" if job.cancelled.is_set() else "length",
                              completion_tokens=n, spec={"method": "ar"}))

        loop.create_task(feed())
        return job


def test_leaving_a_job_early_cancels_it_and_records_the_result():
    from ui.jobs import Ctx, running

    async def main():
        ctx = Ctx(SlowBackend(), ServerConfig(), Metrics())
        async with running(ctx, GenRequest(kind="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=500)) as ev:
            async for e in ev:
                break  # e.g. the Stop button cancelled the handler
        job = ctx.backend.jobs[0]
        assert job.cancelled.is_set()
        for _ in range(100):
            if ctx.metrics.recent:
                break
            await asyncio.sleep(0.01)
        (f,) = ctx.metrics.recent
        assert (f.api, f.kind, f.result.finish_reason) == ("ui", "chat", "cancelled") and f.result.text == ""

        async with running(ctx, GenRequest(kind="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)) as ev:
            events = [e async for e in ev]
        assert events[:3] == ["w "] * 3 and isinstance(events[-1], Result)
        assert ctx.metrics.recent[-1].result.finish_reason == "length" and not ctx.backend.jobs[1].cancelled.is_set()

        with pytest.raises(RequestError, match="max_tokens"):
            async with running(ctx, GenRequest(kind="chat", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=10**6)):
                pass
        assert len(ctx.backend.jobs) == 2  # refused at the edge: never reached the backend
        assert ctx.metrics.registry.get_sample_value("domino_request_errors_total",
                                                     {"api": "ui", "code": "invalid_request"}) == 1

    asyncio.run(main())

