"""Load benchmark: concurrent IDE-like clients over `/v1/ws`, a voice-like chat stream under that
load, and the served speed of one request against the engine's own.

Completion clients: each holds one WebSocket and "types" in a file, a source file of this
repository: request i asks for a single-line completion at a cursor `context_chars` + 7 i
characters in (about 1,000 tokens of prefix by default, and the next lines as the suffix), back
to back (closed loop: an editor waits for a suggestion before asking for the next). Consecutive
prompts in a file share their prefix, which the engine's prefix cache restores (a snapshot per
file: the server's defaults keep 64). With `--whole`, each request is a completion without stop
rules instead, up to `--max-tokens` (or the model's end token): a decode-bound load, where batching
has the most to share (a single-line completion is mostly its prompt's prefill). Latencies are measured at the client from sending: TTFT =
first `delta`, total = `done`.

Every completions cell does the same work, so that its throughput compares with the others': as
many files as the most clients of the run, `--requests` keystrokes in each (after a warm-up request
per file, one keystroke earlier, that puts it in the prefix cache). With N clients, client j types
in files j, j + N, ... one after the other (one client: every file in turn, like one user moving
between files). The cells run in `--passes` passes; in each the methods take turns, each over the
client counts, in alternating orders (ABBA): this VM's speed moves by tens of percent within a
minute, and the order makes drift hit every cell alike. Each method and pass types further along in
every file (its own keystrokes). A cell's numbers are over all its passes; `scaling` is the
throughput of the most clients over that of the fewest, with each pass's own ratio beside it.

Cells, per method (`default` = the server's default method, resolved through /health):
  completions  1 / 4 / 16 clients: p50/p95 TTFT and total, completions/s, tokens/s, tau, and the
               mean number of requests per engine round (from the server's /metrics)
  mixed        a voice-like stream (chat turns with priority `voice`, one short spoken-style answer
               each) alone (half of its turns before the load, half after), and while 8
               completion clients run: time to first sentence p50/p95
               (the first chunk the voice agent would hand to text-to-speech)
  speed        one request at a time (no stop rules: up to --speed-tokens or the model's end
               token), four prompts, served over /v1/ws, against the same prompts decoded by the
               engine on the main thread of another process while the server idles (`python -m
               domino_backend bench`'s way), passes alternating: tokens over seconds of every
               run, and the ratio

    python bench/load_completions.py --spawn --profile tiny --clients 1,4 --requests 2 --plot docs/img/load.png
    python bench/load_completions.py --url ws://127.0.0.1:8000/v1/ws --clients 4 --methods ar   # no speed cell

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
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from agents.voice.config import SPOKEN_SYSTEM_PROMPT, VoiceConfig  # noqa: E402
from agents.voice.metrics import percentile  # noqa: E402
from bench.serving import spawn_server  # noqa: E402

FILES = sorted(p for d in ("domino_backend", "app", "agents/voice") for p in (ROOT / d).glob("*.py"))
FIRST_CHUNK = VoiceConfig().first_chunker  # the voice agent's first chunk for text-to-speech
TYPED_PER_REQUEST = 7  # characters the cursor moves between a client's requests
MAX_KEYSTROKES = 50  # per file: the texts used are long enough for this many
MIXED_CLIENTS = 8


def cursor_prompts(context_chars: int, suffix_chars: int = 400) -> list[str]:
    """Source texts long enough for a cursor at context_chars (and the requests after it)."""
    texts = [p.read_text() for p in FILES]
    return [t for t in texts if len(t) > context_chars + suffix_chars + MAX_KEYSTROKES * TYPED_PER_REQUEST]


def completion(texts: list[str], client: int, i: int, args) -> dict:
    """File `client`'s i-th keystroke: the cursor TYPED_PER_REQUEST * i characters past context_chars."""
    text = texts[client % len(texts)]
    pos = args.context_chars + TYPED_PER_REQUEST * i
    return {"prefix": text[:pos], "suffix": text[pos:pos + 400]}


def voice_questions() -> list[str]:
    lines = (HERE / "voice_prompts.txt").read_text().splitlines()
    return [x for x in lines if x.strip() and not x.startswith("#")]


