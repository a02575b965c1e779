"""The voice session's turn-taking on fake time with fake parts: every state transition, early start,
barge-in, backchannel, supersede, echo guard, idle close, and what the history keeps.

Fakes: audio is "speech" where its samples are non-zero; the VAD reports speech after `MIN_SPEECH`
of it and silence after `early_turn_ms`; the ASR names the utterance's length; the TTS gives 0.1 s
of audio per word; the LLM streams one scripted word per `TOKEN_S`. The clock only moves when a
test moves it, so every timing below is exact.
"""

import asyncio
import heapq
import itertools

import numpy as np
import pytest

from agents.voice.config import VoiceConfig
from agents.voice.parts import SAMPLE_RATE, VadEvent
from agents.voice.playout import Playout
from agents.voice.session import State, VoiceSession
from app.backend import RequestError, Result

FRAME = 0.02
MIN_SPEECH = 0.1
TOKEN_S = 0.05
TTS_RATE = 1000
REPLY = "Paris is the capital. It is big. It has a tower."


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self._sleepers: list = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.t + seconds, next(self._seq), fut))
        await fut

    async def advance(self, dt: float) -> None:
        end = self.t + dt
        while True:
            await settle()
            if self._sleepers and self._sleepers[0][0] <= end:
                at, _, fut = heapq.heappop(self._sleepers)
                self.t = max(self.t, at)
                if not fut.done():
                    fut.set_result(None)
            else:
                break
        self.t = end
        await settle()


async def settle(n: int = 30) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class FakeVAD:
    sample_rate = SAMPLE_RATE

    def __init__(self, silence_s: float):
        self.silence_s = silence_s
        self.t = 0.0
        self.in_speech = False
        self.run_start: float | None = None  # speech run (not yet started) or silence run (in speech)

    def reset(self) -> None:
        self.__init__(self.silence_s)

    def feed(self, pcm):
        speech = bool(np.any(pcm != 0))
        t0, self.t = self.t, self.t + len(pcm) / SAMPLE_RATE
        if not self.in_speech:
            if not speech:
                self.run_start = None
                return []
            self.run_start = t0 if self.run_start is None else self.run_start
            if self.t - self.run_start >= MIN_SPEECH - 1e-9:
                self.in_speech, start, self.run_start = True, self.run_start, None
                return [VadEvent("speech_start", start)]
            return []
        if speech:
            self.run_start = None
            return []
        self.run_start = t0 if self.run_start is None else self.run_start
        if self.t - self.run_start >= self.silence_s - 1e-9:
            self.in_speech, end, self.run_start = False, self.run_start, None
            return [VadEvent("speech_end", end)]
        return []


class FakeASR:
    def __init__(self):
        self.calls: list[float] = []
        self.gate: asyncio.Event | None = None  # set: transcriptions wait for it (a slow ASR)
        self.hears_nothing = False  # a cough: speech to the VAD, no words to Whisper

    def transcribe(self, pcm) -> str:
        self.calls.append(len(pcm) / SAMPLE_RATE)
        voiced = np.count_nonzero(pcm) / SAMPLE_RATE
        if self.hears_nothing:
            return ""
        return f"words for {voiced:.1f} seconds" if voiced else ""


