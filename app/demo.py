"""`python -m app --demo` — the console demo on the embedded default model (no network needed).

Streams a chat answer and a fill-in-the-middle completion with speculative decoding and with plain
decoding, and prints the speed and acceptance of each.
"""

from __future__ import annotations

import argparse
import sys

from domino_backend.engine import GenerationRequest
from domino_backend.loader import build_engine
from domino_backend.models import DEFAULT_PROFILE, PROFILES
from domino_backend.prompts import encode, fim_template

DEMOS = [
    ("chat", dict(messages=[{"role": "user", "content": "In two sentences: what is speculative decoding?"}])),
    ("fim", dict(prefix="def mean(values):\n    \"\"\"Arithmetic mean of a non-empty list.\"\"\"\n    ",
                 suffix="\n\n\nprint(mean([1, 2, 3]))\n")),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app --demo", description=__doc__)
    ap.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
    ap.add_argument("--draft", default=None, help="drafter checkpoint (default: the profile's)")
    ap.add_argument("--methods", default="domino+ngram,domino,ngram,ar", help="methods to show side by side")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    engine = build_engine(args.profile, args.draft)
    tok = engine.target.tokenizer
    for name, spec in DEMOS:
        if name == "fim" and fim_template(tok) is None:
            continue
        ids = encode(tok, **spec)
        for method in args.methods.split(","):
            print(f"\n=== {name} / {method} ===", flush=True)
            gen = engine.stream(ids, GenerationRequest(max_new_tokens=args.max_new_tokens, method=method))
            for delta in gen:
                print(delta, end="", flush=True)
            s = gen.stats
            print(f"\n[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, tau {s.tau:.2f}, finish {gen.finish_reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
