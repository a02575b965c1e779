"""Side-by-side benchmark of decoding methods on the same prompts, in one process (greedy).

Methods run prompt-major (every method on prompt 1, then on prompt 2, ...) so slow drift of a shared
machine hits them alike. Reported per method: tokens/s, speedup vs `ar`, tau (mean tokens per
verify round), per-position acceptance, `lossless` = every output identical to `ar`'s and
`ar_prefix` = per prompt, how many leading tokens equal `ar`'s. Two outside references: `hf` is
Hugging Face `generate` (plain greedy) on our target, `llamacpp` is llama.cpp on the profile's own
GGUF (llamacpp.py; quantized weights, so its outputs may part from `ar`'s).
Options after the method name: `:adaptive` the cost-aware draft length (draft_length.py),
`:chain` a chain instead of the default draft tree (tree.py), e.g. `domino:chain:adaptive`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .methods import METHODS
from .engine import Engine, GenerationRequest, Stats
from .llamacpp import LlamaCpp
from .prompts import encode_record

REFERENCES = ("hf", "llamacpp")  # outside references: no drafting, no options
BENCH_METHODS = (*METHODS, *REFERENCES)
OPTIONS = ("adaptive", "chain")


def parse_method(spec: str) -> tuple[str, set[str]]:
    """"domino:chain:adaptive" -> ("domino", {"chain", "adaptive"}); options need a drafting method."""
    method, *opts = spec.split(":")
    if method not in BENCH_METHODS or (opts and method in ("ar", *REFERENCES)) or not set(opts) <= set(OPTIONS):
        raise ValueError(f"unknown method {spec!r}; choose from {', '.join(BENCH_METHODS)}, drafting methods "
                         f"also with options {', '.join(':' + o for o in OPTIONS)} (e.g. domino:chain:adaptive)")
    return method, set(opts)


@dataclass
class MethodResult:
    stats: Stats
    outputs: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def median_ms(fn, iters: int, sync=lambda: None) -> float:
    """Median milliseconds per call of `fn` after one warm-up call; `sync` waits for queued device work."""
    fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def read_prompts(path: str | Path) -> list[dict]:
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
    if not records:
        raise ValueError(f"{path} has no prompts")
    return records


def hf_generate(engine: Engine, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    t = engine.target
    eos = sorted(t.eos_ids) or None
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = t.model.generate(
            torch.tensor([ids], device=t.device), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=eos[0] if eos else None,
        )
    dt = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    cut = next((i for i, x in enumerate(new) if x in t.eos_ids), len(new))
    return new[:cut], dt


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_bench(engine: Engine, records: list[dict], methods: list[str], max_new_tokens: int,
              warmup: bool = True, max_drafts: int | None = None, gguf: Path | str | None = None) -> dict:
    """`gguf`: the file the target was built from, which `llamacpp` runs (required for it)."""
    for m in methods:
        parse_method(m)
    if "ar" not in methods:
        methods = ["ar", *methods]  # the reference for speedup and losslessness
    tok = engine.target.tokenizer
    prompts = [encode_record(tok, r) for r in records]
    llama = None
    if "llamacpp" in methods:
        if gguf is None:
            raise ValueError("the bench method llamacpp runs the GGUF of an embedded profile (--profile NAME)")
        llama = LlamaCpp(gguf, n_ctx=max(map(len, prompts)) + max_new_tokens + 1, threads=torch.get_num_threads())
    results = {m: MethodResult(Stats(method=m)) for m in methods}
    if warmup:  # first calls pay one-off allocation / kernel selection costs
        for m in methods:
            run_one(engine, prompts[0], m, 8, max_drafts, llama)
    for ids in tqdm(prompts, desc="bench", unit="prompt"):
        for m in methods:
            toks, stats = run_one(engine, ids, m, max_new_tokens, max_drafts, llama)
            r = results[m]
            r.outputs.append(toks)
            r.texts.append(tok.decode(toks, skip_special_tokens=True))
            r.stats.merge(stats)
    ref = results["ar"]
    report = {"max_new_tokens": max_new_tokens, "max_drafts": max_drafts, "num_prompts": len(prompts),
              "methods": {}, "speedup": {}, "lossless": {}, "ar_prefix": {}}
    for m, r in results.items():
        report["methods"][m] = {**r.stats.to_dict(), "outputs": r.texts, "output_ids": r.outputs}
        report["speedup"][m] = r.stats.tokens_per_s / ref.stats.tokens_per_s if ref.stats.tokens_per_s else 0.0
        report["lossless"][m] = r.outputs == ref.outputs
        report["ar_prefix"][m] = [common_prefix(a, b) for a, b in zip(r.outputs, ref.outputs)]
    if llama is not None:
        texts = [tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in prompts]
        report["llamacpp"] = {"version": llama.version, "gguf": llama.gguf, "threads": llama.threads,
                              "same_prompt_tokens": sum(map(llama.same_tokens, texts, prompts))}
    return report


def run_one(engine: Engine, ids: list[int], method: str, max_new_tokens: int,
            max_drafts: int | None = None, llama: LlamaCpp | None = None) -> tuple[list[int], Stats]:
    # Every method pays its own prefill: the engine's prefix cache would hand the KV snapshot of
    # the first method run on a prompt to the next ones, flattering their speed by the prefill
    # time (each method's `prefill_s` in the report).
    if engine.prefix_cache is not None:
        engine.prefix_cache.clear()
    if method == "hf":
        toks, dt = hf_generate(engine, ids, max_new_tokens)
        return toks, Stats(method="hf", new_tokens=len(toks), total_s=dt)
    if method == "llamacpp":
        return llama.generate(ids, max_new_tokens, engine.target.eos_ids)
    base, opts = parse_method(method)
    gen = engine.generate(ids, GenerationRequest(max_new_tokens=max_new_tokens, method=base, max_drafts=max_drafts,
                                                 adaptive_drafts="adaptive" in opts, draft_tree="chain" not in opts))
    return gen.token_ids, gen.stats


def format_table(report: dict) -> str:
    w = max(8, *(len(m) for m in report["methods"]))
    rows = [f"{'method':<{w}} {'tok/s':>8} {'speedup':>8} {'tau':>6} {'lossless':>9}  per-position acceptance (1..)"]
    for m, r in report["methods"].items():
        acc = " ".join(f"{a:.2f}" for a in r["per_position_acceptance"][:16])
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        rows.append(f"{m:<{w}} {r['tokens_per_s']:>8.2f} {report['speedup'][m]:>7.2f}x {tau:>6} "
                    f"{str(report['lossless'][m]):>9}  {acc}")
    if "llamacpp" in report:
        prefix, info = report["ar_prefix"]["llamacpp"], report["llamacpp"]
        same = sum(o == a for o, a in zip(report["methods"]["llamacpp"]["output_ids"],
                                          report["methods"]["ar"]["output_ids"]))
        rows.append(f"llamacpp {info['version']} on {info['gguf']}: {same}/{len(prefix)} outputs identical to ar's, "
                    f"mean identical prefix {sum(prefix) / len(prefix):.1f} tokens; prompt tokenized like ours "
                    f"{info['same_prompt_tokens']}/{len(prefix)}")
    return "\n".join(rows)
