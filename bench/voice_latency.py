"""Voice-to-voice latency (pinned): spoken requests through `/v1/voice` in real time on loopback.

The requests of bench/voice_prompts.txt are synthesized by Piper (en_US-joe-medium, sampling noise
off, so every run speaks the same audio; cached as WAVs under $DOMINO_CACHE/voice/bench). One
server process (`python -m app`, default models) answers them all. Each request opens a fresh
session, streams its speech in real time like a microphone, keeps streaming silence until the
first reply audio arrives, then ends the session. Every request is sent once per method and pass
(`ar`, then the server's default), so both methods meet the same machine; p50/p95 pool the turns
of all passes (one pass over 12 requests moves by 10-15 % between runs on the 2-core box).

Reported per method: p50/p95 of each stage of `turn_done.timings` (see docs/voice-api.md), each
stage's share of voice-to-voice, the voice-to-voice a client sees (end of the speech it sent ->
first audio byte it received), tau and decode speed, and how much speculation saves on the first
sentence. Writes JSON and prints a markdown table.

    python bench/voice_latency.py                       # pinned: coder profile, 12 requests, 3 passes
    python bench/voice_latency.py --profile tiny --limit 3 --repeat 1 --json ''   # a quick check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agents.voice.audio import float_to_int16, read_wav, to_16k, write_wav  # noqa: E402
from agents.voice.metrics import percentile  # noqa: E402
from app.voice_client import VoiceClient  # noqa: E402
from bench.report import rows_table  # noqa: E402
from bench.serving import spawn_server  # noqa: E402

RATE = 16000
CHAIN = ("transcript_ms", "ttft_ms", "first_sentence_ms", "first_audio_ms")  # adds up to voice_to_voice_ms
LEAD_IN_S = 0.5  # microphone open before the speech starts


def prompts(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def speech(text: str) -> np.ndarray:
    """Piper speech of `text` at 16 kHz (int16), made once and cached."""
    from agents.voice.models import voice_cache_dir

    path = voice_cache_dir() / "bench" / f"{hashlib.sha1(text.encode()).hexdigest()[:16]}.wav"
    if not path.is_file():
        from piper import SynthesisConfig

        from agents.voice.parts import get_tts

        voice = get_tts("piper").voice  # the default Piper voice, driven directly for noise-free synthesis
        quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
        parts = [np.asarray(voice.phoneme_ids_to_audio(voice.phonemes_to_ids(p), quiet)).reshape(-1)
                 for p in voice.phonemize(text) if p]
        pcm = np.concatenate(parts).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(path, to_16k(pcm / max(1e-6, float(np.abs(pcm).max())) * 0.8, voice.config.sample_rate), RATE)
    pcm, rate = read_wav(path)
    return float_to_int16(pcm)


def speech_end_s(pcm: np.ndarray) -> float:
    """Where the speech in a clip ends (the last 10 ms frame above 2% of its peak)."""
    frames = np.abs(pcm[: len(pcm) // 160 * 160].astype(np.float32)).reshape(-1, 160).max(axis=1)
    loud = np.nonzero(frames > 0.02 * frames.max())[0]
    return (loud[-1] + 1) * 0.01


def spawn(profile: str, dtype: str, threads: int | None) -> tuple[subprocess.Popen, int]:
    return spawn_server(["--profile", profile, "--dtype", dtype] + (["--threads", str(threads)] if threads else []))


def one_request(url: str, pcm: np.ndarray, method: str | None) -> dict:
    settings = {"method": method} if method else {}
    with VoiceClient(url, sample_rate=RATE, **settings) as vc:
        if vc.ready["type"] != "ready":
            raise SystemExit(f"the server refused the session: {vc.ready}")
        t_speech = vc.stream(np.concatenate([np.zeros(int(RATE * LEAD_IN_S), np.int16), pcm])) + LEAD_IN_S
        vc.stream_silence_until("audio_start", timeout=120)
        while not vc.audio:  # the first frame follows its audio_start
            time.sleep(0.001)
        first = vc.audio[0][0]
        vc.send({"type": "end"})  # only the first audio is measured: the rest of the reply is cut off
        done = vc.wait_for("turn_done", timeout=60)
    return {"transcript": done["transcript"], "reply": done["reply"], **done["timings"],
            "client_voice_to_voice_ms": round((first - t_speech - speech_end_s(pcm)) * 1000, 1),
            "llm": done["llm"]}


LABELS = {"transcript_ms": "end of speech -> transcript (silence wait + ASR)", "endpoint_ms": "... silence wait",
          "asr_ms": "... ASR", "ttft_ms": "transcript -> first LLM token",
          "first_sentence_ms": "first token -> first sentence", "first_audio_ms": "first sentence -> first audio byte",
          "tts_ms": "... TTS of the first sentence", "voice_to_voice_ms": "voice-to-voice (server)",
          "client_voice_to_voice_ms": "voice-to-voice (client)"}


def stage_rows(rows: dict[str, list[dict]]) -> list[dict]:
    """One row per stage: p50 / p95 (ms) per method, and the stage's mean share of voice-to-voice."""
    out = []
    for name, label in LABELS.items():
        row = {"stage": label}
        for method, rs in rows.items():
            xs = [r[name] for r in rs if r.get(name) is not None]
            shares = [r[name] / r["voice_to_voice_ms"] for r in rs if name in CHAIN and r.get("voice_to_voice_ms")]
            p50, p95 = percentile(xs, 0.5), percentile(xs, 0.95)
            row[method] = {"p50": None if p50 is None else round(p50), "p95": None if p95 is None else round(p95),
                           "share": round(statistics.fmean(shares), 2) if shares else None}
        out.append(row)
    for key, label in (("tau", "tau (mean)"), ("tokens_per_s", "decode tokens/s (mean)")):
        vals = {m: [r["llm"][key] for r in rs if r.get("llm") and r["llm"].get(key)] for m, rs in rows.items()}
        out.append({"stage": label, **{m: {"p50": round(statistics.fmean(v), 2) if v else None, "p95": None,
                                           "share": None} for m, v in vals.items()}})
    return out


