"""One voice conversation: the turn-taking state machine, independent of any transport.

    listening -> user_speaking -> thinking -> speaking -> listening

Audio comes in through `feed` (float32 mono, 16 kHz, real time), typed turns through `say`; events
(dicts) and reply audio (PCM16 bytes) go out through a `Sink`. The rules, all in this module:

* End of turn, early start: the VAD closes a speech segment after `early_turn_ms` of silence and
  the turn starts at once (ASR, then the LLM and TTS), but it is only confirmed after `silence_ms`:
  until then its events are held back and no audio plays, and speech that resumes discards it (the
  utterance simply continues). The silence wait thus overlaps ASR, prefill and the first sentence.
* Barge-in: speech while the reply plays pauses the audio at once (nothing more is sent, and the
  listener holds at most `audio_lead_ms`). If it lasts `backchannel_max_s`, the turn is interrupted:
  generation and queued TTS are cancelled and the history keeps only the part that was heard. If
  it ends sooner ("mhm", "yeah") it was a backchannel and the reply resumes where it paused.
* Echo guard: speech that starts within `echo_guard_ms` of the reply's first audio is our own
  voice coming back through the microphone before the client's echo canceller has adapted; the
  whole segment is ignored. (Later gaps in the reply do not re-arm it: the echo path is the same.)
* Supersede: speech while the assistant is still thinking cancels that reply; the user's words are
  kept (a pending user message) and the next turn answers both.
* What was heard: audio is paced in real time, `audio_lead_ms` ahead of the listener, so the
  server knows the play position; a client that plays with more buffering reports it with
  `playback` acks, and then its last ack is what counts.
* Every confirmed turn ends with exactly one `turn_done`; the session ends with `session_end` (its
  p50/p95 per stage); an idle session closes itself.

The reply itself (LLM -> chunks -> TTS -> paced audio) is `reply.speak`; this module decides when
turns start, end and give way. Clock and offloading are injected (`Clock`, `offload`), so unit
tests run on fake time and fake parts.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

import numpy as np

from app.backend import Backend, GenRequest, RequestError, Result

from .config import VoiceConfig
from .metrics import LatencySummary, llm_stats
from .parts import ASR, SAMPLE_RATE, TTS, VAD, get_asr, get_tts, get_vad
from .playout import Clock, RealClock, Sink
from .reply import Offload, Turn, Voice, audio_end, final_result, speak

log = logging.getLogger("domino.voice")

# Audio handed to ASR starts ONSET_S before the VAD's speech start: soft onsets ("wh", "h", "f")
# score below the VAD threshold, and Whisper drops a word it hears only half of. Listening keeps
# that much plus the VAD's own detection delay (min_speech_ms), so the onset is still there.
ONSET_S = 0.3
PAD_S = 0.1  # after the end of speech
HISTORY_CHARS = 6000  # conversation kept in the prompt (about 1,500 tokens)
PARTIAL_EVERY_S = 1.0  # a partial transcript per this much new speech (when the client asked for them)


def load_parts(cfg: VoiceConfig, progress: bool = False) -> tuple[VAD, ASR, TTS]:
    """A session's parts (blocking: models load and warm up once per process).

    The VAD closes a segment after `early_turn_ms` of silence: the session, not the VAD, waits for
    `silence_ms` before it confirms the turn.
    """
    from .models import prepare

    prepare(cfg, progress=progress)
    vad = get_vad(cfg.vad, **{**cfg.vad_options(), "silence_ms": min(cfg.early_turn_ms, cfg.silence_ms)})
    return vad, get_asr(cfg.asr), get_tts(cfg.tts, **cfg.tts_options())


class State(str, enum.Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"
    CLOSED = "closed"


class VoiceSession:
    def __init__(self, backend: Backend, cfg: VoiceConfig, sink: Sink, *, vad: VAD, asr: ASR, tts: TTS,
                 method: str | None = None, clock: Clock | None = None, offload: Offload | None = None,
                 on_turn: Callable[[dict], None] | None = None, on_result: Callable[[Result], None] | None = None,
                 name: str = "voice"):
        self.backend, self.cfg, self.sink = backend, cfg, sink
        self.vad, self.asr, self.tts = vad, asr, tts
        self.method = method
        self.partials = False
        self.clock = clock or RealClock()
        self.offload = offload or asyncio.to_thread
        self.on_turn, self.on_result = on_turn, on_result  # every turn_done; every generation's Result
        self.name = name
        self.state = State.LISTENING
        self.history: list[dict] = []  # chat messages, without the system prompt
        self.latency = LatencySummary()
        self.turn: Turn | None = None
        self._turns = 0
        self._last_task: asyncio.Task | None = None
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        # input stream, in stream seconds at 16 kHz
        self.stream_s = 0.0
        self._chunks: list[np.ndarray] = []
        self._buf_start = 0.0  # stream time of the first kept sample
        self.in_speech = False
        self._seg_start = 0.0  # where the current speech segment began
        self._seg_ignored = False  # the segment started inside the echo guard
        self._over_reply = False  # the segment started while the reply played (barge-in or backchannel)
        self._utt_start: float | None = None  # where the utterance being recorded began
        self._partial: asyncio.Task | None = None
        self._partial_at = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._settling: set[asyncio.Task] = set()
        self.last_activity = self.clock.now()
        self._idle = asyncio.create_task(self._watch_idle())

    # ---- inputs ------------------------------------------------------------------------------
    async def feed(self, pcm: np.ndarray) -> None:
        """float32 mono 16 kHz samples, in order, as they arrive."""
        if self.state is State.CLOSED or not len(pcm):
            return
        self._chunks.append(pcm)
        self.stream_s += len(pcm) / SAMPLE_RATE
        now = self.clock.now()
        for ev in self.vad.feed(pcm):
            wall = now - (self.stream_s - ev.at_s)  # when that point of the stream arrived
            if ev.kind == "speech_start":
                self._speech_start(ev.at_s, wall)
            else:
                self._speech_end(ev.at_s, wall)
        if self.in_speech and not self._seg_ignored:
            heard = self.stream_s - self._seg_start
            if self._over_reply and self.state is State.SPEAKING and heard >= self.cfg.backchannel_max_s:
                self._barge_in()
            elif (self.state is State.USER_SPEAKING and self._utt_start is not None
                  and self.stream_s - self._utt_start >= self.cfg.max_utterance_s):
                self._cut_utterance()
            elif self.partials and self.state is State.USER_SPEAKING:
                self._maybe_partial()
        self._trim()

    async def say(self, text: str) -> None:
        """A typed turn: answered like a spoken one (it supersedes or interrupts the current reply)."""
        if self.state is State.CLOSED:
            return
        self.last_activity = self.clock.now()
        if self.turn is not None and not self.turn.committed.is_set():
            self._commit(self.turn)  # speech that came first is kept as a user message
        self._stop_turn("interrupted" if self.state is State.SPEAKING else "superseded")
        turn = self._new_turn(text=text)
        turn.clock.mark("transcript", self.clock.now())
        self._commit(turn)

    def interrupt(self) -> None:
        """The client stops the reply (a stop button): like a barge-in, without the speech."""
        if self.turn is not None and self.turn.committed.is_set():
            self._stop_turn("interrupted" if self.state is State.SPEAKING else "superseded")
            self._set_state(State.USER_SPEAKING if self.in_speech else State.LISTENING)

    def playback(self, turn_id: int, played_ms: float) -> None:
        """The client's play position in a turn's reply audio; it overrides the paced estimate."""
        t = self.turn
        if t is not None and t.id == turn_id and t.playout is not None:
            t.playout.acked_s = max(0.0, played_ms / 1000)

    async def close(self, reason: str = "end") -> None:
        if self.state is State.CLOSED:
            return
        self.close_reason = reason
        self._stop_turn("cancelled")
        self.state = State.CLOSED
        for t in (self._idle, self._partial):
            if t is not None:
                t.cancel()
        if self._settling:  # every turn's turn_done and history entry come before we report closed
            await asyncio.wait(set(self._settling))
        self.sink.event({"type": "session_end", "reason": reason, "turns": len(self.latency.turns),
                         "latency": self.latency.summary()})
        self.closed.set()

    async def warm_up(self) -> None:
        """Prefill the system prompt once, so the first turn finds it in the engine's prefix cache."""
        req = GenRequest(kind="chat", messages=self.messages() + [{"role": "user", "content": "Hello."}],
                         max_tokens=1, method=self.method, tag=f"{self.name} warm-up", priority="voice")
        try:
            async for ev in await self.backend.submit(req):
                if isinstance(ev, Result):
                    break
        except RequestError as e:  # overloaded or loading: the first turn will say so
            log.info("%s warm-up skipped: %s", self.name, e.message)

    # ---- speech events -----------------------------------------------------------------------
    def _speech_start(self, at: float, wall: float) -> None:
        turn = self.turn
        p = turn.playout if turn is not None else None
        if (self.state is State.SPEAKING and p is not None and p.started_at is not None
                and p.started_at <= wall < p.started_at + self.cfg.echo_guard_ms / 1000):
            self._seg_ignored = True
            return
        self.in_speech, self._seg_start, self._seg_ignored = True, at, False
        self._over_reply = self.state is State.SPEAKING and p is not None
        self.last_activity = self.clock.now()
        self.sink.event({"type": "vad", "event": "speech_start", "at_ms": round(at * 1000)})
        if turn is not None and not turn.committed.is_set():
            self._stop_turn("discarded")  # the user went on talking: the utterance continues
            return
        self._utt_start = at
        if self._over_reply:
            p.running.clear()  # a barge-in or a backchannel: feed() and _speech_end decide
            return
        if self.state is State.THINKING:
            self._stop_turn("superseded")
        self._set_state(State.USER_SPEAKING)

    def _speech_end(self, at: float, wall: float) -> None:
        if self._seg_ignored:
            self._seg_ignored = False
            return
        self.in_speech = False
        self.sink.event({"type": "vad", "event": "speech_end", "at_ms": round(at * 1000)})
        if self._over_reply:
            self._over_reply = False
            if at - self._seg_start < self.cfg.backchannel_max_s:  # "mhm": not a turn, the reply goes on
                self._utt_start = None
                if self.turn is not None and self.turn.playout is not None:
                    self.turn.playout.running.set()
                if self.state is State.USER_SPEAKING:  # the reply ended meanwhile
                    self._set_state(State.LISTENING)
                return
            if self.state is State.SPEAKING:  # long enough, and ended within one batch of audio
                self._barge_in()
        if self.state is not State.USER_SPEAKING or self._utt_start is None:
            return
        turn = self._new_turn(audio=self._audio(self._utt_start - ONSET_S, at + PAD_S))
        turn.clock.mark("speech_end", wall)
        turn.clock.mark("turn_detected", self.clock.now())
        confirm_in = wall + self.cfg.silence_ms / 1000 - self.clock.now()
        self._spawn(self._confirm(turn, confirm_in))

    def _barge_in(self) -> None:
        self._stop_turn("interrupted")
        self._set_state(State.USER_SPEAKING)

    async def _confirm(self, turn: Turn, delay: float) -> None:
        await self.clock.sleep(delay)
        if self.turn is turn and not turn.committed.is_set() and not self.in_speech:
            self._utt_start = None
            self._commit(turn)

    def _cut_utterance(self) -> None:
        """Speech over max_utterance_s: what was said so far becomes a user message, the rest goes on."""
        turn = self._new_turn(audio=self._audio(self._utt_start - ONSET_S, self.stream_s))
        self._commit(turn)
        self._stop_turn("superseded")  # keeps the words, answers nothing yet
        self._utt_start = self.stream_s
        self._set_state(State.USER_SPEAKING)

    # ---- turns -------------------------------------------------------------------------------
    def _new_turn(self, **kw) -> Turn:
        self._stop_turn("superseded")  # one current turn at a time
        self._turns += 1
        turn = Turn(self._turns, prev=self._last_task, **kw)
        if turn.audio is not None:  # ASR starts now, and is never cancelled: superseding keeps the words
            turn.asr = asyncio.ensure_future(self.offload(self.asr.transcribe, turn.audio))
        self.turn = turn
        turn.task = asyncio.create_task(self._run(turn))
        # A separate task settles the turn: `_run` may be cancelled before it ever starts.
        self._last_task = self._spawn(self._supervise(turn))
        self._settling.add(self._last_task)
        self._last_task.add_done_callback(self._settling.discard)
        return turn

    async def _supervise(self, turn: Turn) -> None:
        await asyncio.wait({turn.task})
        if turn.prev is not None:  # user messages enter the history in the order they were spoken
            await asyncio.wait({turn.prev})
        await self._settle(turn)

    def _commit(self, turn: Turn) -> None:
        turn.committed.set()
        if turn.ready:
            self._add_user(turn)
        for msg in turn.held:
            self.sink.event(msg)
        turn.held.clear()
        self.last_activity = self.clock.now()
        self._set_state(State.THINKING)

    def _voice(self) -> Voice:
        return Voice(self.backend, self.cfg, self.tts, self.sink, self.clock, self.offload, self.method, self.name,
                     emit=self._emit, on_audio=self._speaking)

    def _speaking(self) -> None:
        if self.state is State.THINKING:
            self._set_state(State.SPEAKING)

    def _emit(self, turn: Turn, msg: dict) -> None:
        if turn.committed.is_set():
            self.sink.event(msg)
        else:
            turn.held.append(msg)

    def _stop_turn(self, outcome: str) -> None:
        turn = self.turn
        if turn is None:
            return
        self.turn = None
        turn.outcome = outcome
        if turn.playout is not None:
            turn.playout.running.set()
        turn.task.cancel()

    async def _run(self, turn: Turn) -> None:
        """ASR -> LLM / TTS / playout, cancelled when the turn is stopped.

        It runs ahead of confirmation: an early-started turn transcribes, prefills and synthesizes
        its first sentence while the silence is still being confirmed; only its output waits.
        """
        try:
            if turn.asr is not None:
                await self._transcript(turn)
            if turn.prev is not None:
                await asyncio.wait({turn.prev})
            turn.ready = True
            if turn.committed.is_set():
                self._add_user(turn)
            messages = self._messages_for(turn)
            if messages[-1]["role"] == "user":
                await speak(self._voice(), turn, messages)
        except Exception as e:  # noqa: BLE001 - a part failed: this turn ends with an error, the session goes on
            log.exception("%s turn %d failed", self.name, turn.id)
            turn.error = {"code": "internal", "message": f"{type(e).__name__}: {e}"}
        await turn.committed.wait()  # an early start reports nothing (not even an error) unless confirmed

    async def _transcript(self, turn: Turn) -> None:
        turn.transcript = (await asyncio.shield(turn.asr)).strip()
        turn.clock.mark("transcript", self.clock.now())
        self._emit(turn, {"type": "transcript", "turn": turn.id, "text": turn.transcript, "final": True})

    def _user_text(self, turn: Turn) -> str:
        return turn.text if turn.text is not None else (turn.transcript or "")

    def _add_user(self, turn: Turn) -> None:
        """Put the turn's words into the history (once; only for confirmed turns, in spoken order)."""
        text = self._user_text(turn)
        if turn.user_added or not text:
            return
        turn.user_added = True
        turn.transcript = text
        if self.history and self.history[-1]["role"] == "user":  # a superseded turn's words come first
            self.history[-1]["content"] += " " + text
        else:
            self.history.append({"role": "user", "content": text})

    def _messages_for(self, turn: Turn) -> list[dict]:
        """The prompt: the history plus this turn's words, also before they are in the history."""
        msgs = [dict(m) for m in self.messages()]
        text = self._user_text(turn)
        if text and not turn.user_added:
            if msgs[-1]["role"] == "user":
                msgs[-1]["content"] += " " + text
            else:
                msgs.append({"role": "user", "content": text})
        return msgs

    async def _settle(self, turn: Turn) -> None:
        """Once per turn, however it ended: history, audio_end, turn_done, metrics, next state."""
        if turn.job is not None and turn.result is None:  # stopped mid-generation: its Result is still due
            turn.job.cancel()
            turn.result = await final_result(turn.job, self.name)
        if turn.result is not None and self.on_result is not None:
            self.on_result(turn.result)
        if not turn.committed.is_set():  # discarded early start: it never happened for the client
            return
        if turn.asr is not None and turn.transcript is None:  # superseded during ASR: keep the words
            try:
                await self._transcript(turn)
            except Exception:  # noqa: BLE001 - the failure was reported by _run
                turn.transcript = ""
        self._add_user(turn)
        if turn.open_sentence is not None:
            audio_end(self.sink, turn, interrupted=True)
        heard = turn.heard()
        if heard:
            self.history.append({"role": "assistant", "content": heard})
        outcome = turn.outcome or ("error" if turn.error else "done" if turn.reply or turn.transcript else "no_speech")
        if turn.error:
            self.sink.event({"type": "error", "turn": turn.id, **turn.error})
        stages = turn.clock.stages()
        if turn.clock.first_audio is not None:
            self.latency.add(stages)
        done = {"type": "turn_done", "turn": turn.id, "outcome": outcome, "transcript": turn.transcript or "",
                "reply": turn.reply, "heard": heard, "timings": stages,
                "llm": llm_stats(turn.result) if turn.result is not None else None}
        self.sink.event(done)
        if self.on_turn is not None:
            self.on_turn(done)
        log.info("%s turn %d %s: v2v %s ms", self.name, turn.id, outcome, stages["voice_to_voice_ms"])
        self.last_activity = self.clock.now()
        if self.turn is None and self.state in (State.THINKING, State.SPEAKING):
            self._set_state(State.USER_SPEAKING if self.in_speech else State.LISTENING)
        elif self.turn is turn:
            self.turn = None
            self._set_state(State.USER_SPEAKING if self.in_speech else State.LISTENING)

    def messages(self) -> list[dict]:
        """The system prompt and the most recent history within HISTORY_CHARS (older turns drop out
        whole, so the prompt, and the prefill on the voice-to-voice path, stays bounded)."""
        keep = max(0, len(self.history) - 1)  # the newest message always stays
        chars = len(self.history[keep]["content"]) if self.history else 0
        while keep > 0 and chars + len(self.history[keep - 1]["content"]) <= HISTORY_CHARS:
            keep -= 1
            chars += len(self.history[keep]["content"])
        while keep < len(self.history) and self.history[keep]["role"] != "user":
            keep += 1  # start on a user message
        return [{"role": "system", "content": self.cfg.system_prompt}, *self.history[keep:]]

    # ---- state, audio buffer, partials, idle ---------------------------------------------------
    def _set_state(self, state: State) -> None:
        if self.state is not state and self.state is not State.CLOSED:
            self.state = state
            self.sink.event({"type": "state", "state": state.value})

    def _audio(self, a: float, b: float) -> np.ndarray:
        buf = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        i = max(0, round((a - self._buf_start) * SAMPLE_RATE))
        return buf[i : max(i, round((b - self._buf_start) * SAMPLE_RATE))]

    def _trim(self) -> None:
        """Keep the utterance being recorded, or a pre-roll of recent audio: silence never piles up."""
        keep = (self.stream_s - ONSET_S - self.cfg.min_speech_ms / 1000 - 0.1 if self._utt_start is None
                else self._utt_start - ONSET_S)
        while self._chunks and self._buf_start + len(self._chunks[0]) / SAMPLE_RATE < keep:
            self._buf_start += len(self._chunks.pop(0)) / SAMPLE_RATE

    def _maybe_partial(self) -> None:
        if self._partial is not None and not self._partial.done():
            return
        if self.stream_s - max(self._partial_at, self._utt_start) < PARTIAL_EVERY_S:
            return
        self._partial_at = self.stream_s
        self._partial = self._spawn(self._send_partial(self._audio(self._utt_start - ONSET_S, self.stream_s)))

    async def _send_partial(self, pcm: np.ndarray) -> None:
        text = (await self.offload(self.asr.transcribe, pcm)).strip()
        if text and self.state is State.USER_SPEAKING:
            self.sink.event({"type": "transcript", "turn": self._turns + 1, "text": text, "final": False})

    async def _watch_idle(self) -> None:
        idle = self.cfg.max_session_idle_s
        while True:
            await self.clock.sleep(min(idle, 5.0))
            if (self.state is State.LISTENING and not self.in_speech
                    and self.clock.now() - self.last_activity >= idle):
                self.sink.event({"type": "error", "code": "idle_timeout",
                                 "message": f"no speech or text for {idle:g} s; the session is closed"})
                self._spawn(self.close("idle"))
                return

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # a reference, so the loop cannot drop it half-way
        task.add_done_callback(self._tasks.discard)
        return task
