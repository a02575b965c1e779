"""Load benchmark: N concurrent IDE-like clients sending single-line FIM completions over `/v1/ws`.

Each client holds one WebSocket and sends its requests back to back (closed loop, like an editor
that waits for a suggestion before asking for the next). Latencies are measured at the client from
sending the request: TTFT = first `delta`, total = `done`. For every (method, clients) cell it
reports p50/p95 TTFT and total, completions/s, generated tokens/s and mean tau.

    python bench/load_completions.py --spawn --profile tiny --clients 1,4,16 --methods domino,ar
    python bench/load_completions.py --url ws://127.0.0.1:8000/v1/ws --clients 4 --methods ar

`--spawn` starts `python -m app` on a free port (and stops it afterwards); otherwise `--url` is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agents.voice.metrics import percentile  # noqa: E402
from bench.serving import spawn_server  # noqa: E402

# Cursor positions inside small, typical files: the model should finish the current line.
BUILTIN = [
    {"prefix": "def is_even(n):\n    return ", "suffix": "\n\n\nprint(is_even(4))\n"},
    {"prefix": "import os\n\n\ndef list_python_files(root):\n    return [f for f in os.listdir(root) if ",
     "suffix": "]\n"},
    {"prefix": "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def increment(self):\n        ",
     "suffix": "\n\n    def reset(self):\n        self.count = 0\n"},
    {"prefix": "def read_lines(path):\n    with open(path) as f:\n        ", "suffix": "\n"},
    {"prefix": "numbers = [3, 1, 2]\nsorted_numbers = ", "suffix": "\nprint(sorted_numbers)\n"},
    {"prefix": "def factorial(n):\n    if n <= 1:\n        return 1\n    return ", "suffix": "\n"},
    {"prefix": "const add = (a, b) => ", "suffix": ";\nconsole.log(add(1, 2));\n"},
    {"prefix": "for i in range(10):\n    if i % 2 == 0:\n        ", "suffix": "\n"},
]


def load_prompts(path: str | None) -> list[dict]:
    prompts = list(BUILTIN)
    if path:
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line) if line.strip() else None
            if rec and "prefix" in rec:
                prompts.append({"prefix": rec["prefix"], "suffix": rec.get("suffix", "")})
    return prompts


async def client(url: str, headers: dict, prompts: list[dict], offset: int, n: int, args, method: str) -> list[dict]:
    from websockets.asyncio.client import connect

    out = []
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        for i in range(n):
            p = prompts[(offset + i) % len(prompts)]
            rid = uuid.uuid4().hex[:10]
            msg = {"type": "complete", "id": rid, "prefix": p["prefix"], "suffix": p["suffix"],
                   "max_tokens": args.max_tokens, "single_line": not args.multi_line, "method": method}
            t0 = time.perf_counter()
            await ws.send(json.dumps(msg))
            first = None
            while True:
                m = json.loads(await ws.recv())
                if m.get("id") != rid:
                    continue
                if m["type"] == "delta" and first is None:
                    first = time.perf_counter()
                elif m["type"] in ("done", "error"):
                    end = time.perf_counter()
                    out.append({"ttft": (first or end) - t0, "total": end - t0, "type": m["type"],
                                "code": m.get("code"), "tokens": (m.get("usage") or {}).get("completion_tokens", 0),
                                "tau": (m.get("spec") or {}).get("tau"), "finish": m.get("finish_reason"),
                                "server_queue_ms": (m.get("timings") or {}).get("queue_ms")})
                    break
    return out


async def run_cell(url: str, headers: dict, prompts: list[dict], clients: int, method: str, args) -> dict:
    if args.warmup:  # one request so that first-call costs do not land in the numbers
        await client(url, headers, prompts, 0, 1, args, method)
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(client(url, headers, prompts, c * 3, args.requests, args, method)
                                  for c in range(clients)))
    wall = time.perf_counter() - t0
    rows = [r for run in runs for r in run]
    ok = [r for r in rows if r["type"] == "done"]
    ttft, total = [r["ttft"] * 1000 for r in ok], [r["total"] * 1000 for r in ok]
    taus = [r["tau"] for r in ok if r["tau"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "method": method, "clients": clients, "requests": len(rows), "errors": len(rows) - len(ok),
        "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p95_ms": percentile(ttft, 0.95),
        "total_p50_ms": percentile(total, 0.5), "total_p95_ms": percentile(total, 0.95),
        "completions_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
        "mean_tokens": tokens / len(ok) if ok else 0, "mean_tau": statistics.fmean(taus) if taus else None,
        "wall_s": wall,
    }


def fmt(x, nd=0):
    return "-" if x is None else f"{x:.{nd}f}"


def table(cells: list[dict]) -> str:
    head = (f"{'method':8} {'clients':>7} {'reqs':>5} {'err':>4} {'ttft p50':>9} {'ttft p95':>9} {'total p50':>10} "
            f"{'total p95':>10} {'compl/s':>8} {'tok/s':>7} {'tok/req':>8} {'tau':>5}")
    lines = [head, "-" * len(head)]
    for c in cells:
        lines.append(f"{c['method']:8} {c['clients']:>7} {c['requests']:>5} {c['errors']:>4} {fmt(c['ttft_p50_ms']):>9} "
                     f"{fmt(c['ttft_p95_ms']):>9} {fmt(c['total_p50_ms']):>10} {fmt(c['total_p95_ms']):>10} "
                     f"{fmt(c['completions_per_s'], 2):>8} {fmt(c['tokens_per_s'], 1):>7} {fmt(c['mean_tokens'], 1):>8} "
                     f"{fmt(c['mean_tau'], 2):>5}")
    return "\n".join(lines)


def spawn(args) -> tuple[subprocess.Popen, str]:
    clients = max(int(c) for c in args.clients.split(","))
    proc, port = spawn_server(["--profile", args.profile, "--dtype", args.dtype, "--max-active", str(args.max_active),
                               "--max-queue", str(max(64, clients))]
                              + (["--threads", str(args.threads)] if args.threads else []))
    return proc, f"ws://127.0.0.1:{port}/v1/ws"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8000/v1/ws")
    ap.add_argument("--spawn", action="store_true", help="start `python -m app` for the run")
    ap.add_argument("--profile", default="coder")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-active", type=int, default=8)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--methods", default="domino,ar")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per cell")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--multi-line", action="store_true", help="do not set single_line")
    ap.add_argument("--prompts", default=str(HERE / "prompts_coder.jsonl"), help="JSONL; its prefix/suffix records are added")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    headers = {"Authorization": f"Bearer {os.environ['DOMINO_API_KEY']}"} if os.environ.get("DOMINO_API_KEY") else {}
    prompts = load_prompts(args.prompts if args.prompts and Path(args.prompts).exists() else None)
    proc = None
    url = args.url
    if args.spawn:
        proc, url = spawn(args)
    try:
        cells = []
        for method in args.methods.split(","):
            for n in (int(c) for c in args.clients.split(",")):
                cell = asyncio.run(run_cell(url, headers, prompts, n, method, args))
                cells.append(cell)
                print(table([cell]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(table(cells))
    if args.json:
        report = {"profile": args.profile if args.spawn else None, "url": None if args.spawn else url,
                  "max_tokens": args.max_tokens, "single_line": not args.multi_line, "requests_per_client": args.requests,
                  "threads": args.threads, "cells": cells}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
