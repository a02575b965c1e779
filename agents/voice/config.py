"""Every voice-agent setting in one place, with its default and the reason for it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .chunker import SentenceChunker
from .parts import ASRS, TTSS, VADS

SPOKEN_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Your replies are spoken aloud, so answer in a few short, "
    "plain sentences: no lists, tables, markdown or emoji. If code is needed, keep it short; it is "
    "shown in the transcript, not read out, so describe what it does in one sentence."
)


class VoiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- voice activity detection (the silence wait sits on the voice-to-voice critical path:
    # latency is measured from the end of speech, and every turn pays `silence_ms` before ASR starts)
    vad: str = "silero"
    vad_threshold: float = Field(0.5, gt=0, lt=1)  # speech probability that counts as speech
    # Pauses inside a spoken sentence (breaths, commas, hesitations) are mostly under ~300 ms, while
    # the gap a speaker leaves for an answer is longer. 400 ms keeps a margin over in-sentence pauses
    # (a multi-sentence Piper utterance stays one turn: test_vad_on_piper_speech_with_noise) and
    # answers 100 ms sooner than the common 500 ms (OpenAI server_vad); raise it for slow speakers.
    silence_ms: int = Field(400, ge=100, le=5000)
    # Speech shorter than this never opens a turn: clicks, coughs and keyboard noise stay below it.
    min_speech_ms: int = Field(200, ge=32, le=2000)

    # --- turn taking while the assistant speaks (used by the session)
    backchannel_max_s: float = Field(0.6, ge=0)  # user speech this short ("mhm", "yeah") does not barge in
    echo_guard_ms: int = Field(200, ge=0)  # ignore speech starting this soon after our own audio starts
    # ASR and the LLM start after this much silence, while the turn is confirmed only at `silence_ms`
    # (speech in between discards the early start): the silence wait overlaps ASR and prefill.
    early_turn_ms: int = Field(100, ge=32, le=5000)
    # Reply audio is paced in real time this far ahead of the listener: a barge-in silences it within
    # about this much, and the server knows what was heard. Raise it for clients on jittery links.
    audio_lead_ms: int = Field(120, ge=20, le=5000)
    max_reply_tokens: int = Field(160, ge=1)  # spoken answers are short; this bounds a runaway one

    # --- recognition and synthesis
    # The LLM method for replies when the client names none (None: the server's default). Plain
    # decoding: a spoken reply's first chunk is a dozen chat tokens, where the shipped drafter
    # (trained on code) is accepted too rarely to pay for its verify rows on a CPU; compare both
    # with `python bench/voice_latency.py`.
    method: str | None = "ar"
    asr: str = "tiny"  # "tiny" (Whisper tiny.en) | "accurate" (Whisper base)
    tts: str = "piper"  # "piper" | "kokoro" | "espeak" | "coqui"
    voice: str | None = None  # engine-specific voice name or model path; None = the engine's default
    clause_words: int = Field(8, ge=2)  # speak at , ; : once a clause has this many words (earlier audio)
    # The reply's first chunk may end at a clause mark sooner: it is on the voice-to-voice path.
    first_clause_words: int = Field(3, ge=1)
    # ... or just before a conjunction or preposition ("and", "which", "in" ...) once it has this
    # many characters (about 4 words): every token and syllable of the first chunk is on the
    # voice-to-voice path
    first_phrase_chars: int | None = Field(16, ge=1)

    # --- conversation
    system_prompt: str = SPOKEN_SYSTEM_PROMPT
    max_session_idle_s: float = Field(300.0, gt=0)
    # Each session runs its own ASR and TTS on the server's CPU; more sessions are refused (overloaded).
    max_sessions: int = Field(8, ge=1)
    send_timeout_s: float = Field(10.0, gt=0)  # a client that reads nothing for this long is dropped

    # --- limits (clear errors, never a crash)
    max_frame_bytes: int = Field(256 << 10, ge=1024)  # one audio frame from the client (~2.7 s at 48 kHz int16)
    max_utterance_s: float = Field(30.0, gt=0, le=120)  # Whisper's window; longer speech is cut into turns
    min_sample_rate: int = 8000
    max_sample_rate: int = 48000

    @field_validator("vad")
    @classmethod
    def _known_vad(cls, v: str) -> str:
        return _known(VADS.names(), "vad", v)

    @field_validator("asr")
    @classmethod
    def _known_asr(cls, v: str) -> str:
        return _known(ASRS.names(), "asr", v)

    @field_validator("tts")
    @classmethod
    def _known_tts(cls, v: str) -> str:
        return _known(TTSS.names(), "tts", v)

    def first_chunker(self) -> SentenceChunker:
        """The chunker for a reply's start; `reply.speak` relaxes it after the first chunk."""
        return SentenceChunker(clause_words=self.first_clause_words, phrase_chars=self.first_phrase_chars)

    @model_validator(mode="after")
    def _rates(self) -> VoiceConfig:
        if not 0 < self.min_sample_rate <= self.max_sample_rate:
            raise ValueError("need 0 < min_sample_rate <= max_sample_rate")
        return self

    def vad_options(self) -> dict:
        """Keyword options for `get_vad(self.vad, **...)`."""
        return {"threshold": self.vad_threshold, "silence_ms": self.silence_ms, "min_speech_ms": self.min_speech_ms}

    def tts_options(self) -> dict:
        """Keyword options for `get_tts(self.tts, **...)` (None = the engine's default voice)."""
        return {"voice": self.voice}

    def check_sample_rate(self, rate: int) -> int:
        """Return `rate` if clients may send it, else raise ValueError with the supported range."""
        if not self.min_sample_rate <= rate <= self.max_sample_rate:
            raise ValueError(
                f"unsupported sample rate {rate} Hz; send {self.min_sample_rate}-{self.max_sample_rate} Hz mono PCM16"
            )
        return rate


def _known(names: list[str], field: str, v: str) -> str:
    if v not in names:
        raise ValueError(f"unknown {field} {v!r}; choose from {', '.join(names)}")
    return v
