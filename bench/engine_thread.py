"""Decoding speed by thread layout: why the server loads and decodes on one thread.

Each layout runs in a fresh process (OpenMP teams live as long as their threads):
  main   load and decode on the main thread (what `python -m domino_backend bench` does)
  same   load and decode on one worker thread (the server: app.scheduler.EngineThread)
  split  load on the main thread, decode on another (the server before EngineThread)
Reported per layout: tokens/s (median of the runs), and voluntary context switches per token of
the decoding thread (OpenMP workers that sleep between parallel regions show up there).

    python bench/engine_thread.py            # coder profile, ar, 64 tokens, 3 runs per layout
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "def quicksort(a):\n    "


def child(layout: str, profile: str, method: str, tokens: int, runs: int, threads: int) -> dict:
    from app.scheduler import EngineThread
    from domino_backend.engine import GenerationRequest
    from domino_backend.loader import build_engine

    def load():
        return build_engine(profile, None, "auto", threads)

    def decode(engine):
        ids = engine.target.tokenizer.encode(PROMPT)
        req = GenerationRequest(max_new_tokens=tokens, method=method, adaptive_drafts=False)
        engine.generate(ids, GenerationRequest(max_new_tokens=8, method=method))  # warm-up
        out = []
        for _ in range(runs):
            r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
            gen = engine.generate(ids, req)
            dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_THREAD)
            out.append((gen.stats.new_tokens / dt, (r1.ru_nvcsw - r0.ru_nvcsw) / gen.stats.new_tokens))
        return out

    if layout == "main":
        res = decode(load())
    elif layout == "same":
        et = EngineThread()
        engine = et.submit(load).result()
        res = et.submit(decode, engine).result()
    else:
        engine, box = load(), []
        th = threading.Thread(target=lambda: box.append(decode(engine)))
        th.start()
        th.join()
        res = box[0]
    return {"tokens_per_s": statistics.median(r[0] for r in res),
            "voluntary_switches_per_token": statistics.median(r[1] for r in res), "runs": res}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="coder")
    ap.add_argument("--method", default="ar")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="bench/results/engine_thread.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.profile, a.method, a.tokens, a.runs, a.threads)))
        return 0
    report = {"profile": a.profile, "method": a.method, "tokens": a.tokens, "runs": a.runs, "threads": a.threads,
              "layouts": {}}
    for layout in ("main", "same", "split"):
        out = subprocess.run([sys.executable, __file__, "--child", layout, *sys.argv[1:]], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        report["layouts"][layout] = json.loads(out)
    base = report["layouts"]["main"]["tokens_per_s"]
    print(f"{'layout':<7} {'tok/s':>7} {'vs main':>8} {'vol. switches/token':>20}")
    for name, r in report["layouts"].items():
        r["vs_main"] = r["tokens_per_s"] / base
        print(f"{name:<7} {r['tokens_per_s']:>7.2f} {r['vs_main']:>7.2f}x {r['voluntary_switches_per_token']:>20.1f}")
    Path(a.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
