"""Scheduler order on a fake clock: priority classes, deadline then arrival within a class,
preemption that keeps a started request's state, supersede/deadline inside a batch, admission by
tokens in flight, and one failing request ending only itself."""

import asyncio

import pytest

from app.backend import GenRequest, RequestError, StreamJob
from app.scheduler import Scheduler, Task
from domino_backend.engine import GenerationRequest, Stats


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Gen:
    """A generation that prefills for `prefill` rounds, then emits one word per round; `boom`
    makes its round fail."""

    def __init__(self, name, req, prefill=0):
        self.name, self.req, self.prefill = name, req, prefill
        self.stats = Stats(method=req.method)
        self.token_ids: list[int] = []
        self.finish_reason = None
        self.cancelled = self.closed = self.boom = False
        self.caps: list[int | None] = []  # draft caps, round by round

    def cancel(self):
        self.cancelled = True

    def prefill_rows(self):
        return 512 if self.prefill else 0

    def cap_drafts(self, n):
        self.caps.append(n)

    def close(self):
        self.closed = True


class RecordingEngine:
    """Steps every generation by one word and records which ones shared each round."""

    def __init__(self):
        self.rounds: list[list[str]] = []
        self.budgets: list[int | None] = []  # each round's max_rows
        self.stops: list = []  # each round's stop callable
        self.during_step = None  # called inside the next steps (a request arriving mid-forward)
        self.gens: dict[str, Gen] = {}
        self.started: list[str] = []

    def stream(self, prompt_ids, req):
        name = req.stop[0]
        self.started.append(name)
        self.gens[name] = Gen(name, req, prefill=len(prompt_ids) // 512)
        return self.gens[name]

    def step(self, gens, max_rows=None, stop=None):
        self.budgets.append(max_rows)
        self.rounds.append([g.name for g in gens])
        self.stops.append(stop)
        if self.during_step:
            self.during_step()
        if stop is not None and stop():  # preempted: nothing moves
            return [""] * len(gens)
        out = []
        for g in gens:
            if g.boom:
                g.finish_reason = "error"
                out.append(RuntimeError("broken"))
                continue
            if g.prefill:
                g.prefill -= 1
                out.append("")
                continue
            g.token_ids.append(1)
            if len(g.token_ids) >= g.req.max_new_tokens:
                g.finish_reason = "length"
            out.append(f"{g.name}. " if g.name.startswith("voice") else f"{g.name} ")  # a voice word is a sentence
        return out


@pytest.fixture
def sched():
    loop = asyncio.new_event_loop()
    clock = Clock()
    s = Scheduler(RecordingEngine(), max_active=2, max_queue=8, max_tokens=200, clock=clock)
    s.loop, s.clk = loop, clock
    yield s
    loop.close()


def add(s: Scheduler, name: str, priority: str, tokens: int = 3, deadline: float | None = None,
        prompt: int = 1) -> Task:
    """A task named `name` (carried in its stop list), arriving now on the fake clock."""
    s.clk.now += 0.001
    req = GenerationRequest(max_new_tokens=tokens, stop=[name])
    task = Task(StreamJob(s.loop), [0] * prompt, req, s.clk.now,
                None if deadline is None else s.clk.now + deadline, tag=name, priority=priority)
    s.submit(task)
    return task


def run(s: Scheduler, rounds: int = 50) -> list[list[str]]:
    for _ in range(rounds):
        if not s.run_round():
            break
    return s.engine.rounds


def test_classes_run_in_priority_order_whatever_the_arrival(sched):
    for name, prio in (("bg", "background"), ("chat", "chat"), ("fim", "interactive"), ("voice", "voice")):
        add(sched, name, prio, tokens=2)
    # (a voice reply's prompt and first words run alone; the others' prompts wait for its end)
    assert run(sched) == [["voice"], ["voice"], ["fim", "chat"], ["fim", "chat"], ["bg"], ["bg"]]


def test_within_a_class_the_earliest_deadline_then_the_earliest_arrival_goes_first(sched):
    sched.max_active = 1
    add(sched, "first", "interactive", tokens=1)
    add(sched, "late_deadline", "interactive", tokens=1, deadline=10)
    add(sched, "soon_deadline", "interactive", tokens=1, deadline=5)
    add(sched, "second", "interactive", tokens=1)
    assert run(sched) == [["soon_deadline"], ["late_deadline"], ["first"], ["second"]]


def test_a_voice_turn_preempts_a_running_completion_which_resumes_where_it_was(sched):
    a, b = add(sched, "a", "interactive", tokens=4), add(sched, "b", "interactive", tokens=4)
    sched.run_round()
    voice = add(sched, "voice", "voice", tokens=2)
    rounds = run(sched)
    assert rounds == [["a", "b"], ["voice"], ["voice", "a"], ["a", "b"], ["a", "b"], ["b"]]
    assert sched.engine.started == ["a", "b", "voice"]  # b kept its generation while it waited
    assert [t.job.result.text for t in (a, b, voice)] == ["a a a a ", "b b b b ", "voice. voice. "]
    assert sched.load() == {"active": 0, "queued": 0, "rounds": 6, "batched": 10, "max_batch": 2}


def test_a_voice_reply_runs_alone_to_its_first_words_then_beside_decoding_requests_without_drafts(sched):
    sched.max_active, sched.max_tokens = 4, None
    fim = add(sched, "fim", "interactive", tokens=6)
    sched.run_round()
    fim_gen = fim.gen
    voice = add(sched, "voice", "voice", tokens=3, prompt=512)  # one prefill round, then 3 sentences
    add(sched, "chat", "chat", tokens=1, prompt=1024)  # two prefill rounds
    rounds = run(sched)
    assert rounds == [["fim"], ["voice"], ["voice"], ["voice", "fim"], ["voice", "fim"],
                      ["fim", "chat"], ["fim", "chat"], ["fim", "chat"]]
    assert voice.job.result.text == "voice. voice. voice. "
    assert fim.job.result.text == "fim " * 6
    assert fim_gen.caps == [None, 0, 0, 0, 0, 0]  # no drafts beside the reply, nor while the conversation is live


def test_rounds_take_every_core_except_while_speech_work_runs_when_speaking_replies_wait():
    import torch

    from app.scheduler import SideWork

    class ThreadsSeen(RecordingEngine):
        def step(self, gens, max_rows=None, stop=None):
            self.threads = getattr(self, "threads", []) + [torch.get_num_threads()]
            return super().step(gens, max_rows, stop)

    loop, clock, side = asyncio.new_event_loop(), Clock(), SideWork()
    before = torch.get_num_threads()
    try:
        s = Scheduler(ThreadsSeen(), max_active=4, max_queue=8, clock=clock, threads=2, shared_threads=1,
                      side_work=side)
        s.loop, s.clk = loop, clock
        add(s, "voice", "voice", tokens=2, prompt=512)  # a prefill round, a first sentence, a second one
        add(s, "fim", "interactive", tokens=1)
        assert run(s) == [["voice"], ["voice"], ["voice"], ["fim"]]
        assert s.engine.threads == [2, 2, 2, 2]
        # ASR or TTS of the server in flight: a reply not yet speaking runs on the shared threads,
        # and a reply already speaking waits for the synthesis
        s.engine.rounds.clear(), s.engine.threads.clear()
        add(s, "voice2", "voice", tokens=2)
        side._n = 1
        assert run(s) == [["voice2"]] and s.engine.threads == [1]
        assert s.run_round() == [] and s.engine.rounds == [["voice2"]]
        side._n = 0
        assert run(s) == [["voice2"], ["voice2"]] and s.engine.threads == [1, 2]
    finally:
        torch.set_num_threads(before)
        loop.close()


def test_side_work_counts_blocking_calls_while_they_run():
    from app.scheduler import SideWork

    side, seen = SideWork(), []

    async def main():
        assert not side.busy
        assert await side.run(lambda x: seen.append(side.busy) or x * 2, 21) == 42
        with pytest.raises(ZeroDivisionError):
            await side.run(lambda: 1 / 0)
        assert not side.busy  # an error still ends the count

    asyncio.run(main())
    assert seen == [True]


def test_a_superseded_completion_leaves_the_batch_at_the_next_round(sched):
    old = add(sched, "old", "interactive", tokens=50)
    other = add(sched, "other", "chat", tokens=4)
    sched.run_round()
    gen = old.gen
    old.job.cancel()  # what a newer keystroke does to the completion it replaces
    sched.cancel(old)
    add(sched, "new", "interactive", tokens=2)
    rounds = run(sched)
    assert rounds[1:] == [["new", "other"], ["new", "other"], ["other"]]
    assert gen.cancelled and gen.closed and old.job.result.finish_reason == "cancelled"
    assert other.job.result.finish_reason == "length"


def test_a_deadline_ends_a_request_inside_the_batch_or_while_it_waits(sched):
    sched.max_active = 1
    running = add(sched, "running", "chat", tokens=50, deadline=1.0)
    waiting = add(sched, "waiting", "background", tokens=50, deadline=2.0)
    sched.run_round()
    sched.clk.now += 1.5
    sched.run_round()  # `running` times out before stepping; `waiting` gets the slot
    sched.clk.now += 1.0
    sched.run_round()
    assert sched.engine.rounds == [["running"], ["waiting"]]
    assert running.job.result.finish_reason == waiting.job.result.finish_reason == "deadline"
    assert running.job.result.completion_tokens == 1 and running.gen is None


def test_a_request_failing_mid_batch_ends_only_itself(sched):
    bad, good = add(sched, "bad", "interactive", tokens=5), add(sched, "good", "interactive", tokens=3)
    sched.run_round()
    bad.gen.boom = True
    run(sched)
    assert bad.job.result.finish_reason == "error" and "RuntimeError" in bad.job.result.error
    assert good.job.result.finish_reason == "length" and good.job.result.text == "good good good "


def test_admission_counts_tokens_in_flight_as_well_as_requests(sched):
    add(sched, "big", "chat", tokens=150, prompt=30)  # 180 of the 200-token budget
    with pytest.raises(RequestError) as e:
        add(sched, "next", "interactive", tokens=20, prompt=10)
    assert (e.value.code, e.value.status) == ("overloaded", 429) and "tokens in flight" in e.value.message
    add(sched, "small", "interactive", tokens=10, prompt=10)  # fits: 200
    run(sched, 500)
    add(sched, "huge", "chat", tokens=500)  # alone, a request is never refused for its size
    with pytest.raises(RequestError, match="priority"):
        add(sched, "odd", "urgent")


def test_requests_get_their_class_from_their_kind_unless_they_name_one():
    assert GenRequest(kind="fim").priority_class == "interactive"
    assert GenRequest(kind="text").priority_class == "interactive"
    assert GenRequest(kind="chat").priority_class == "chat"
    assert GenRequest(kind="chat", priority="voice").priority_class == "voice"


def test_while_a_voice_conversation_is_live_forwards_stay_short(sched):
    from app.scheduler import VOICE_LIVE_S, VOICE_ROWS

    add(sched, "fim", "interactive", tokens=1)
    run(sched)
    add(sched, "voice", "voice", tokens=1)
    run(sched)
    sched.clk.now += VOICE_LIVE_S / 2  # the next keystrokes while the conversation goes on
    add(sched, "fim2", "interactive", tokens=1)
    sched.run_round()
    caps_live = list(sched.engine.gens["fim2"].caps)
    run(sched)
    sched.clk.now += VOICE_LIVE_S  # it went quiet
    add(sched, "fim3", "interactive", tokens=1)
    run(sched)
    assert sched.engine.rounds == [["fim"], ["voice"], ["fim2"], ["fim3"]]
    # others' prompts prefill a block per forward; the turn's own prompt is not cut
    assert sched.engine.budgets == [None, None, VOICE_ROWS, None]
    assert caps_live == [0] and sched.engine.gens["fim3"].caps == [None]  # and no drafts


def test_a_voice_turn_arriving_mid_forward_stops_that_forward_which_is_redone_after_it(sched):
    a = add(sched, "a", "interactive", tokens=3)
    sched.run_round()
    sched.engine.during_step = lambda: (add(sched, "voice", "voice", tokens=1),
                                        setattr(sched.engine, "during_step", None))
    rounds = run(sched)
    # round 2 of "a" was stopped by the turn (nothing committed), the turn ran, then "a" went on
    assert rounds == [["a"], ["a"], ["voice"], ["a"], ["a"]]
    assert a.job.result.text == "a a a "
    stops = sched.engine.stops
    assert stops[2] is None  # a round carrying the turn is never stopped for it
    assert not any(s() for s in stops if s is not None)  # once it ran, no forward stops for it


def test_a_voice_turn_cancelled_before_it_ran_stops_no_later_forward(sched):
    add(sched, "a", "interactive", tokens=3)
    voice = add(sched, "voice", "voice", tokens=1)
    voice.job.cancel()
    rounds = run(sched)
    assert rounds == [["a"], ["a"], ["a"]]
    assert not any(s() for s in sched.engine.stops if s is not None)
