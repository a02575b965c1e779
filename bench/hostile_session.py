"""Memory under a hostile session: the server's RSS while a client sends oversized prompts (1 MiB
bodies and frames, prompts just under the character bound that are refused by their token count)
and malformed input, round after round, over HTTP and the WebSocket. (Oversized FIM requests are
not refused but trimmed to the limit and served, so they are not part of it: a maximal prefill
costs what it costs.)

    python bench/hostile_session.py --profile tiny --rounds 10

Starts `python -m app` (the real model) on a free loopback port, warms it up with a few normal
requests, then prints RSS after each round. Prompts over `--max-prompt-tokens` x 16 characters are
refused before tokenizing, so RSS should stay flat; `--repo DIR` runs another checkout's server
for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import free_port, spawn_server  # noqa: E402

# Realistic text (3-5 characters per token), so a prompt under the character bound is tokenized.
CODE = "def handler(request, *args):\n    value = request.get('key', 0) + len(args)\n    return value * 2\n"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start(repo: Path, profile: str, port: int) -> subprocess.Popen:
    proc, _ = spawn_server(["--profile", profile, "--method", "ar"], cwd=repo, timeout_s=600, port=port,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONPATH": str(repo)})
    return proc


def hostile_round(url: str, ws_url: str, char_bound: int) -> dict:
    """One round of hostile input; returns {answer code: count}."""
    huge = (CODE * (960_000 // len(CODE)))  # under 1 MiB as a JSON body or frame (line breaks escaped)
    under_bound = (CODE * (char_bound // len(CODE) + 1))[:char_bound]  # refused by its token count
    seen: dict[str, int] = {}

    def note(code):
        seen[code] = seen.get(code, 0) + 1

    def post(http: httpx.Client, path: str, **kw) -> None:
        try:
            r = http.post(path, **kw)
        except httpx.HTTPError as e:
            return note(f"no answer ({type(e).__name__})")
        try:
            note(r.json().get("error", {}).get("code", str(r.status_code)))
        except ValueError:
            note(f"{r.status_code} (not JSON)")

    with httpx.Client(base_url=url, timeout=120) as http:
        for prompt in (huge, under_bound):
            post(http, "/v1/completions", json={"prompt": prompt, "max_tokens": 4})
            post(http, "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}]})
        for raw in ('{"prompt": "a\\ud800", "max_tokens": 2}', '{"prompt": "x", "seed": 18446744073709551616}',
                    '{"prompt": "x", "top_p": 1e-300, "temperature": 1}', '{"prompt": 1' + "0" * 4300 + "}"):
            post(http, "/v1/completions", content=raw, headers={"content-type": "application/json"})
    with connect(ws_url, max_size=None) as ws:
        frames = [json.dumps({"type": "chat", "id": "h", "messages": [{"role": "user", "content": huge}]}),
                  json.dumps({"type": "chat", "id": "u", "messages": [{"role": "user", "content": under_bound}]}),
                  '{"type": "ping", "id": "\\ud83d"}', '{"type": "ping", "n": 1' + "0" * 4300 + "}"]
        for f in frames:
            try:
                ws.send(f)
                while (m := json.loads(ws.recv(timeout=60)))["type"] == "delta":
                    pass
            except (TimeoutError, ConnectionClosed):
                note("no answer")  # the connection went silent or died: the rest of its frames are moot
                break
            note(m.get("code") or m["type"])
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose server to run (default: this one)")
    ap.add_argument("--max-prompt-tokens", type=int, default=8192, help="the server's default (for the bound)")
    a = ap.parse_args(argv)
    port = free_port()
    url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws"
    proc = start(a.repo, a.profile, port)
    try:
        with connect(ws_url) as ws:  # warm up: tokenizer, allocator, one generation per API
            ws.send(json.dumps({"type": "complete", "id": "w", "prefix": CODE, "max_tokens": 8}))
            while json.loads(ws.recv(timeout=120))["type"] != "done":
                pass
        httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 8}, timeout=120)
        before = rss_mb(proc.pid)
        print(f"RSS after warm-up: {before:.0f} MB")
        for i in range(a.rounds):
            seen = hostile_round(url, ws_url, a.max_prompt_tokens * 16 - 1)
            print(f"round {i + 1}: RSS {rss_mb(proc.pid):.0f} MB  answers {seen}", flush=True)
        after = rss_mb(proc.pid)
        assert httpx.get(url + "/health").status_code == 200
        print(f"RSS before {before:.0f} MB, after {a.rounds} hostile rounds {after:.0f} MB ({after - before:+.0f} MB)")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
