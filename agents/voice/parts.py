"""The voice agent's swappable parts: one `Protocol` per kind, a registry per kind, cached factories.

Kinds: VAD (speech start/end in a 16 kHz stream), ASR (one utterance -> text), TTS (text -> int16 chunks).
Each registry maps a name to a factory given as ``"module:attribute"``, imported only when that name
is first asked for, so this module (and the engine and API around it) imports without any voice
package installed; a missing package surfaces as `VoiceDependencyError` naming what to install.

Caching: ASR and TTS instances are shared per process (one model load; their calls are stateless),
keyed by name and options. A VAD carries the state of one audio stream, so `get_vad` returns a fresh
stream on every call; the implementation shares its model between streams.

Options (keyword arguments to the getters; `VoiceConfig.vad_options()` / `tts_options()` build them):
  VAD  silero:   threshold=0.5, silence_ms=400, min_speech_ms=200
  ASR  tiny/accurate: beam_size=1, compute_type="int8"
  TTS  piper:    voice=None (a .onnx voice path; default en_US-joe-medium)
       kokoro:   voice=None (a voice name; default jm_kumo)
       espeak:   voice=None (an espeak-ng voice; default en-us), wpm=None
       coqui:    voice=<path to a local model folder or file> (required)
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16000  # what VAD and ASR consume; `audio.to_16k` converts anything else
INSTALL_HINT = "pip install 'domino[voice]' (or run bash setup.sh)"


class VoiceError(RuntimeError):
    """A voice part cannot be provided or used (bad name, bad option, missing model files)."""


class VoiceDependencyError(VoiceError):
    """A voice part needs a package that is not installed; the message names it and how to install."""


@dataclass(frozen=True)
class VadEvent:
    kind: Literal["speech_start", "speech_end"]
    at_s: float  # stream time in seconds since the last reset (start: where speech began; end: where it stopped)


@runtime_checkable
class VAD(Protocol):
    sample_rate: int  # 16000

    def reset(self) -> None:
        """Start a new stream: forget buffered audio, model state and stream time."""

    def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        """Consume float32 mono samples at `sample_rate` (any length); return the events they complete."""


@runtime_checkable
class ASR(Protocol):
    def transcribe(self, pcm: np.ndarray) -> str:
        """float32 mono 16 kHz samples of one utterance -> its text ("" for no speech)."""


@runtime_checkable
class TTS(Protocol):
    sample_rate: int

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        """Yield int16 mono chunks at `sample_rate`; the first one as soon as it exists."""


Factory = Callable[..., Any]


class Registry:
    """Name -> factory for one kind of part. Factories are callables or lazy ``"module:attr"`` strings."""

    def __init__(self, kind: str, entries: dict[str, Factory | str]):
        self.kind = kind
        self._entries = dict(entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def register(self, name: str, factory: Factory | str) -> None:
        """Add or replace a part (e.g. a plugin's TTS). Instances already cached under `name` are dropped."""
        self._entries[name] = factory
        _cached.cache_clear()

    def factory(self, name: str) -> Factory:
        if name not in self._entries:
            raise VoiceError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attr = entry.split(":")
            entry = getattr(importlib.import_module(module), attr)
        return entry

    def create(self, name: str, **opts: Any) -> Any:
        return self.factory(name)(**opts)


VADS = Registry("VAD", {"silero": "agents.voice.vad:SileroVAD"})
ASRS = Registry("ASR", {"tiny": "agents.voice.asr:tiny", "accurate": "agents.voice.asr:accurate"})
TTSS = Registry(
    "TTS",
    {
        "piper": "agents.voice.tts:PiperTTS",
        "kokoro": "agents.voice.tts:KokoroTTS",
        "espeak": "agents.voice.tts:EspeakTTS",
        "coqui": "agents.voice.tts:CoquiTTS",
    },
)


@functools.lru_cache(maxsize=None)
def _cached(kind: str, name: str, opts: tuple[tuple[str, Any], ...]) -> Any:
    return _REGISTRIES[kind].create(name, **dict(opts))


_REGISTRIES = {"asr": ASRS, "tts": TTSS}


def _key(opts: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    # None means "the part's default", so it must not split the cache from an omitted option.
    return tuple(sorted((k, v) for k, v in opts.items() if v is not None))


def get_vad(name: str = "silero", **opts: Any) -> VAD:
    """A new VAD stream (its model is loaded once per process)."""
    return VADS.create(name, **{k: v for k, v in opts.items() if v is not None})


def get_asr(name: str = "tiny", **opts: Any) -> ASR:
    """The process-wide ASR for `name` and `opts` (hashable values), loaded on first use."""
    return _cached("asr", name, _key(opts))


def get_tts(name: str = "piper", **opts: Any) -> TTS:
    """The process-wide TTS for `name` and `opts` (hashable values), loaded on first use."""
    return _cached("tts", name, _key(opts))
