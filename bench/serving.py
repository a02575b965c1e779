"""Start `python -m app` for a benchmark and wait until it serves (shared by the serving benches)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(args: list[str], cwd: Path = ROOT, timeout_s: float = 900, port: int | None = None,
                 **popen) -> tuple[subprocess.Popen, int]:
    """`python -m app --no-ui --log-level warning ARGS` on `port` (default: a free loopback port),
    once /health is 200. Returns (process, port); kills it and raises RuntimeError if it exits or
    does not get ready. A fixed port lets a test restart a server in place."""
    import httpx

    port = port or free_port()
    cmd = [sys.executable, "-m", "app", "--port", str(port), "--no-ui", "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, **popen)
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
            proc.kill()
            raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
        time.sleep(0.3)
