"""Voice agent parts: VAD -> ASR -> (LLM) -> TTS, each swappable by name (see `parts`).

Importing this package needs only numpy and pydantic; the speech packages load when a part is first used.
"""

from .config import VoiceConfig
from .parts import (
    ASR,
    TTS,
    VAD,
    SAMPLE_RATE,
    VadEvent,
    VoiceDependencyError,
    VoiceError,
    get_asr,
    get_tts,
    get_vad,
)

__all__ = [
    "ASR",
    "TTS",
    "VAD",
    "SAMPLE_RATE",
    "VadEvent",
    "VoiceConfig",
    "VoiceDependencyError",
    "VoiceError",
    "get_asr",
    "get_tts",
    "get_vad",
]
