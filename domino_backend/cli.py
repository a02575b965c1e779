"""`python -m domino_backend generate|bench|serve-sglang` — stream a completion, benchmark methods side by side,
or launch SGLang on GPU with a drafter."""

from __future__ import annotations

import argparse
import json
import sys

from .bench import BENCH_METHODS, format_table, read_prompts, run_bench
from .methods import METHODS, resolve
from . import settings as engine_settings
from .engine import GenerationRequest
from .loader import build_engine
from .models import DEFAULT_PROFILE, PROFILES, profile_gguf
from .quant import QUANT_MODES, weight_format
from .prompts import encode


def _add_model_args(p: argparse.ArgumentParser) -> None:
    # Models
    p.add_argument("--profile", default=None, choices=sorted(PROFILES),
                   help=f"embedded target model (default {DEFAULT_PROFILE}); same as --target NAME")
    p.add_argument("--target", default=None, help="profile name, Hugging Face model folder or hub id")
    p.add_argument("--draft", default=None,
                   help="drafter checkpoint folder or hub id; 'none' for ar/ngram only (default: the profile's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto: bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--quant", default="auto", choices=QUANT_MODES,
                   help="target weights: int8 (weights and activations, lossless w.r.t. the int8 model), "
                        "none (as loaded), auto: int8 where the int8 CPU kernel runs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    engine_settings.add_arguments(p)


def _engine(args):
    target = args.target or args.profile or DEFAULT_PROFILE
    return build_engine(target, args.draft, dtype=args.dtype, threads=args.threads,
                        settings=engine_settings.from_args(args), quant=args.quant)


def cmd_generate(args) -> int:
    engine = _engine(args)
    ids = encode(engine.target.tokenizer, prompt=args.prompt, chat=args.chat)
    req = GenerationRequest(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop=args.stop, seed=args.seed,
                            method=resolve(args.method, engine.draft, not engine.placeholder_draft,
                                           engine.target.device.type == "cuda", engine.settings.adaptive_drafts))
    gen = engine.stream(ids, req)
    for delta in gen:
        sys.stdout.write(delta)
        sys.stdout.flush()
    s = gen.stats
    acc = " ".join(f"{a:.2f}" for a in s.per_position_acceptance)
    print(f"\n--- {s.method}: {s.new_tokens} tokens in {s.total_s:.2f}s ({s.tokens_per_s:.1f} tok/s), "
          f"finish={gen.finish_reason}, rounds={s.rounds}, tau={s.tau:.2f}, "
          f"draft {s.draft_s:.2f}s / verify {s.verify_s:.2f}s / prefill {s.prefill_s:.2f}s\n"
          f"    per-position acceptance: {acc or '-'}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    engine = _engine(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    records = read_prompts(args.prompts)[: args.limit]
    target = args.target or args.profile or DEFAULT_PROFILE
    gguf = profile_gguf(target) if "llamacpp" in methods and target in PROFILES else None
    report = run_bench(engine, records, methods, args.max_new_tokens, max_drafts=engine.settings.max_drafts,
                       gguf=gguf)
    report["target"] = target
    report["prompts"] = args.prompts
    report["draft"] = args.draft
    report["dtype"] = str(engine.target.dtype).removeprefix("torch.")
    report["quant"] = weight_format(engine.target.model)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="domino", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="stream one completion and print its stats")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--method", default="auto", choices=("auto", *METHODS),
                   help="auto: what the server would pick for this engine (methods.resolve)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    _add_model_args(g)
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="run methods side by side on a JSONL prompt file (greedy)")
    b.add_argument("--prompts", required=True, help='JSONL: {"prompt"} | {"messages"} | {"prefix","suffix"}')
    b.add_argument("--methods", default="ar,ngram,dflash,domino",
                   help=f"comma list of {', '.join(BENCH_METHODS)}; options :adaptive, :chain (e.g. domino:chain:adaptive)")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--json", default=None, help="write the full report here")
    b.add_argument("--limit", type=int, default=None, help="only the first N prompts of the file")
    _add_model_args(b)
    b.set_defaults(fn=cmd_bench)

    from .sglang import launch as sglang_launch  # no sglang import: only builds the command

    s = sub.add_parser("serve-sglang", help="build and run the SGLang (GPU) server command for a drafter")
    sglang_launch.add_arguments(s)
    s.set_defaults(fn=sglang_launch.main)

    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, RuntimeError) as e:  # user-facing errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
