"""One turn's reply, from the LLM's stream to the listener: deltas -> chunks -> TTS -> paced audio.

Three tasks joined by queues, so a chunk is synthesized while the one before it plays:

    generate    the backend job's deltas -> `reply_delta` events; the chunker cuts them into chunks
    synthesize  chunk -> speakable text -> TTS audio (ahead of playout by a bounded queue)
    play        waits for the turn to be confirmed, then audio_start / paced frames / audio_end

`speak` runs them; cancelling it cancels all three. What the turn needs afterwards (reply text,
chunks with their audio offsets, the playout, the job and its Result) is left on the `Turn`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.backend import Backend, GenRequest, Job, RequestError, Result

from .config import VoiceConfig
from .metrics import TurnClock
from .parts import TTS
from .playout import Clock, Playout, Sentence, Sink, heard_text
from .speech_text import to_speech

log = logging.getLogger("domino.voice")

TTS_AHEAD = 32  # audio chunks TTS may run ahead of playout
RESULT_WAIT_S = 5.0  # a cancelled generation ends at the engine's next round; never wait longer than this
Offload = Callable[..., Awaitable[Any]]  # offload(fn, *args) runs blocking model work off the event loop


@dataclass(eq=False)
class Turn:
    id: int
    audio: np.ndarray | None = None  # the utterance (None: a typed turn)
    text: str | None = None  # a typed turn's text
    clock: TurnClock = field(default_factory=TurnClock)
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    held: list[dict] = field(default_factory=list)  # events from before the turn was confirmed
    task: asyncio.Task | None = None
    prev: asyncio.Task | None = None  # the turn before: its user message goes into the history first
    asr: asyncio.Future | None = None
    transcript: str | None = None
    ready: bool = False  # transcript known and the turn before settled: its words may enter the history
    user_added: bool = False
    job: Job | None = None
    result: Result | None = None
    reply: str = ""
    sentences: list[Sentence] = field(default_factory=list)
    playout: Playout | None = None
    open_sentence: Sentence | None = None  # audio_start sent, audio_end not yet
    outcome: str | None = None  # why it ended early: interrupted | superseded | cancelled | discarded
    error: dict | None = None

    def heard(self) -> str:
        """What the user heard of the reply: all of it, unless the turn was cut short."""
        if self.outcome is None and self.error is None:
            return self.reply.strip()
        return heard_text(self.sentences, self.playout)


@dataclass
class Voice:
    """What a reply needs from its session (taken when the reply starts: a `config` applies to the next)."""

    backend: Backend
    cfg: VoiceConfig
    tts: TTS
    sink: Sink
    clock: Clock
    offload: Offload
    method: str | None
    name: str
    emit: Callable[[Turn, dict], None]  # held back until the turn is confirmed
    on_audio: Callable[[], None]  # a frame is about to play (the session goes thinking -> speaking)


async def speak(v: Voice, turn: Turn, messages: list[dict]) -> None:
    texts: asyncio.Queue = asyncio.Queue()
    audio: asyncio.Queue = asyncio.Queue(maxsize=TTS_AHEAD)
    workers = [asyncio.create_task(_generate(v, turn, messages, texts)),
               asyncio.create_task(_synthesize(v, turn, texts, audio))]
    try:
        await _play(v, turn, audio)
        for w in workers:
            await w
    finally:
        for w in workers:
            w.cancel()


async def _generate(v: Voice, turn: Turn, messages: list[dict], texts: asyncio.Queue) -> None:
    req = GenRequest(kind="chat", messages=messages, max_tokens=v.cfg.max_reply_tokens, method=v.method,
                     tag=f"{v.name} turn {turn.id}", priority="voice")
    chunker = v.cfg.first_chunker()
    try:
        turn.job = await v.backend.submit(req)
        async for ev in turn.job:
            if isinstance(ev, Result):
                turn.result = ev
                if ev.finish_reason == "error":
                    turn.error = {"code": "internal", "message": ev.error or "generation failed"}
                break
            turn.clock.mark("first_token", v.clock.now())
            turn.reply += ev
            v.emit(turn, {"type": "reply_delta", "turn": turn.id, "text": ev})
            for chunk in chunker.feed(ev):
                turn.clock.mark("first_sentence", v.clock.now())
                # later chunks play while the next is made: whole clauses, for prosody
                chunker.clause_words, chunker.phrase_chars = v.cfg.clause_words, None
                texts.put_nowait(chunk)
        for chunk in chunker.flush():
            turn.clock.mark("first_sentence", v.clock.now())
            texts.put_nowait(chunk)
    except RequestError as e:  # overloaded, unavailable, prompt too long: said to the client, session goes on
        turn.error = {"code": e.code, "message": e.message}
    finally:
        if turn.job is not None:
            turn.job.cancel()  # no-op once finished
        texts.put_nowait(None)


async def _synthesize(v: Voice, turn: Turn, texts: asyncio.Queue, audio: asyncio.Queue) -> None:
    n = 0
    while (text := await texts.get()) is not None:
        n += 1
        sentence = Sentence(n, text)
        speech = to_speech(text)
        if speech:
            chunks = await v.offload(lambda: iter(v.tts.synthesize(speech)))
            while (chunk := await v.offload(next, chunks, None)) is not None:
                turn.clock.mark("first_chunk", v.clock.now())
                await audio.put((sentence, chunk))
        await audio.put((sentence, None))
    await audio.put(None)


async def _play(v: Voice, turn: Turn, audio: asyncio.Queue) -> None:
    await turn.committed.wait()
    rate = v.tts.sample_rate
    p = turn.playout = Playout(v.clock, v.sink, rate, v.cfg.audio_lead_ms / 1000)
    while (item := await audio.get()) is not None:
        sentence, chunk = item
        if sentence not in turn.sentences:
            sentence.start = p.sent
            turn.sentences.append(sentence)
        if chunk is None:
            if turn.open_sentence is sentence:
                audio_end(v.sink, turn, interrupted=False)
            continue
        if turn.open_sentence is None:
            turn.open_sentence = sentence
            v.sink.event({"type": "audio_start", "turn": turn.id, "sentence": sentence.id, "sample_rate": rate,
                          "text": sentence.text})
        v.on_audio()
        turn.clock.mark("first_audio", v.clock.now())
        sentence.samples += len(chunk)  # before sending: a half-sent chunk is heard pro rata
        await p.send(chunk)
    await p.drain()


def audio_end(sink: Sink, turn: Turn, interrupted: bool) -> None:
    s, turn.open_sentence = turn.open_sentence, None
    sink.event({"type": "audio_end", "turn": turn.id, "sentence": s.id, "interrupted": interrupted})


async def final_result(job: Job, name: str) -> Result | None:
    """A cancelled job's last event (it comes after the engine's current round)."""
    try:
        async with asyncio.timeout(RESULT_WAIT_S):
            async for ev in job:
                if isinstance(ev, Result):
                    return ev
    except TimeoutError:
        log.warning("%s: a cancelled generation did not end within %g s", name, RESULT_WAIT_S)
    return None
