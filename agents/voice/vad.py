"""Streaming Silero VAD (v6 ONNX, the file that ships inside faster-whisper), run by onnxruntime.

The model scores 512-sample windows (32 ms at 16 kHz), each preceded by the last 64 samples of the
window before it; its LSTM state (h, c) carries from window to window. `feed` keeps the leftover
samples, the context and the state between calls, so any frame size gives the same events as one
long call.

Turn logic, in stream time: a run of speech windows (probability >= threshold) lasting
`min_speech_ms` emits `speech_start` at the run's first window; while in speech, a window below
`threshold - 0.15` starts a silence timer that speech cancels, and `silence_ms` of it emits
`speech_end` at the timer's start. The gap between the two thresholds is hysteresis: probabilities
that hover around the threshold neither open nor close a turn.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .audio import as_float_mono
from .parts import SAMPLE_RATE, VadEvent, VoiceDependencyError, VoiceError, INSTALL_HINT

WINDOW = 512  # samples per model call at 16 kHz (fixed by the model)
CONTEXT = 64  # samples of the previous window the model sees before each window
HYSTERESIS = 0.15


def silero_model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("faster_whisper")
    path = Path(spec.origin).parent / "assets" / "silero_vad_v6.onnx" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise VoiceDependencyError(f"the Silero VAD model ships with faster-whisper, which is not installed: {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=1)
def _session():
    try:
        import onnxruntime
    except ImportError as e:
        raise VoiceDependencyError(f"the Silero VAD needs onnxruntime: {INSTALL_HINT}") from e
    opts = onnxruntime.SessionOptions()
    # One thread: a window costs well under a millisecond, and sessions run next to ASR, TTS and the LLM.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    return onnxruntime.InferenceSession(str(silero_model_path()), sess_options=opts, providers=["CPUExecutionProvider"])


class SileroVAD:
    sample_rate = SAMPLE_RATE

    def __init__(self, threshold: float = 0.5, silence_ms: int = 400, min_speech_ms: int = 200):
        if not 0 < threshold < 1:
            raise VoiceError(f"VAD threshold must be in (0, 1), got {threshold}")
        if silence_ms <= 0 or min_speech_ms <= 0:
            raise VoiceError("VAD silence_ms and min_speech_ms must be positive")
        self.threshold = threshold
        self.off_threshold = max(threshold - HYSTERESIS, 0.01)
        self.silence_windows = max(1, round(silence_ms * SAMPLE_RATE / 1000 / WINDOW))
        self.speech_windows = max(1, round(min_speech_ms * SAMPLE_RATE / 1000 / WINDOW))
        self._session = _session()
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._windows = 0  # windows scored since reset: stream time = windows * 32 ms
        self.in_speech = False
        self._run_start: int | None = None  # first window of a candidate speech run (not yet in speech)
        self._silence_start: int | None = None  # first window of the current silence (in speech)
        self.last_prob = 0.0

    def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        audio = np.concatenate([self._pending, as_float_mono(pcm, "VAD")])
        n = len(audio) // WINDOW
        self._pending = audio[n * WINDOW :].copy()
        if n == 0:
            return []
        windows = audio[: n * WINDOW].reshape(n, WINDOW)
        contexts = np.concatenate([self._context[None], windows[:-1, -CONTEXT:]])
        self._context = windows[-1, -CONTEXT:].copy()
        # The model's first dimension is a sequence: the LSTM runs through all n windows in one call.
        probs, self._h, self._c = self._session.run(
            None, {"input": np.concatenate([contexts, windows], axis=1), "h": self._h, "c": self._c}
        )
        events = []
        for p in np.asarray(probs).reshape(-1):
            event = self._step(float(p))
            if event:
                events.append(event)
        return events

    def _step(self, p: float) -> VadEvent | None:
        i = self._windows
        self._windows += 1
        self.last_prob = p
        if not self.in_speech:
            if p >= self.threshold:
                if self._run_start is None:
                    self._run_start = i
                if i + 1 - self._run_start >= self.speech_windows:
                    self.in_speech, start, self._run_start = True, self._run_start, None
                    return VadEvent("speech_start", start * WINDOW / SAMPLE_RATE)
            elif p < self.off_threshold:
                self._run_start = None
            return None
        if p >= self.threshold:
            self._silence_start = None
        elif p < self.off_threshold and self._silence_start is None:
            self._silence_start = i
        if self._silence_start is not None and i + 1 - self._silence_start >= self.silence_windows:
            self.in_speech, end, self._silence_start = False, self._silence_start, None
            return VadEvent("speech_end", end * WINDOW / SAMPLE_RATE)
        return None

    @property
    def time_s(self) -> float:
        """Stream time of the audio scored so far."""
        return self._windows * WINDOW / SAMPLE_RATE
