"""Reply audio in real time: the paced sender, what the listener has heard, and the clock both use.

A voice reply is sent as the listener plays it, `lead_s` ahead, never all at once: a barge-in can
then silence it within about `lead_s`, and the server can tell which words were heard without any
help from the client. The listener is modelled as a player that starts each frame when it arrives
or when the frame before it ends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

FRAME_S = 0.04  # reply audio goes out in frames this long: pausing is at most one frame late


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class Sink(Protocol):
    """Where a session's output goes; both calls must not block (the transport queues them)."""

    def event(self, msg: dict) -> None: ...

    def audio(self, pcm16: bytes) -> None: ...


@dataclass(eq=False)
class Sentence:
    id: int
    text: str  # the reply text of this chunk (what the history keeps)
    start: int = 0  # offset of its audio in the reply's audio, in samples
    samples: int = 0


class Playout:
    """Sends one reply's audio `lead_s` ahead of the listener; `play_end` is when its buffer runs dry."""

    def __init__(self, clock: Clock, sink: Sink, rate: int, lead_s: float):
        self.clock, self.sink, self.rate, self.lead_s = clock, sink, rate, lead_s
        self.sent = 0  # samples handed to the sink
        self.play_end = -1.0
        self.started_at: float | None = None  # when the first frame went out
        self.acked_s: float | None = None  # the client's own report of what it played
        self.running = asyncio.Event()  # cleared while paused for a possible barge-in
        self.running.set()

    def played_s(self) -> float:
        if self.acked_s is not None:
            return min(self.acked_s, self.sent / self.rate)
        return max(0.0, self.sent / self.rate - max(0.0, self.play_end - self.clock.now()))

    async def send(self, pcm: np.ndarray) -> None:
        step = max(1, int(self.rate * FRAME_S))
        for i in range(0, len(pcm), step):
            frame = pcm[i : i + step]
            while True:
                await self.running.wait()
                wait = self.play_end - self.lead_s - self.clock.now()
                if wait <= 0:
                    break
                await self.clock.sleep(wait)
            now = self.clock.now()
            if self.play_end <= now:  # the listener's buffer ran dry (or this is the first frame)
                self.play_end = now
                self.started_at = now if self.started_at is None else self.started_at
            self.play_end += len(frame) / self.rate
            self.sent += len(frame)
            self.sink.audio(frame.astype("<i2").tobytes())

    async def drain(self) -> None:
        """Until the listener has played everything sent."""
        while (wait := self.play_end - self.clock.now()) > 0:
            await self.clock.sleep(wait)


def heard_text(sentences: list[Sentence], playout: Playout | None) -> str:
    """The reply text up to the play position; a partly played chunk contributes its words pro rata."""
    if playout is None:
        return ""
    played = round(playout.played_s() * playout.rate)
    parts = []
    for s in sentences:
        if played >= s.start + s.samples:
            parts.append(s.text)
            continue
        if played > s.start:
            words = s.text.split()
            parts.append(" ".join(words[: int(len(words) * (played - s.start) / s.samples)]))
        break
    return " ".join(p for p in parts if p)
