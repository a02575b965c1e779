"""Per-turn latency of the voice agent, and its p50/p95 over a session (or a benchmark).

A spoken turn is a chain of instants on one clock; each stage is the gap between two neighbours,
so the four headline stages add up to voice-to-voice exactly:

    speech_end --transcript_ms--> transcript --ttft_ms--> first_token
               --first_sentence_ms--> first_sentence --first_audio_ms--> first_audio

`speech_end` is where the user's speech stopped in the audio (not where the silence wait ended),
so the end-of-turn wait is inside `transcript_ms`; `endpoint_ms` (the part of it spent waiting for
silence) and `asr_ms` split it. `first_audio_ms` likewise holds `tts_ms` (synthesis of the first
chunk) plus any wait for the turn to be confirmed. Typed turns have no speech_end: their chain
starts at the transcript and voice-to-voice is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# (name, from instant, to instant): the order of the chain and of every table
STAGES = (
    ("transcript_ms", "speech_end", "transcript"),
    ("ttft_ms", "transcript", "first_token"),
    ("first_sentence_ms", "first_token", "first_sentence"),
    ("first_audio_ms", "first_sentence", "first_audio"),
    ("voice_to_voice_ms", "speech_end", "first_audio"),
    ("endpoint_ms", "speech_end", "turn_detected"),
    ("asr_ms", "turn_detected", "transcript"),
    ("tts_ms", "first_sentence", "first_chunk"),
)
STAGE_NAMES = tuple(s[0] for s in STAGES)


@dataclass
class TurnClock:
    """Instants (seconds on the session clock) of one turn; None until reached."""

    speech_end: float | None = None
    turn_detected: float | None = None  # end of turn decided (ASR starts)
    transcript: float | None = None
    first_token: float | None = None
    first_sentence: float | None = None
    first_chunk: float | None = None  # first TTS samples ready
    first_audio: float | None = None  # first audio byte handed to the client

    def mark(self, name: str, t: float) -> None:
        """Record an instant once: later marks of the same name (second sentence, ...) are ignored."""
        if getattr(self, name) is None:
            setattr(self, name, t)

    def stages(self) -> dict[str, float | None]:
        out = {}
        for name, a, b in STAGES:
            ta, tb = getattr(self, a), getattr(self, b)
            out[name] = None if ta is None or tb is None else round((tb - ta) * 1000, 1)
        return out


def llm_stats(result) -> dict:
    """Method, tokens, tau and decode speed of a reply, from its `app.backend.Result`."""
    spec = result.spec or {}
    decode_s = (result.total_ms - (result.ttft_ms or result.total_ms)) / 1000
    # tokens after the first one, over the time after the first one: the decode speed a listener hears
    tok_s = (result.completion_tokens - 1) / decode_s if result.completion_tokens > 1 and decode_s > 0 else None
    return {"method": spec.get("method"), "tokens": result.completion_tokens, "tau": spec.get("tau"),
            "tokens_per_s": None if tok_s is None else round(tok_s, 1), "prompt_tokens": result.prompt_tokens,
            "cached_tokens": result.cached_tokens, "prefill_ms": round(result.prefill_ms, 1),
            "finish_reason": result.finish_reason}


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 1]) of the values; None for no values."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class LatencySummary:
    """Stage timings of many turns -> p50/p95 per stage (a session's, or a benchmark's)."""

    turns: list[dict[str, float | None]] = field(default_factory=list)

    def add(self, stages: dict[str, float | None]) -> None:
        self.turns.append(stages)

    def summary(self) -> dict[str, dict[str, float | None]]:
        out = {}
        for name in STAGE_NAMES:
            xs = [t[name] for t in self.turns if t.get(name) is not None]
            p50, p95 = percentile(xs, 0.5), percentile(xs, 0.95)
            out[name] = {"n": len(xs), "p50": None if p50 is None else round(p50, 1),
                         "p95": None if p95 is None else round(p95, 1)}
        return out