async def ws_request(ws, msg: dict) -> dict:
    """Send one request; collect timings at the client until its `done` or `error`."""
    rid = uuid.uuid4().hex[:10]
    t0 = time.perf_counter()
    await ws.send(json.dumps({**msg, "id": rid}))
    first = sentence = None
    chunker = FIRST_CHUNK()
    while True:
        m = json.loads(await ws.recv())
        if m.get("id") != rid:
            continue
        now = time.perf_counter()
        if m["type"] == "delta":
            first = first or now
            if sentence is None and chunker.feed(m["text"]):
                sentence = now
        elif m["type"] in ("done", "error"):
            return {"ttft": (first or now) - t0, "sentence": (sentence or now) - t0, "total": now - t0,
                    "type": m["type"], "code": m.get("code"), "tokens": (m.get("usage") or {}).get("completion_tokens", 0),
                    "tau": (m.get("spec") or {}).get("tau"), "engine_tok_s": (m.get("spec") or {}).get("tokens_per_s"),
                    "finish": m.get("finish_reason")}


async def completion_client(url, headers, texts, files: list[int], n: int | None, args, method: str | None,
                            stop: asyncio.Event | None = None, warm: list | None = None, start: int = 0) -> list[dict]:
    """n requests back to back in each of `files` in turn, keystrokes start, start + 1, ... (or, in
    one file, until `stop` is set); appends the file to `warm` after its first request."""
    from websockets.asyncio.client import connect

    out = []
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        for f in files:
            i = 0
            while (n is None or i < n) and not (stop and stop.is_set()):
                msg = {"type": "complete", **completion(texts, f, start + i, args), "max_tokens": args.max_tokens,
                       "single_line": not args.whole, **({"method": method} if method else {})}
                out.append(await ws_request(ws, msg))
                if i == 0 and warm is not None:
                    warm.append(f)
                i += 1
    return out


async def voice_client(url, headers, turns: int, args, method: str | None, start: int = 0) -> list[dict]:
    """`turns` voice-like chat turns back to back: questions start, start + 1, ... of the list."""
    from websockets.asyncio.client import connect

    out = []
    questions = voice_questions()
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        for i in range(start, start + turns):
            messages = [{"role": "system", "content": SPOKEN_SYSTEM_PROMPT},
                        {"role": "user", "content": questions[i % len(questions)]}]
            msg = {"type": "chat", "messages": messages, "max_tokens": 48, "priority": "voice",
                   **({"method": method} if method else {})}
            out.append(await ws_request(ws, msg))
    return out


def summary(rows: list[dict], wall: float) -> dict:
    ok = [r for r in rows if r["type"] == "done"]
    ms = lambda key, q: percentile([r[key] * 1000 for r in ok], q)
    taus = [r["tau"] for r in ok if r["tau"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(rows), "errors": len(rows) - len(ok),
            "ttft_p50_ms": ms("ttft", 0.5), "ttft_p95_ms": ms("ttft", 0.95),
            "total_p50_ms": ms("total", 0.5), "total_p95_ms": ms("total", 0.95),
            "completions_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
            "mean_tokens": tokens / len(ok) if ok else 0, "mean_tau": statistics.fmean(taus) if taus else None,
            "wall_s": wall}


def engine_counts(url: str, headers: dict) -> dict[str, float]:
    """The server's batch counters from /metrics (app/metrics.py); {} from a server without them."""
    import httpx

    text = httpx.get(f"{http_base(url)}/metrics", headers=headers, timeout=10).text
    names = ("domino_engine_rounds", "domino_engine_batched_requests", "domino_engine_max_batch")
    return {name: float(line.split()[1]) for line in text.splitlines() for name in names
            if line.startswith(name + " ")}


async def completions_pass(url, headers, texts, clients: int, files: int, method, args, start: int) -> dict:
    """One pass of a cell: `clients` concurrent clients sharing keystrokes start + 1 .. start +
    requests of `files` files (module docstring), after a warm-up at keystroke `start`. Returns
    the raw rows, the wall time and the engine's round counters over the pass."""
    share = [list(range(j, files, clients)) for j in range(clients)]
    if args.warmup:  # first-call costs (and each file's first prefill) stay out of the numbers
        await asyncio.gather(*(completion_client(url, headers, texts, fs, 1, args, method, start=start)
                               for fs in share))
    before = engine_counts(url, headers)
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(completion_client(url, headers, texts, fs, args.requests, args, method,
                                                    start=start + 1) for fs in share))
    wall, after = time.perf_counter() - t0, engine_counts(url, headers)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("domino_engine_rounds", "domino_engine_batched_requests")}
    return {"rows": [r for run in runs for r in run], "wall": wall, **delta}


