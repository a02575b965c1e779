"""Replay: tau of draft trees of several sizes against the chain, on held-out prompts (greedy).

Greedy output is plain decoding's, so each prompt's `ar` output is the only continuation to check:
one teacher-forced target pass gives the drafter's features at every position, then at each
anchor position the shipped drafter drafts a chain (head rollout) and trees of N nodes (tree.grow),
and the accepted length is counted against the true continuation. Rounds are replayed from those
lengths (a round that accepts a advances a + 1 tokens). No timing: verify cost per node is a
property of the machine (bench/run_heldout.sh measures speed).

    python bench/tree_replay.py                       # 8 code + 4 chat prompts, plot to docs/img
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from domino_backend.bench import read_prompts
from domino_backend.drafters import BlockProposer
from domino_backend.engine import GenerationRequest
from domino_backend.head import rollout
from domino_backend.loader import build_engine
from domino_backend.prompts import encode_record
from domino_backend.sampling import SamplingParams
from domino_backend.settings import TreeConfig
from domino_backend.tree import DraftTree, follow, grow


def accepted(tree, truth: list[int]) -> int:
    """Drafts accepted from `tree` when the target's greedy continuation is `truth`: the target's
    pick after a row of depth d is truth[d] while its branch is right."""
    return len(follow(tree, [truth[d] if d < len(truth) else -1 for d in tree.depths])) - 1


def replay(lengths: list[int]) -> tuple[int, int]:
    """(rounds, tokens) of decoding with these per-position accepted lengths."""
    p = rounds = made = 0
    while p < len(lengths):
        rounds += 1
        made += lengths[p] + 1
        p += lengths[p] + 1
    return rounds, made


@torch.inference_mode()
def run(group: str, limit: int, sizes: list[int], max_new_tokens: int, engine) -> dict:
    t, m = engine.target, engine.draft
    k, beam = m.cfg.num_drafts, TreeConfig().beam
    prompts = [encode_record(t.tokenizer, r) for r in read_prompts(f"bench/heldout_{group}.jsonl")][:limit]
    totals = {name: [0, 0] for name in ["chain"] + [f"tree{n}" for n in sizes]}
    for ids in tqdm(prompts, desc=group, unit="prompt"):
        out = engine.generate(ids, GenerationRequest(max_new_tokens=max_new_tokens, method="ar")).token_ids
        full = ids + out
        feats = t.session().forward(torch.tensor(full), m.cfg.target_layer_ids, keep_last=1, prefill=True).feats
        drafter = BlockProposer(m, t, use_head=True)
        drafter.commit(ids, feats[:len(ids)])
        lengths = {name: [] for name in totals}
        for p in range(len(ids), len(full) - 1):  # anchor full[p], its context full[:p]
            z, base = drafter.draft_slots(full[p], p, k)
            truth = full[p + 1:p + 1 + k]
            chain, _ = rollout(m, z, base, torch.tensor([full[p]]), t.embed, SamplingParams())
            lengths["chain"].append(accepted(DraftTree(chain[0], list(range(k))), truth))
            for n in sizes:
                lengths[f"tree{n}"].append(accepted(grow(m, z[0], base[0], full[p], t.embed, n, beam), truth))
            drafter.commit([full[p]], feats[p:p + 1])
        for name, arr in lengths.items():
            r, made = replay(arr)
            totals[name][0] += r
            totals[name][1] += made
    return {name: made / r for name, (r, made) in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4,8,12,16,24")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json", default="bench/results/tree_replay.json")
    ap.add_argument("--plot", default="docs/img/tree-replay.png")
    a = ap.parse_args()
    torch.set_num_threads(2)
    engine = build_engine("coder", None, "auto")
    sizes = [int(x) for x in a.sizes.split(",")]
    res = {g: run(g, n, sizes, a.max_new_tokens, engine) for g, n in (("code", 8), ("chat", 4))}
    for g, r in res.items():
        print(g, "  ".join(f"{name} tau {tau:.3f}" for name, tau in r.items()))
    with open(a.json, "w") as f:
        json.dump({"num_drafts": engine.draft.cfg.num_drafts, "sizes": sizes, "tau": res}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for g, r in res.items():
        line, = ax.plot(sizes, [r[f"tree{n}"] for n in sizes], marker="o", label=f"{g}: tree")
        ax.axhline(r["chain"], color=line.get_color(), ls="--", lw=1,
                   label=f"{g}: chain of {engine.draft.cfg.num_drafts}")
    ax.set_xlabel("tree nodes verified per round")
    ax.set_ylabel("tau (tokens per round)")
    ax.set_title("Held-out greedy replay, shipped coder drafter")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)


if __name__ == "__main__":
    main()
