"""`python -m app` — serve Domino: WebSocket completion API, OpenAI-compatible HTTP, /metrics, /health.

    python -m app                                # embedded coder model on http://127.0.0.1:8000
    python -m app --profile tiny --port 9000     # the small SmolLM2 profile
    python -m app --backend-url http://gpu:30000/v1   # front any OpenAI-compatible server
    python -m app --demo [--profile tiny]        # the console demo (no server)

The API key comes from --api-key or $DOMINO_API_KEY (prefer the variable: flags show up in `ps`).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from domino_backend import settings as engine_settings
from domino_backend.methods import METHODS
from domino_backend.models import DEFAULT_PROFILE, PROFILES
from domino_backend.quant import QUANT_MODES

from .config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig


def parser() -> argparse.ArgumentParser:
    d = ServerConfig.model_fields
    ap = argparse.ArgumentParser(prog="python -m app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", action="store_true", help="run the console demo instead of the server")
    g = ap.add_argument_group("network")
    g.add_argument("--host", default=DEFAULT_HOST, help="bind address (default loopback only)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT)
    g.add_argument("--no-ui", action="store_true", help="serve the APIs alone, without the browser UI at /")
    g = ap.add_argument_group("model")
    g.add_argument("--profile", default=None, choices=sorted(PROFILES), help=f"embedded target (default {DEFAULT_PROFILE})")
    g.add_argument("--target", default=None, help="Hugging Face causal-LM folder or hub id instead of a profile")
    g.add_argument("--draft", default=None, help="drafter checkpoint; 'none' = ar/ngram only")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    g.add_argument("--quant", default="auto", choices=QUANT_MODES,
                   help="target weights: int8, none (as loaded), auto: int8 where the int8 CPU kernel runs")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--method", default=d["method"].default, choices=("auto", *METHODS),
                   help="default decoding method (auto: with a trained drafter domino on a GPU, domino+ngram on a "
                        "CPU; without one adaptive ngram)")
    g.add_argument("--backend-url", default=None, help="use a remote OpenAI-compatible server instead of the engine")
    g.add_argument("--backend-model", default=None, help="model name for the remote (default: its first)")
    g = ap.add_argument_group("scheduling and limits")
    for name in ("max_active", "max_queue", "max_tokens_in_flight", "max_message_bytes", "max_prompt_tokens",
                 "max_tokens_limit", "default_max_tokens", "max_inflight_per_connection"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=d[name].default)
    g = ap.add_argument_group("security")
    g.add_argument("--api-key", default=None, help="require this key (default: $DOMINO_API_KEY, else no key)")
    g.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="browser Origin allowed to connect (repeat; '*' = any). Default: localhost, 127.0.0.1, "
                        "VS Code webviews")
    g.add_argument("--allow-host", action="append", default=None, metavar="NAME",
                   help="Host name served besides loopback names (repeat; '*' = any). Bound to loopback, other "
                        "names are refused (DNS rebinding); bound beyond it, any name unless some are given")
    engine_settings.add_arguments(ap)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--demo" in argv:
        from .demo import main as demo

        return demo([a for a in argv if a != "--demo"])
    a = parser().parse_args(argv)
    kw = dict(
        host=a.host, port=a.port, ui=not a.no_ui, target=a.target or a.profile or DEFAULT_PROFILE, draft=a.draft, dtype=a.dtype, quant=a.quant,
        threads=a.threads, method=a.method, engine=engine_settings.from_args(a), backend_url=a.backend_url, backend_model=a.backend_model,
        max_active=a.max_active, max_queue=a.max_queue, max_tokens_in_flight=a.max_tokens_in_flight,
        max_message_bytes=a.max_message_bytes,
        max_prompt_tokens=a.max_prompt_tokens, max_tokens_limit=a.max_tokens_limit,
        default_max_tokens=a.default_max_tokens, max_inflight_per_connection=a.max_inflight_per_connection,
        api_key=a.api_key, log_level=a.log_level,
    )
    if a.allow_origin:
        kw["allowed_origins"] = a.allow_origin
    if a.allow_host:
        kw["allowed_hosts"] = a.allow_host
    try:
        cfg = ServerConfig.with_env(**kw)
    except ValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"[domino] WARNING: listening on {cfg.host} without an API key; anyone who can reach this port "
              "can use the model. Set DOMINO_API_KEY.", file=sys.stderr)
    from .server import run

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
