#!/usr/bin/env bash
# Held-out benchmark of the shipped `coder` drafter: prompts from source files and chat
# asks the drafter never saw in training, every method side by side in one process, greedy,
# 128 new tokens. `dflash` is the same checkpoint with the Domino head off, `domino:chain` the head
# drafting a chain instead of a tree (greedy default, tree.py); `domino+ngram` drafts by
# prompt lookup after a repeated suffix and with the drafter otherwise; `METHOD:adaptive` is
# METHOD with the cost-aware draft length the server uses. Pinned arguments; the ratios (speedup
# vs ar, tau, per-position acceptance) are what we quote.
#   bash bench/run_heldout.sh              # 8 code + 4 chat prompts (~10 min on 2 cores)
#   bash bench/run_heldout.sh --draft DIR  # another drafter (extra args go to `bench`)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
for spec in code:8 chat:4; do
  group=${spec%%:*} limit=${spec##*:}
  python -m domino_backend bench --profile coder --prompts "bench/heldout_$group.jsonl" --limit "$limit" \
    --methods ar,ngram,ngram:adaptive,dflash,domino:chain,domino,domino:adaptive,domino+ngram,domino+ngram:adaptive \
    --max-new-tokens 128 --threads 2 \
    --json "bench/results/heldout_$group.json" "$@"
done
