"""Reference client for the WebSocket API: what an IDE extension does, usable from a shell.

    python -m app.client complete FILE --line N --col M [--single-line] [--max-tokens 64]
    python -m app.client chat "How do I reverse a list in Python?"
    python -m app.client voice question.wav --out reply.wav      # the voice agent (/v1/voice)

Lines and columns are 1-based (as editors show them). Deltas stream to stdout; the `done`
summary goes to stderr. Exit status: 0 done, 1 error message from the server, 2 usage/connection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

DEFAULT_URL = "ws://127.0.0.1:8000/v1/ws"


def split_at(text: str, line: int, col: int) -> tuple[str, str]:
    """(prefix, suffix) of `text` at 1-based line/column; columns past the line end clamp to it."""
    lines = text.splitlines(keepends=True) or [""]
    if not 1 <= line <= len(lines) + 1:
        raise ValueError(f"line {line} is outside the file (1..{len(lines)})")
    if line == len(lines) + 1:
        return text, ""
    offset = sum(len(x) for x in lines[: line - 1])
    body = lines[line - 1].rstrip("\r\n")
    if col < 1:
        raise ValueError("columns start at 1")
    cut = offset + min(col - 1, len(body))
    return text[:cut], text[cut:]


def build_message(args) -> dict:
    rid = uuid.uuid4().hex[:12]
    common = {"id": rid, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.deadline_ms:
        common["deadline_ms"] = args.deadline_ms
    if args.method:
        common["method"] = args.method
    if args.cmd == "chat":
        return {"type": "chat", "messages": [{"role": "user", "content": args.message}], **common}
    path = Path(args.file)
    prefix, suffix = split_at(path.read_text(encoding="utf-8"), args.line, args.col)
    extra = [{"filename": p, "text": Path(p).read_text(encoding="utf-8")} for p in args.extra or []]
    return {"type": "complete", "prefix": prefix, "suffix": suffix, "filename": str(path),
            "language": path.suffix.lstrip(".") or None, "single_line": args.single_line, "extra": extra,
            "document": path.resolve().as_uri(), **common}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("DOMINO_URL", DEFAULT_URL))
    ap.add_argument("--token", default=os.environ.get("DOMINO_API_KEY"), help="API key (default $DOMINO_API_KEY)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--deadline-ms", type=int, default=None)
    ap.add_argument("--method", default=None, help="ar | ngram | dflash | domino | domino+ngram (default: the server's)")
    ap.add_argument("--json", action="store_true", help="print the raw server messages instead")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("complete", help="fill in the middle at a position of FILE")
    c.add_argument("file")
    c.add_argument("--line", type=int, required=True)
    c.add_argument("--col", type=int, required=True)
    c.add_argument("--single-line", action="store_true")
    c.add_argument("--extra", action="append", help="another file to send as context (repeatable)")
    ch = sub.add_parser("chat", help="ask a question")
    ch.add_argument("message")
    v = sub.add_parser("voice", help="say a WAV file (16-bit PCM) to the voice agent; print and save its answer")
    v.add_argument("wav")
    v.add_argument("--out", help="write the spoken reply to this WAV file")
    args = ap.parse_args(argv)
    if args.cmd == "voice":
        from .voice_client import run_cli

        return run_cli(args)

    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    try:
        msg = build_message(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        with connect(args.url, additional_headers=headers, max_size=None) as ws:
            ws.send(json.dumps(msg))
            while True:
                m = json.loads(ws.recv())
                if args.json:
                    print(json.dumps(m), flush=True)
                if m.get("id") not in (msg["id"], None):
                    continue
                if m["type"] == "delta" and not args.json:
                    print(m["text"], end="", flush=True)
                elif m["type"] == "error":
                    print(f"\nerror [{m['code']}]: {m['message']}", file=sys.stderr)
                    return 1
                elif m["type"] == "done":
                    t, s = m["timings"], m.get("spec") or {}
                    print(f"\n[{m['finish_reason']}, {m['usage']['completion_tokens']} tokens, ttft {t['ttft_ms']} ms, "
                          f"total {t['total_ms']} ms, {s.get('method', '?')} tau {s.get('tau', '-')}]", file=sys.stderr)
                    return 0
    except InvalidStatus as e:
        print(f"error: the server refused the connection ({e.response.status_code}); "
              "check --token and the server's --allow-origin", file=sys.stderr)
    except (OSError, WebSocketException) as e:
        print(f"error: cannot talk to {args.url}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