def completions_cells(url, headers, texts, methods: list, args) -> tuple[list[list[dict]], list[dict]]:
    """Every method's cells, in `args.passes` passes (module docstring): in each pass the methods
    take turns (in alternating order), each over the client counts (ascending, then descending
    in the next pass). Returns per method its cells (fewest clients first) and its scaling from
    the fewest to the most clients.

    Each method and pass types its own keystrokes: a request without a drafter may restore a
    snapshot that a drafting method stored (the same keys and values, more features), so a method
    typing another's keystrokes after it would find its whole prompts cached."""
    files = max(args.clients)
    passes = {(m, n): [] for m in range(len(methods)) for n in args.clients}
    for p in range(args.passes):
        order = list(enumerate(methods))
        for m, method in order if p % 2 == 0 else order[::-1]:
            start = (p * len(methods) + m) * (args.requests + 1)
            for n in args.clients if p % 2 == 0 else args.clients[::-1]:
                runs = passes[m, n]
                runs.append(asyncio.run(completions_pass(url, headers, texts, n, files, method, args, start)))
                print(f"  pass {p + 1}, {method or 'default'}, {n} clients: "
                      f"{args.requests * files / runs[-1]['wall']:.2f} completions/s", file=sys.stderr, flush=True)
    out, scalings = [], []
    for m in range(len(methods)):
        cells = []
        for n in args.clients:
            runs = passes[m, n]
            rounds = sum(r["domino_engine_rounds"] for r in runs)
            cells.append({"clients": n, "files": files, "passes": len(runs),
                          **summary([row for r in runs for row in r["rows"]], sum(r["wall"] for r in runs)),
                          "mean_batch": sum(r["domino_engine_batched_requests"] for r in runs) / rounds if rounds else None,
                          "pass_completions_per_s": [len(r["rows"]) / r["wall"] for r in runs]})
        lo, hi = cells[0], cells[-1]
        out.append(cells)
        scalings.append({"clients": hi["clients"], "vs_clients": lo["clients"],
                         "ratio": hi["completions_per_s"] / lo["completions_per_s"],
                         "pass_ratios": [a / b for a, b in zip(hi["pass_completions_per_s"], lo["pass_completions_per_s"])]})
    return out, scalings


