"""`python -m domino_backend.training STEP` — one command per pipeline step, each resumable:

  prompts   build code (stdlib prefixes + FIM holes, held-out split by file) and chat prompts
  heldout   write the held-out prompts as `bench` JSONL files (code, chat)
  source    bulk records cut from real source files of the train split (no generation needed)
  generate  regenerate responses with the target (greedy + sampled), appending to a JSONL file
  capture   teacher-forced target pass, caching the drafter's input features (memory-mapped)
  label     the target's greedy next token at every captured position (for --target-labels)
  train     train a drafter; checkpoints + resume, log.jsonl, curves.png, final/ in the public layout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cpu import cpu_has_fast_bf16, pack_linears, pin_mkl_avx2_on_amd
from ..loader import cpu_draft_config, resolve_dtype
from ..models import load_target, mask_token_id
from ..target import Target


def bf16_step(choice: str) -> bool:
    return choice == "on" or (choice == "auto" and cpu_has_fast_bf16())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m domino_backend.training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-code", type=int, default=1200)
    p.add_argument("--n-chat", type=int, default=300)
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    h = sub.add_parser("heldout")
    h.add_argument("--prompts", type=Path, required=True)
    h.add_argument("--out", type=Path, required=True, help="folder for heldout_code.jsonl / heldout_chat.jsonl")
    h.add_argument("--limit", type=int, default=24, help="prompts per file")
    for name in ("source", "generate", "capture", "label", "train"):
        s = sub.add_parser(name)
        s.add_argument("--target", default="coder", help="profile, HF folder or hub id")
        s.add_argument("--dtype", default="float32")
        s.add_argument("--threads", type=int, default=None)
    r = sub.choices["source"]
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("-n", type=int, default=2000, help="windows (one per file)")
    r.add_argument("--window", type=int, default=512, help="tokens per window")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--holdout", type=float, default=0.1, help="must match the prompts step")
    r.add_argument("--fim-frac", type=float, default=0.0, help="share of fill-in-the-middle records")
    r.add_argument("--id-base", type=int, default=1_000_000, help="first record id (keep files disjoint)")
    g = sub.choices["generate"]
    g.add_argument("--prompts", type=Path, required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--sample-frac", type=float, default=0.3)
    g.add_argument("--split", default="train", help="held-out prompts are kept for the benchmark")
    g.add_argument("--limit", type=int, default=None, help="the first N prompts of the split")
    c = sub.choices["capture"]
    c.add_argument("--records", type=Path, nargs="+", required=True,
                   help="record files, interleaved evenly (ids must be disjoint)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--split", default="train")
    c.add_argument("--num-feature-layers", type=int, default=5)
    lb = sub.choices["label"]
    lb.add_argument("--data", type=Path, required=True, help="capture folder")
    lb.add_argument("--top-tokens", type=int, default=16384, help="score the N most frequent tokens; 0 = all")
    t = sub.choices["train"]
    t.add_argument("--data", type=Path, nargs="+", required=True,
                   help="capture folder(s) of this target, trained on as one dataset")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--lr", type=float, default=6e-4)
    t.add_argument("--num-anchors", type=int, default=32)
    t.add_argument("--block-size", type=int, default=16)
    t.add_argument("--draft-layers", type=int, default=2)
    t.add_argument("--gru-hidden", type=int, default=256)
    t.add_argument("--emb-dim", type=int, default=64)
    t.add_argument("--draft-vocab", type=int, default=None,
                   help="score only the N most frequent tokens of the data (CPU speed); default: full vocabulary")
    t.add_argument("--no-head", action="store_true", help="DFlash ablation")
    t.add_argument("--no-curriculum", action="store_true", help="lambda = 0 from the start")
    t.add_argument("--lambda-decay-ratio", type=float, default=1.0)
    t.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for the step; auto = on where the CPU has native bf16 (faster "
                        "there, same losses), off elsewhere (emulated bf16 is slower than fp32)")
    t.add_argument("--init", default=None, help="warm start from an exported drafter folder of the same shape")
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--target-labels", action="store_true",
                   help="supervise with the target's greedy tokens (run the `label` step first)")
    args = ap.parse_args(argv)
    pin_mkl_avx2_on_amd()  # before the first BLAS call (cpu.py)

    if args.step == "prompts":
        from .data import build_prompts

        path = build_prompts(args.out, args.n_code, args.n_chat, args.seed, args.holdout)
        print(f"wrote {sum(1 for _ in path.open())} prompts to {path}")
        return 0
    if args.step == "heldout":
        from .data import write_heldout_bench

        for group, path in write_heldout_bench(args.prompts, args.out, args.limit).items():
            print(f"{group}: {sum(1 for _ in path.open())} prompts -> {path}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_target(args.target, dtype=resolve_dtype(args.dtype))
    pack_linears(model)  # inference passes (generate/capture/label, no-grad parts of train): oneDNN
    if args.step == "source":
        from .data import source_records

        path = source_records(tok, args.out, args.n, args.seed, args.holdout, args.window, id_base=args.id_base,
                              fim_frac=args.fim_frac)
        print(f"wrote {sum(1 for _ in path.open())} source records to {path}")
    elif args.step == "generate":
        from .data import generate_responses

        n = generate_responses(model, tok, args.prompts, args.out, args.max_new_tokens, args.batch_size,
                               args.sample_frac, eos_ids=Target(model, tok).eos_ids,
                               split=args.split, limit=args.limit)
        print(f"generated {n} responses into {args.out}")
    elif args.step == "capture":
        from ..config import build_target_layer_ids
        from .capture import capture

        layers = build_target_layer_ids(model.config.num_hidden_layers, args.num_feature_layers)
        n = capture(model, args.records, args.out, layers, args.split)
        print(f"captured {n} sequences into {args.out}")
    elif args.step == "label":
        from .capture import label_targets

        n = label_targets(model, args.data, args.top_tokens or None)
        print(f"labelled {n} sequences in {args.data}")
    else:
        from .capture import CaptureSet
        from .trainer import TrainConfig, train

        data = CaptureSet(args.data)
        mask = mask_token_id(args.target, model.config.vocab_size)
        dcfg = cpu_draft_config(Target(model, tok), mask).replace(
            num_hidden_layers=args.draft_layers, block_size=args.block_size, gru_hidden_dim=args.gru_hidden,
            emb_dim=args.emb_dim, target_layer_ids=data.layer_ids, draft_vocab_size=args.draft_vocab,
            projector_type=None if args.no_head else "domino")
        cfg = TrainConfig(steps=args.steps, lr=args.lr, num_anchors=args.num_anchors, use_head=not args.no_head,
                          curriculum=not args.no_curriculum, lambda_decay_ratio=args.lambda_decay_ratio,
                          bf16=bf16_step(args.bf16), save_every=args.save_every, init=args.init,
                          target_labels=args.target_labels,
                          gamma={16: 7.0, 10: 5.0, 8: 4.0}.get(args.block_size, args.block_size / 2.3))
        train(dcfg, model, data, args.out, cfg)
        print(json.dumps({"exported": str(args.out / "final")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