class FakeTTS:
    sample_rate = TTS_RATE

    def __init__(self):
        self.texts: list[str] = []

    def synthesize(self, text):
        self.texts.append(text)
        yield np.full(len(text.split()) * TTS_RATE // 10, 1000, np.int16)


class FakeJob:
    def __init__(self, backend, req):
        self.backend, self.req = backend, req
        self.cancelled = self.finished = False
        self.sent = 0  # words yielded: a second iteration (after a cancelled reader) goes on from there

    def cancel(self):  # like StreamJob: a finished job cannot be cancelled any more
        self.cancelled = self.cancelled or not self.finished

    async def __aiter__(self):
        words = self.backend.reply.split(" ")
        while self.sent < len(words):
            await self.backend.clock.sleep(TOKEN_S)
            text = " ".join(words[: self.sent])
            if self.cancelled:
                self.finished = True
                yield Result(text, "cancelled", completion_tokens=self.sent)
                return
            self.sent += 1
            yield words[0] if self.sent == 1 else " " + words[self.sent - 1]
        text = " ".join(words)
        self.finished = True
        yield Result(text, "stop", prompt_tokens=10, completion_tokens=len(words), ttft_ms=50.0,
                     total_ms=50.0 * len(words), spec={"method": self.req.method or "ar", "tau": 2.0})


class FakeBackend:
    name, model_id, default_method = "fake", "fake", "ar"

    def __init__(self, clock, reply=REPLY):
        self.clock, self.reply = clock, reply
        self.jobs: list[FakeJob] = []
        self.refuse: RequestError | None = None

    async def submit(self, req):
        if self.refuse:
            raise self.refuse
        self.jobs.append(FakeJob(self, req))
        return self.jobs[-1]


class Sink:
    def __init__(self, clock):
        self.clock = clock
        self.events: list[dict] = []
        self.audio_at: list[tuple[float, int]] = []  # (time, samples) of each frame

    def event(self, msg):
        self.events.append(msg)

    def audio(self, data):
        self.audio_at.append((self.clock.now(), len(data) // 2))

    def of(self, type_, **match):
        return [e for e in self.events if e["type"] == type_ and all(e.get(k) == v for k, v in match.items())]

    def states(self):
        return [e["state"] for e in self.of("state")]


async def inline(fn, *args):
    return fn(*args)


class Rig:
    def __init__(self, **cfg):
        self.cfg = VoiceConfig(**{"max_session_idle_s": 600, **cfg})
        self.clock = FakeClock()
        self.sink = Sink(self.clock)
        self.backend = FakeBackend(self.clock)
        self.asr, self.tts = FakeASR(), FakeTTS()
        self.vad = FakeVAD(min(self.cfg.early_turn_ms, self.cfg.silence_ms) / 1000)
        self.s = VoiceSession(self.backend, self.cfg, self.sink, vad=self.vad, asr=self.asr, tts=self.tts,
                              clock=self.clock, offload=self.offload)

    async def offload(self, fn, *args):
        if fn == self.asr.transcribe and self.asr.gate is not None:
            await self.asr.gate.wait()
        return fn(*args)

    async def audio(self, seconds: float, speech: bool):
        n = round(seconds / FRAME)
        for _ in range(n):  # a frame arrives when its last sample has been recorded
            await self.clock.advance(FRAME)
            await self.s.feed(np.full(int(SAMPLE_RATE * FRAME), 0.5 if speech else 0.0, np.float32))

    async def speak(self, seconds: float):
        await self.audio(seconds, True)

    async def silence(self, seconds: float):
        await self.audio(seconds, False)

    async def until(self, type_, timeout=20.0, **match):
        """Stream silence (real-time) until an event of that type (and fields) arrives."""
        t_end = self.clock.now() + timeout
        while not self.sink.of(type_, **match):
            assert self.clock.now() < t_end, f"no {type_} {match} in {timeout} s: {self.sink.events}"
            await self.silence(FRAME)
        return self.sink.of(type_, **match)[-1]


def run(coro):
    asyncio.run(coro)


def test_a_spoken_turn_walks_through_every_state():
    async def main():
        r = Rig()
        assert r.s.state is State.LISTENING
        await r.speak(1.0)
        assert r.s.state is State.USER_SPEAKING
        done = await r.until("turn_done")
        assert r.sink.states() == ["user_speaking", "thinking", "speaking", "listening"]
        assert done["outcome"] == "done" and done["transcript"] == "words for 1.0 seconds"
        assert done["reply"] == REPLY and done["heard"] == REPLY
        assert "".join(e["text"] for e in r.sink.of("reply_delta")) == REPLY
        # one audio_start/audio_end pair per sentence, spoken in order
        assert [e["text"] for e in r.sink.of("audio_start")] == ["Paris is the capital.", "It is big.", "It has a tower."]
        assert [e["interrupted"] for e in r.sink.of("audio_end")] == [False] * 3
        assert r.tts.texts == ["Paris is the capital.", "It is big.", "It has a tower."]
        assert sum(n for _, n in r.sink.audio_at) == 11 * TTS_RATE // 10
        assert r.s.history == [{"role": "user", "content": "words for 1.0 seconds"},
                               {"role": "assistant", "content": REPLY}]
        # the system prompt asks for spoken answers; the request streams with the session's method
        job = r.backend.jobs[0]
        assert job.req.messages[0] == {"role": "system", "content": r.cfg.system_prompt}
        assert job.req.kind == "chat" and job.req.max_tokens == r.cfg.max_reply_tokens
        t = done["timings"]
        chain = t["transcript_ms"] + t["ttft_ms"] + t["first_sentence_ms"] + t["first_audio_ms"]
        assert t["voice_to_voice_ms"] == pytest.approx(chain, abs=0.5)
        # the turn was confirmed after silence_ms, and audio could not start before it
        assert t["voice_to_voice_ms"] >= r.cfg.silence_ms - 1
        assert t["endpoint_ms"] == pytest.approx(r.cfg.early_turn_ms, abs=FRAME * 1000 + 1)
        assert done["llm"]["tau"] == 2.0 and done["llm"]["tokens"] == len(REPLY.split())
        assert r.s.latency.summary()["voice_to_voice_ms"]["n"] == 1
        await r.s.close()
        end = r.sink.events[-1]
        assert end["type"] == "session_end" and end["reason"] == "end" and end["turns"] == 1
        assert end["latency"]["voice_to_voice_ms"]["p50"] == t["voice_to_voice_ms"]

    run(main())


def test_the_first_spoken_chunk_is_short():
    """The first chunk may end at a clause mark after first_clause_words; later ones need clause_words."""
    async def main():
        r = Rig()
        r.backend.reply = "Well, Paris is the capital, as you know, of the French republic today."
        await r.speak(1.0)
        await r.until("turn_done")
        assert [e["text"] for e in r.sink.of("audio_start")] == ["Well, Paris is the capital,",
                                                                 "as you know, of the French republic today."]
        # a first sentence without commas ends its first chunk before a conjunction; later ones do not
        r.backend.reply = "Water boils at 100 degrees Celsius and salt melts. It boils at 1413 degrees and more."
        await r.speak(1.0)
        await r.until("turn_done", turn=2)
        assert [e["text"] for e in r.sink.of("audio_start")][2:] == [
            "Water boils at 100 degrees Celsius", "and salt melts.", "It boils at 1413 degrees and more."]
        await r.s.close()

    run(main())


def test_early_start_overlaps_the_silence_wait():
    """ASR, LLM and TTS run during the silence wait, so audio starts right at confirmation."""
    async def main():
        r = Rig(early_turn_ms=100, silence_ms=600)
        await r.speak(1.0)
        await r.silence(0.5)  # early start at 0.1 s of silence; 4 tokens to the first sentence = 0.2 s
        assert not r.sink.of("transcript") and not r.sink.of("reply_delta")  # held until confirmed
        assert not r.sink.audio_at and r.backend.jobs and r.tts.texts
        done = await r.until("turn_done")
        first_audio = r.sink.audio_at[0][0]
        assert done["timings"]["voice_to_voice_ms"] == pytest.approx(600, abs=FRAME * 1000 + 1)
        assert first_audio == pytest.approx(1.0 + 0.6, abs=FRAME + 1e-6)
        await r.s.close()

    run(main())


def test_speech_resuming_during_the_silence_wait_continues_the_utterance():
    async def main():
        r = Rig()
        await r.speak(0.6)
        await r.silence(0.26)  # > early_turn_ms (early start); + MIN_SPEECH to detect the speech < silence_ms
        assert len(r.asr.calls) == 1 and len(r.backend.jobs) == 1
        await r.speak(0.6)
        assert r.backend.jobs[0].cancelled  # the early start's generation was dropped
        done = await r.until("turn_done")
        assert done["turn"] == 2 and len(r.sink.of("turn_done")) == 1
        assert done["transcript"] == "words for 1.2 seconds"  # both parts, one utterance
        assert len(r.sink.of("transcript")) == 1
        assert r.s.history[0] == {"role": "user", "content": "words for 1.2 seconds"}
        await r.s.close()

    run(main())


async def _speaking(r: Rig, extra: float = 0.3):
    """Start a reply and play `extra` seconds of it past the echo guard."""
    await r.speak(1.0)
    await r.until("audio_start")
    await r.silence(r.cfg.echo_guard_ms / 1000 + extra)
    assert r.s.state is State.SPEAKING


def _played_until(r: Rig) -> float:
    """When the simulated listener's buffer ran dry."""
    end = -1.0
    for t, n in r.sink.audio_at:
        end = max(end, t) + n / TTS_RATE
    return end


def test_barge_in_stops_audio_cancels_generation_and_keeps_the_heard_part():
    async def main():
        r = Rig()
        r.backend.reply = " ".join(["One two three four five."] * 12)  # still generating when cut off
        await _speaking(r)
        sent_before = len(r.sink.audio_at)
        t_speech = r.clock.now()
        await r.speak(MIN_SPEECH)  # the VAD reports speech: audio pauses at once
        assert r.sink.of("vad", event="speech_start")[-1]
        paused_at = len(r.sink.audio_at)
        await r.speak(0.6)  # past backchannel_max_s: barge-in
        assert len(r.sink.audio_at) == paused_at  # nothing was sent while the user spoke
        assert paused_at - sent_before <= 6  # only frames already due when the speech was detected
        # the listener's audio ran dry within the lead after the speech was detected
        assert _played_until(r) <= t_speech + MIN_SPEECH + r.cfg.audio_lead_ms / 1000 + 0.041
        done = r.sink.of("turn_done")[-1]
        assert done["outcome"] == "interrupted"
        assert r.sink.of("audio_end")[-1]["interrupted"] is True
        assert r.backend.jobs[0].cancelled and done["llm"]["finish_reason"] == "cancelled"
        heard = done["heard"].split()
        assert 0 < len(heard) < len(r.backend.reply.split()) and r.backend.reply.startswith(" ".join(heard))
        assert r.s.history[-1] == {"role": "assistant", "content": done["heard"]}
        assert r.s.state is State.USER_SPEAKING
        assert r.sink.states()[-3:] == ["thinking", "speaking", "user_speaking"]
        # the interrupting speech is the next turn, and its words follow the heard part in the history
        nxt = await r.until("turn_done", turn=done["turn"] + 1)
        assert nxt["transcript"].startswith("words for")
        assert [m["role"] for m in r.s.history] == ["user", "assistant", "user", "assistant"]
        await r.s.close()

    run(main())


def test_backchannel_pauses_then_resumes_without_losing_anything():
    async def main():
        r = Rig()
        await _speaking(r)
        await r.speak(0.3)  # "mhm": shorter than backchannel_max_s
        done = await r.until("turn_done")
        assert done["outcome"] == "done" and done["heard"] == REPLY
        assert sum(n for _, n in r.sink.audio_at) == 11 * TTS_RATE // 10  # every sample was sent
        assert not r.backend.jobs[0].cancelled and len(r.backend.jobs) == 1  # no new turn for "mhm"
        assert r.s.history[-1] == {"role": "assistant", "content": REPLY} and len(r.s.history) == 2
        assert r.s.state is State.LISTENING
        await r.s.close()

    run(main())


def test_echo_guard_ignores_speech_starting_with_our_audio():
    async def main():
        r = Rig(backchannel_max_s=0.3)
        await r.speak(1.0)
        await r.until("audio_start")
        n_vad = len(r.sink.of("vad"))
        await r.speak(0.5)  # starts inside the guard: our own voice, even though it is long
        assert len(r.sink.of("vad")) == n_vad
        done = await r.until("turn_done")
        assert done["outcome"] == "done" and r.s.state is State.LISTENING
        await r.s.close()

    run(main())


def test_speech_while_thinking_supersedes_and_keeps_the_words():
    async def main():
        r = Rig()
        r.backend.reply = "one two three four five six seven eight nine ten."  # no sentence for 0.5 s
        await r.speak(1.0)
        await r.silence(0.45)  # confirmed (0.4 s), still thinking
        assert r.s.state is State.THINKING
        await r.speak(0.5)
        first = r.sink.of("turn_done")[0]
        assert first["outcome"] == "superseded" and first["heard"] == ""
        assert r.backend.jobs[0].cancelled and not r.sink.audio_at
        done = await r.until("turn_done", turn=first["turn"] + 1)
        # one user message holding both utterances, then the answer to both
        assert r.s.history[0] == {"role": "user", "content": "words for 1.0 seconds words for 0.5 seconds"}
        assert r.backend.jobs[-1].req.messages[-1]["content"] == r.s.history[0]["content"]
        assert done["outcome"] == "done" and r.s.history[1]["role"] == "assistant"
        await r.s.close()

    run(main())


def test_superseded_during_a_slow_asr_still_keeps_its_words_in_order():
    async def main():
        r = Rig()
        r.asr.gate = asyncio.Event()
        await r.speak(1.0)
        await r.silence(0.45)  # confirmed; ASR still running
        await r.s.say("and in French?")
        assert not r.sink.of("turn_done")  # the first turn waits for its words
        r.asr.gate.set()
        await r.until("turn_done", turn=2)
        assert r.sink.of("turn_done")[0]["outcome"] == "superseded"
        assert r.s.history[0]["content"] == "words for 1.0 seconds and in French?"
        await r.s.close()

    run(main())


def test_typed_turn_interrupts_a_reply():
    async def main():
        r = Rig()
        await _speaking(r)
        await r.s.say("stop, tell me about Rome")
        await settle()
        old = r.sink.of("turn_done")[0]
        assert old["outcome"] == "interrupted" and r.s.history[1]["content"] == old["heard"]
        done = await r.until("turn_done", turn=old["turn"] + 1)
        assert done["transcript"] == "stop, tell me about Rome" and done["timings"]["voice_to_voice_ms"] is None
        await r.s.close()

    run(main())


def test_speech_without_words_is_no_turn_for_the_llm():
    async def main():
        r = Rig()
        r.asr.hears_nothing = True
        await r.speak(0.5)
        done = await r.until("turn_done")
        assert done["outcome"] == "no_speech" and not r.backend.jobs and not r.s.history
        assert r.sink.states() == ["user_speaking", "thinking", "listening"]
        await r.s.close()

    run(main())


def test_interrupt_message_and_refused_generation():
    async def main():
        r = Rig()
        await _speaking(r, extra=0.1)
        r.s.interrupt()
        await r.silence(0.1)
        assert r.sink.of("turn_done")[-1]["outcome"] == "interrupted" and r.s.state is State.LISTENING
        r.backend.refuse = RequestError("overloaded", "the server is busy", 429)
        await r.s.say("hello?")
        done = await r.until("turn_done", turn=2)
        assert done["outcome"] == "error"
        assert r.sink.of("error")[-1]["code"] == "overloaded" and r.s.state is State.LISTENING
        # the user's words are kept: the next turn answers them too
        r.backend.refuse = None
        await r.s.say("again")
        await r.until("turn_done", turn=3, outcome="done")
        assert r.s.history[-2]["content"].endswith("hello? again")
        await r.s.close()

    run(main())


def test_long_silence_keeps_no_audio_and_idle_sessions_close():
    async def main():
        r = Rig(max_session_idle_s=10)
        await r.silence(9.0)
        assert len(r.s._chunks) * FRAME <= 0.7  # only the onset window is kept
        assert not r.sink.events and not r.s.closed.is_set()
        await r.silence(6.0)
        assert r.s.closed.is_set() and r.s.close_reason == "idle"
        assert r.sink.of("error")[-1]["code"] == "idle_timeout"
        assert r.s.state is State.CLOSED

    run(main())


def test_speech_over_max_utterance_is_cut_into_turns():
    async def main():
        r = Rig(max_utterance_s=2.0)
        await r.speak(3.0)
        first = r.sink.of("turn_done")[0]
        assert first["outcome"] == "superseded" and first["transcript"].startswith("words for 2.")
        assert max(r.asr.calls) <= 2.0 + 0.2
        done = await r.until("turn_done", turn=2)
        assert done["outcome"] == "done"
        assert r.s.history[0]["content"].startswith("words for 2.") and "words for 1." in r.s.history[0]["content"]
        await r.s.close()

    run(main())


def test_close_cancels_the_reply_and_reports_the_turn():
    async def main():
        r = Rig()
        r.backend.reply = " ".join(["One two three four five."] * 12)
        await _speaking(r)
        await r.s.close()
        assert r.backend.jobs[0].cancelled
        assert r.sink.of("turn_done")[-1]["outcome"] == "cancelled" and r.s.state is State.CLOSED
        n = len(r.sink.events)
        await r.speak(1.0)  # a closed session ignores input
        assert len(r.sink.events) == n

    run(main())


def test_playout_paces_and_client_acks_override_the_estimate():
    async def main():
        clock = FakeClock()
        sink = Sink(clock)
        p = Playout(clock, sink, TTS_RATE, lead_s=0.1)
        task = asyncio.create_task(p.send(np.zeros(TTS_RATE, np.int16)))  # 1 s of audio
        await clock.advance(0.5)
        # sent = what was played + at most the lead (+ one frame)
        assert 0.5 <= p.sent / TTS_RATE <= 0.5 + 0.1 + 0.04 + 1e-9
        assert p.played_s() == pytest.approx(0.5, abs=1e-6)
        p.acked_s = 0.3
        assert p.played_s() == 0.3
        await clock.advance(1.0)
        await task
        assert p.sent == TTS_RATE

    run(main())
