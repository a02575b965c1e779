"""`python -m domino_backend serve-sglang`: build (and run) the SGLang launch command for a drafter.

The command is SGLang's own server (`python -m sglang.launch_server`) in DFLASH mode with our
drafter as the draft model; the `domino` plugin (installed with this package, entry point
`sglang.srt.plugins`) is picked up by every SGLang process automatically. The server speaks the
OpenAI API at http://HOST:PORT/v1, which is what `python -m app --backend-url` takes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from .upstream import SGLANG_VERSION


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="target model: Hugging Face folder or hub id (e.g. Qwen/Qwen3-8B)")
    p.add_argument("--draft", required=True, help="Domino/DFlash drafter folder or hub id (e.g. Huang2020/Qwen3-8B-Domino-b16)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per replica (--tp-size)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (--dp-size); DFLASH refuses DP *attention*")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16"], help="SGLang's Domino path requires bf16")
    p.add_argument("--block-size", type=int, default=None,
                   help="verify window (--speculative-num-draft-tokens); default: the drafter's block_size")
    p.add_argument("--candidate-pool", type=int, default=0,
                   help="--speculative-domino-candidate-pool-size: 0 = exact full-vocabulary scoring (default), "
                        "2048 = SGLang's approximate default")
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--attention-backend", default=None, help="e.g. flashinfer, fa3, triton")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-plugin", action="store_true",
                   help="serve with upstream SGLang only (sets SGLANG_PLUGINS to a name that matches nothing)")
    p.add_argument("--sampling", action="store_true",
                   help="enable the plugin's temperature>0 Domino drafting (DOMINO_SGLANG_SAMPLING=1; GPU-unverified)")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, do not start SGLang")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after `--`: more sglang.launch_server flags, passed through")


def build_command(args: argparse.Namespace, python: str | None = None) -> list[str]:
    cmd = [python or sys.executable, "-m", "sglang.launch_server",
           "--model-path", args.target,
           "--speculative-algorithm", "DFLASH",
           "--speculative-draft-model-path", args.draft,
           "--speculative-domino-candidate-pool-size", str(args.candidate_pool),
           "--dtype", args.dtype,
           "--host", args.host, "--port", str(args.port)]
    if args.block_size is not None:
        cmd += ["--speculative-num-draft-tokens", str(args.block_size)]
    if args.tp != 1:
        cmd += ["--tp-size", str(args.tp)]
    if args.dp != 1:
        cmd += ["--dp-size", str(args.dp)]
    if args.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(args.mem_fraction_static)]
    if args.max_running_requests is not None:
        cmd += ["--max-running-requests", str(args.max_running_requests)]
    if args.attention_backend:
        cmd += ["--attention-backend", args.attention_backend]
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    extra = list(args.extra or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    return cmd + extra


def build_env(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    if args.no_plugin:
        env["SGLANG_PLUGINS"] = "none"
    else:
        env["SGLANG_PLUGINS"] = "domino"
        if args.sampling:
            env["DOMINO_SGLANG_SAMPLING"] = "1"
        if args.candidate_pool:
            env["DOMINO_SGLANG_EXACT"] = "0"  # keep the requested pool where upstream handles it
    return env


def check_draft(draft: str) -> list[str]:
    """Problems SGLang would hit with a local drafter folder (hub ids are checked by SGLang)."""
    path = Path(draft).expanduser()
    if not path.is_dir():
        return []
    from .export import sglang_problems

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        return [f"{path} has no config.json"]
    return sglang_problems(json.loads(cfg_file.read_text()))


def main(args: argparse.Namespace) -> int:
    problems = check_draft(args.draft)
    if problems:
        print("error: the drafter is not SGLang-compatible: " + "; ".join(problems)
              + "\n  fix: python -c 'from domino_backend.sglang.export import export_for_sglang as e; "
              f"e(\"{args.draft}\", \"<out>\")'", file=sys.stderr)
        return 2
    cmd = build_command(args)
    env = build_env(args)
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd)
    print(shown.strip())
    print(f"# OpenAI-compatible endpoint: http://{args.host}:{args.port}/v1  "
          f"(python -m app --backend-url http://{args.host}:{args.port}/v1)", file=sys.stderr)
    if args.dry_run:
        return 0
    if importlib.util.find_spec("sglang") is None:
        print(f"error: sglang is not installed here; on a CUDA machine: pip install 'domino[sglang]' "
              f"(sglang=={SGLANG_VERSION}), then rerun", file=sys.stderr)
        return 2
    return subprocess.call(cmd, env={**os.environ, **env})
