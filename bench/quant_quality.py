"""How close the int8 target is to the bf16 one: perplexity on held-out code and chat text, and the
share of held-out greedy completions that are token-identical, and how far the int8 next-token
distribution is from the bf16 one along bf16's own greedy replies (mean KL divergence, nats per
token, and top-1 agreement: what llama.cpp's `perplexity --kl-divergence` reports for its quants).

Both models are built from the same safetensors (the profile's GGUF, de-quantized once) in one
process; the int8 one is `--quant int8` (domino_backend/quant.py). Perplexity: teacher-forced
next-token loss over each prompt's text (code: the file excerpt, or prefix + suffix; chat: the
chat template: mostly the user's words), at most 1024 tokens each. Greedy: `ar`, 64 new tokens per
prompt; the replies of bf16 are the text the divergence is measured on.

    python bench/quant_quality.py            # ~5 min on 2 cores, writes bench/results/quant_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from domino_backend.bench import common_prefix, encode_record, read_prompts
from domino_backend.engine import GenerationRequest
from domino_backend.loader import build_engine

ROOT = Path(__file__).resolve().parent


def perplexity(model, prompts: list[list[int]], max_len: int) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor(ids[:max_len])[None]
            logits = model(x).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += x.shape[1] - 1
    return math.exp(nll / n)


def divergence(ref, model, prompts: list[list[int]], replies: list[list[int]]) -> tuple[float, float]:
    """Mean KL(ref || model) per reply token and the share of reply tokens where both argmaxes agree."""
    kl, same, n = 0.0, 0, 0
    with torch.inference_mode():
        for ids, reply in zip(prompts, replies):
            x = torch.tensor(ids + reply)[None]
            span = slice(len(ids) - 1, x.shape[1] - 1)  # the positions that predict the reply
            p, q = (m(x).logits[0, span].float().log_softmax(-1) for m in (ref, model))
            kl += (p.exp() * (p - q)).sum().item()
            same += (p.argmax(-1) == q.argmax(-1)).sum().item()
            n += len(reply)
    return kl / max(n, 1), same / max(n, 1)


def greedy(engine, prompts: list[list[int]], new_tokens: int, label: str) -> list[list[int]]:
    return [engine.generate(ids, GenerationRequest(max_new_tokens=new_tokens, method="ar")).token_ids
            for ids in tqdm(prompts, desc=f"greedy {label}", leave=False)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="coder")
    p.add_argument("--sets", default="code,chat", help="bench/heldout_SET.jsonl files")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--greedy-prompts", type=int, default=8, help="per set")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "results" / "quant_quality.json"))
    a = p.parse_args()
    t0 = time.perf_counter()
    engines = {q: build_engine(a.profile, "none", "auto", a.threads, quant=q) for q in ("none", "int8")}
    tok = engines["none"].target.tokenizer
    report = {"profile": a.profile, "dtype": str(engines["none"].target.dtype).removeprefix("torch."),
              "max_len": a.max_len, "new_tokens": a.new_tokens, "sets": []}
    for name in a.sets.split(","):
        records = read_prompts(ROOT / f"heldout_{name}.jsonl")
        prompts = [encode_record(tok, r) for r in records]
        ppl = {q: perplexity(e.target.model, prompts, a.max_len) for q, e in engines.items()}
        gp = prompts[: a.greedy_prompts]
        outs = {q: greedy(e, gp, a.new_tokens, q) for q, e in engines.items()}
        prefix = [common_prefix(x, y) for x, y in zip(outs["none"], outs["int8"])]
        kld, top1 = divergence(engines["none"].target.model, engines["int8"].target.model, gp, outs["none"])
        row = {
            "set": name,
            "prompts": len(prompts),
            "tokens": sum(min(len(x), a.max_len) - 1 for x in prompts),
            "ppl_bf16": round(ppl["none"], 4),
            "ppl_int8": round(ppl["int8"], 4),
            "ppl_change_pct": round(100 * (ppl["int8"] / ppl["none"] - 1), 2),
            "greedy_prompts": len(gp),
            "greedy_identical": sum(x == y for x, y in zip(outs["none"], outs["int8"])) / len(gp),
            "greedy_mean_common_prefix": sum(prefix) / len(gp),
            "reply_kld": round(kld, 5),
            "reply_top1": round(top1, 4),
        }
        report["sets"].append(row)
        print(json.dumps(row), flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