async def mixed_cell(url, headers, texts, method, args) -> dict:
    """The voice-like stream's turns alone, then beside MIXED_CLIENTS completion clients, then alone
    again (half of the alone turns before, half after: the machine's drift hits both sides alike)."""
    await voice_client(url, headers, 1, args, method)  # warm: the system prompt sits in the prefix cache
    alone = await voice_client(url, headers, args.voice_turns // 2, args, method)
    stop, warm = asyncio.Event(), []
    load = [asyncio.create_task(completion_client(url, headers, texts, [c], None, args, method, stop, warm))
            for c in range(MIXED_CLIENTS)]
    while len(warm) < MIXED_CLIENTS:  # every client's file is in the prefix cache: steady typing
        await asyncio.sleep(0.05)
    loaded = await voice_client(url, headers, args.voice_turns, args, method)
    stop.set()
    completions = [r for run in await asyncio.gather(*load) for r in run[1:]]
    half = args.voice_turns // 2  # the same questions as the loaded turns
    alone += await voice_client(url, headers, args.voice_turns - half, args, method, start=half)
    p50 = lambda rows: percentile([r["sentence"] * 1000 for r in rows if r["type"] == "done"], 0.5)
    return {"voice_turns": args.voice_turns, "completion_clients": MIXED_CLIENTS,
            "first_sentence_alone_p50_ms": p50(alone), "first_sentence_loaded_p50_ms": p50(loaded),
            "first_sentence_loaded_p95_ms": percentile([r["sentence"] * 1000 for r in loaded], 0.95),
            "growth": p50(loaded) / p50(alone) - 1 if p50(alone) else None,
            "completions_during": len(completions),
            "completion_ttft_p50_ms": percentile([r["ttft"] * 1000 for r in completions], 0.5)}


SPEED_PROMPTS = range(4)  # the first source files, cursor at context_chars: tokens/s over all of them
# Served and engine-alone passes alternate, in ABBA order, so that the machine's drift (this VM's
# speed moves by tens of percent within a minute) hits both sides alike.
SPEED_ROUNDS = 6


async def served_speed(url, headers, texts, method, args) -> tuple[int, float, float]:
    """Each speed prompt alone, `speed_runs` times after a warm-up (its prefix then cached):
    (tokens, seconds at the client, seconds the engine accounted), summed over every run."""
    from websockets.asyncio.client import connect

    rows = []
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        for c in SPEED_PROMPTS:
            msg = {"type": "complete", **completion(texts, c, 0, args), "max_tokens": args.speed_tokens,
                   **({"method": method} if method else {})}
            await ws_request(ws, msg)
            rows += [await ws_request(ws, msg) for _ in range(args.speed_runs)]
    return (sum(r["tokens"] for r in rows), sum(r["total"] for r in rows),
            sum(r["tokens"] / r["engine_tok_s"] for r in rows if r["engine_tok_s"]))


ALONE = """
import json, sys, time
sys.path.insert(0, {root!r})
from app.backend import GenRequest
from app.engine_backend import engine_threads
from app.prompting import build_prompt
from domino_backend.engine import GenerationRequest
from domino_backend.loader import build_engine
e = build_engine({profile!r}, None, {dtype!r}, {threads!r} or engine_threads())
ids = [build_prompt(e.target.tokenizer, GenRequest(kind="fim", prefix=p["prefix"], suffix=p["suffix"]), 8192)
       for p in {prompts}]
print("ready", flush=True)
for method in sys.stdin:  # one line per pass: the method; answers [tokens, seconds]
    req = GenerationRequest(max_new_tokens={tokens}, method=method.strip())
    tokens = seconds = 0
    for prompt in ids:
        e.generate(prompt, req)
        for _ in range({runs}):
            t0 = time.perf_counter()
            tokens += len(e.generate(prompt, req).token_ids)
            seconds += time.perf_counter() - t0
    print(json.dumps([tokens, seconds]), flush=True)
"""


class EngineAlone:
    """The server's engine (same profile, dtype, threads) in a process of its own, decoding the
    speed prompts on its main thread (`python -m domino_backend bench`'s way) when asked, idle
    otherwise: a pass here and a served pass take turns while the other side waits."""

    def __init__(self, args):
        prompts = [completion(args.texts, c, 0, args) for c in SPEED_PROMPTS]
        code = ALONE.format(root=str(ROOT), profile=args.profile, dtype=args.dtype, threads=args.threads,
                            prompts=json.dumps(prompts), tokens=args.speed_tokens, runs=args.speed_runs)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        while (line := self.proc.stdout.readline()) and line.strip() != "ready":
            pass
        if not line:
            raise RuntimeError(f"the engine-alone process exited with {self.proc.wait()}")

    def speed(self, method: str) -> tuple[int, float]:
        """(tokens, seconds) of one pass over the speed prompts, `speed_runs` runs each after a warm-up."""
        self.proc.stdin.write(method + "\n")
        self.proc.stdin.flush()
        tokens, seconds = json.loads(self.proc.stdout.readline())
        return tokens, seconds

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def speed_cell(url, headers, texts, name: str, sent: str | None, method: str, alone: EngineAlone, args) -> dict:
    """Served vs engine alone, `SPEED_ROUNDS` passes each, alternating (ABBA). A round's two passes
    run back to back, so their ratio sees one machine speed: the cell's served/bench is the median
    of the rounds' ratios (`pair_ratios`); tok/s are over all passes."""
    served, engine, pairs = [0, 0.0, 0.0], [0, 0.0], []
    for r in range(SPEED_ROUNDS):
        pass_ = {}
        for side in ("served", "alone")[::1 if r % 4 in (0, 3) else -1]:
            pass_[side] = (asyncio.run(served_speed(url, headers, texts, sent, args)) if side == "served"
                           else alone.speed(method))
        served = [a + b for a, b in zip(served, pass_["served"])]
        engine = [a + b for a, b in zip(engine, pass_["alone"])]
        pairs.append((pass_["served"][0] / pass_["served"][1]) / (pass_["alone"][0] / pass_["alone"][1]))
    return {"method": name, "sent": method, "served_tok_s": served[0] / served[1],
            "served_engine_tok_s": served[0] / served[2], "bench_tok_s": engine[0] / engine[1],
            "served_vs_bench": statistics.median(pairs), "pair_ratios": pairs,
            "tokens": served[0] / (SPEED_ROUNDS * len(SPEED_PROMPTS) * args.speed_runs)}


def fmt(x, nd=0):
    return "-" if x is None else f"{x:.{nd}f}"


def table(cells: list[dict]) -> str:
    head = (f"{'method':13} {'clients':>7} {'reqs':>5} {'err':>4} {'ttft p50':>9} {'ttft p95':>9} {'total p50':>10} "
            f"{'total p95':>10} {'compl/s':>8} {'tok/s':>7} {'tok/req':>8} {'tau':>5} {'batch':>5}")
    lines = [head, "-" * len(head)]
    for c in cells:
        lines.append(f"{c['method']:13} {c['clients']:>7} {c['requests']:>5} {c['errors']:>4} {fmt(c['ttft_p50_ms']):>9} "
                     f"{fmt(c['ttft_p95_ms']):>9} {fmt(c['total_p50_ms']):>10} {fmt(c['total_p95_ms']):>10} "
                     f"{fmt(c['completions_per_s'], 2):>8} {fmt(c['tokens_per_s'], 1):>7} {fmt(c['mean_tokens'], 1):>8} "
                     f"{fmt(c['mean_tau'], 2):>5} {fmt(c.get('mean_batch'), 1):>5}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    for k, method in enumerate(report["methods"]):
        cells = [c for c in report["cells"] if c["method"] == method]
        xs, color = [c["clients"] for c in cells], f"C{k}"
        ax1.plot(xs, [c["tokens_per_s"] for c in cells], "o-", color=color, label=method)
        ax2.plot(xs, [c["ttft_p50_ms"] / 1000 for c in cells], "o-", color=color, label=f"{method} p50")
        ax2.plot(xs, [c["ttft_p95_ms"] / 1000 for c in cells], "x--", color=color, label=f"{method} p95")
    ticks = sorted({c["clients"] for c in report["cells"]})
    for ax, title in ((ax1, "completion tokens/s"), (ax2, "TTFT (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent completion clients")
        ax.set_title(title)
        ax.legend(fontsize=8)
    mixed = report.get("mixed", [])
    labels = [m["method"] for m in mixed]
    xs = range(len(mixed))
    ax3.bar([x - 0.2 for x in xs], [m["first_sentence_alone_p50_ms"] / 1000 for m in mixed], 0.4, label="alone")
    ax3.bar([x + 0.2 for x in xs], [m["first_sentence_loaded_p50_ms"] / 1000 for m in mixed], 0.4,
            label=f"with {MIXED_CLIENTS} completion clients")
    ax3.set_xticks(list(xs), labels)
    ax3.set_title("voice-like stream: first sentence p50 (s)")
    ax3.legend(fontsize=8)
    fig.suptitle(f"profile {report['profile']}, {report['threads'] or 'default'} thread(s)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def spawn(args) -> tuple[subprocess.Popen, str]:
    clients = max(args.clients)
    proc, port = spawn_server(["--profile", args.profile, "--dtype", args.dtype, "--max-active", str(args.max_active),
                               "--max-queue", str(max(64, clients))]
                              + (["--threads", str(args.threads)] if args.threads else []))
    return proc, f"ws://127.0.0.1:{port}/v1/ws"


def http_base(url: str) -> str:
    return url.replace("ws://", "http://").replace("wss://", "https://").rsplit("/v1/ws", 1)[0]


def default_method(url: str, headers: dict) -> str:
    import httpx

    return httpx.get(f"{http_base(url)}/health", headers=headers, timeout=10).json()["default_method"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8000/v1/ws")
    ap.add_argument("--spawn", action="store_true", help="start `python -m app` for the run (and measure the speed cell)")
    ap.add_argument("--profile", default="coder")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-active", type=int, default=16)
    ap.add_argument("--clients", default=[1, 4, 16], type=lambda s: [int(c) for c in s.split(",")],
                    help="concurrent completion clients per cell, comma-separated")
    ap.add_argument("--methods", default="default,ar", help="`default` = the server's default method")
    ap.add_argument("--requests", type=int, default=4, help="keystrokes per file per cell and pass")
    ap.add_argument("--passes", type=int, default=2, help="passes over the client counts, in alternating order")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--whole", action="store_true", help="completions without stop rules, up to --max-tokens")
    ap.add_argument("--context-chars", type=int, default=3500, help="prefix length at a client's first cursor")
    ap.add_argument("--voice-turns", type=int, default=6, help="voice-like turns alone and under load (0: no mixed run)")
    ap.add_argument("--speed-tokens", type=int, default=48)
    ap.add_argument("--speed-runs", type=int, default=3, help="single-request runs served and in the engine (0: none)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--plot", default=None, help="write the plot here (matplotlib)")
    args = ap.parse_args(argv)
    if args.passes * len(args.methods.split(",")) * (args.requests + 1) > MAX_KEYSTROKES:
        ap.error(f"--passes x methods x (--requests + 1) must be at most {MAX_KEYSTROKES}: the cursor would run past the texts")
    headers = {"Authorization": f"Bearer {os.environ['DOMINO_API_KEY']}"} if os.environ.get("DOMINO_API_KEY") else {}
    args.texts = texts = cursor_prompts(args.context_chars)
    if not texts:
        ap.error(f"no source file is longer than --context-chars {args.context_chars}")
    proc, url = spawn(args) if args.spawn else (None, args.url)
    cells, scaling, mixed, speed, counts, alone = [], [], [], [], {}, None
    try:
        resolved = default_method(url, headers)
        methods = [(m, None if m == "default" else m) for m in args.methods.split(",")]
        names = [f"{resolved} (default)" if sent is None else m for m, sent in methods]
        got, scales = completions_cells(url, headers, texts, [sent for _, sent in methods], args)
        for name, cs, scale in zip(names, got, scales):
            cells += [{"method": name, **c} for c in cs]
            scaling.append({"method": name, **scale})
        for name, (_, sent) in zip(names, methods):
            if args.spawn and args.speed_runs:
                alone = alone or EngineAlone(args)
                speed.append(speed_cell(url, headers, texts, name, sent, sent or resolved, alone, args))
        # Mixed cells last: after a voice turn the scheduler keeps forwards short for a while
        # (app/scheduler.py, VOICE_LIVE_S), which would slow the cells above.
        for name, (_, sent) in zip(names, methods):
            if args.voice_turns:
                mixed.append({"method": name, **asyncio.run(mixed_cell(url, headers, texts, sent, args))})
                print(json.dumps(mixed[-1]), file=sys.stderr, flush=True)
        counts = engine_counts(url, headers)
    finally:
        if alone is not None:
            alone.close()
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(table(cells))
    for s in scaling:
        print(f"{s['method']}: {s['clients']} clients / {s['vs_clients']}: {s['ratio']:.2f}x completions/s "
              f"(passes: {', '.join(f'{r:.2f}' for r in s['pass_ratios'])})")
    for m in mixed:
        print(f"{m['method']}: voice-like first sentence p50 {fmt(m['first_sentence_alone_p50_ms'])} ms alone, "
              f"{fmt(m['first_sentence_loaded_p50_ms'])} ms with {MIXED_CLIENTS} completion clients "
              f"({fmt(100 * m['growth'] if m['growth'] is not None else None)} %)")
    for s in speed:
        print(f"{s['method']}: one request served {s['served_tok_s']:.1f} tok/s, engine alone {s['bench_tok_s']:.1f} "
              f"tok/s, served/bench {s['served_vs_bench']:.2f} (median of {len(s['pair_ratios'])} paired passes, "
              f"{min(s['pair_ratios']):.2f}-{max(s['pair_ratios']):.2f})")
    report = {"profile": args.profile if args.spawn else None, "url": None if args.spawn else url,
              "dtype": args.dtype, "threads": args.threads, "max_active": args.max_active,
              "max_tokens": args.max_tokens, "context_chars": args.context_chars, "single_line": not args.whole,
              "files": max(args.clients), "keystrokes_per_file": args.requests, "passes": args.passes,
              "interleaved": True,  # methods take turns within each pass, on keystrokes of their own
              "methods": names, "cells": cells, "scaling": scaling, "mixed": mixed, "speed": speed,
              "max_batch": counts.get("domino_engine_max_batch")}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
