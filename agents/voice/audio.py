"""PCM conversions for the voice agent: PCM16 bytes <-> float32, resampling to 16 kHz, WAV files.

Conventions: float audio is float32 in [-1, 1]; int16 audio is little-endian signed PCM, mono.
"""

from __future__ import annotations

import io
import wave
from math import gcd
from pathlib import Path

import numpy as np

from .parts import SAMPLE_RATE, VoiceError


def as_float_mono(pcm: np.ndarray, who: str) -> np.ndarray:
    """Check what VAD and ASR consume (1-D float samples in [-1, 1]); int16 here is a caller's bug."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise VoiceError(f"{who} expects mono audio (1-D), got shape {pcm.shape}")
    if not np.issubdtype(pcm.dtype, np.floating):
        raise VoiceError(f"{who} expects float samples in [-1, 1], got {pcm.dtype} (convert PCM16 with pcm16_to_float)")
    return pcm.astype(np.float32, copy=False)


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian PCM16 mono bytes -> float32 in [-1, 1). An odd byte count is a client error."""
    if len(data) % 2:
        raise ValueError(f"PCM16 audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_int16(pcm: np.ndarray) -> np.ndarray:
    """float audio -> int16 samples (clipped, so loud input saturates instead of wrapping around)."""
    return (np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 32767 / 32768) * 32768.0).round().astype(np.int16)


def float_to_pcm16(pcm: np.ndarray) -> bytes:
    return float_to_int16(pcm).astype("<i2").tobytes()


def resample(pcm: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased); float32 in, float32 out."""
    pcm = np.asarray(pcm, dtype=np.float32)
    if src_rate == dst_rate or pcm.size == 0:
        return pcm
    from scipy.signal import resample_poly

    g = gcd(int(src_rate), int(dst_rate))
    return resample_poly(pcm, dst_rate // g, src_rate // g).astype(np.float32)


class StreamResampler:
    """`resample` for a stream cut into frames of any size: the output equals resampling the whole
    stream at once, up to the last few samples, which wait for the input their filter still needs.

    Each call resamples a window that starts on the output grid (a multiple of `down` input samples)
    and keeps `_half` input samples of filter support on each side of what it emits.
    """

    def __init__(self, src_rate: int, dst_rate: int):
        g = gcd(int(src_rate), int(dst_rate))
        self.up, self.down = dst_rate // g, src_rate // g
        self._half = -(-10 * max(self.up, self.down) // self.up) + 1  # resample_poly's filter, in input samples
        self._buf = np.zeros(0, np.float32)
        self._start = 0  # stream index of _buf[0]; a multiple of `down`
        self._emitted = 0  # output samples returned so far

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return np.asarray(pcm, dtype=np.float32)
        self._buf = np.concatenate([self._buf, np.asarray(pcm, dtype=np.float32)])
        end = self._start + len(self._buf)
        last = (end - self._half) * self.up // self.down  # outputs before this have their whole filter
        first_of_window = self._start * self.up // self.down
        if last <= self._emitted:
            return np.zeros(0, np.float32)
        out = resample(self._buf, self.down, self.up)[self._emitted - first_of_window : last - first_of_window]
        self._emitted = last
        keep = max(0, self._emitted * self.down // self.up - self._half) // self.down * self.down
        self._buf, self._start = self._buf[keep - self._start :], keep
        return out


def to_16k(pcm: np.ndarray, rate: int) -> np.ndarray:
    """What VAD and ASR consume: float32 mono at 16 kHz."""
    return resample(pcm, rate, SAMPLE_RATE)


def wav_bytes(pcm: np.ndarray, rate: int) -> bytes:
    """A mono 16-bit WAV file in memory; `pcm` is int16 or float."""
    samples = pcm if pcm.dtype == np.int16 else float_to_int16(pcm)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def write_wav(path: str | Path, pcm: np.ndarray, rate: int) -> None:
    Path(path).write_bytes(wav_bytes(pcm, rate))


def read_wav(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV (path or bytes) -> (float32 mono, sample rate); channels are averaged."""
    with wave.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"only 16-bit PCM WAV is supported, got {8 * w.getsampwidth()}-bit")
        channels, rate = w.getnchannels(), w.getframerate()
        data = pcm16_to_float(w.readframes(w.getnframes()))
    if channels > 1:
        data = data[: len(data) - len(data) % channels].reshape(-1, channels).mean(axis=1)
    return data.astype(np.float32), rate