def fmt(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="coder")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompts", default=str(HERE / "voice_prompts.txt"))
    ap.add_argument("--limit", type=int, default=None, help="only the first N requests")
    ap.add_argument("--repeat", type=int, default=3,
                    help="passes over the requests (the p50/p95 pool every turn: one pass varies by 10-15 %% here)")
    ap.add_argument("--url", default=None, help="a running server's ws://.../v1/voice instead of spawning one")
    ap.add_argument("--json", default=str(HERE / "results" / "voice_latency.json"), help="'' = do not write")
    args = ap.parse_args(argv)
    texts = prompts(Path(args.prompts))[: args.limit]
    clips = [speech(t) for t in texts]
    load_start = os.getloadavg()[0]
    proc = None
    if args.url:
        url = args.url
    else:
        proc, port = spawn(args.profile, args.dtype, args.threads)
        url = f"ws://127.0.0.1:{port}/v1/voice"
    try:
        import httpx

        health = httpx.get(url.replace("ws", "http", 1).rsplit("/v1/", 1)[0] + "/health").json()
        default = health.get("default_method")
        methods = {"ar": "ar", default: default} if default != "ar" else {"ar": "ar"}
        one_request(url, clips[0], None)  # warm-up: loads the voice models, fills the prefix cache
        rows = {m: [] for m in methods}
        for text, pcm in [(t, c) for _ in range(args.repeat) for t, c in zip(texts, clips)]:
            for name, method in methods.items():
                row = {"prompt": text, "speech_s": round(speech_end_s(pcm), 2), **one_request(url, pcm, method)}
                rows[name].append(row)
                print(f"{name:14} v2v {fmt(row['voice_to_voice_ms']):>6} ms  {text!r} -> {row['reply'][:60]!r}",
                      file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    p50 = lambda m, k: next(r[m]["p50"] for r in stages if r["stage"] == LABELS[k])  # noqa: E731
    stages = stage_rows(rows)
    # Latency on a shared machine is mostly other work: the load average says how busy it was.
    report = {"profile": None if args.url else args.profile, "requests": len(texts), "repeat": args.repeat,
              "default_method": default,
              "cpus": os.cpu_count(), "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2)}
    if default != "ar":  # what speculation saves, p50 against ar
        for k in ("first_sentence_ms", "voice_to_voice_ms"):
            a, b = p50("ar", k), p50(default, k)
            report[f"{k.removesuffix('_ms')}_saved_ms"] = None if a is None or b is None else a - b
    report |= {"stages": stages, "server": health, "requests_by_method": rows}
    print("\n".join(rows_table([("voice_latency.json", report)])))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
