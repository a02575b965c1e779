#!/usr/bin/env bash
# Held-out benchmark of the shipped `coder` drafter (issue 3): prompts from source files and chat
# asks the drafter never saw in training, every method side by side in one process, greedy,
# 128 new tokens. `dflash` is the same checkpoint with the Domino head off. Pinned arguments;
# the ratios (speedup vs ar, tau, per-position acceptance) are what we quote.
#   bash bench/run_heldout.sh            # code and chat, 12 prompts each
#   bash bench/run_heldout.sh --draft DIR  # another drafter (extra args go to `bench`)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
for group in code chat; do
  python -m domino_backend bench --profile coder --prompts "bench/heldout_$group.jsonl" --limit "${LIMIT:-12}" \
    --methods ar,ngram,dflash,domino --max-new-tokens 128 --threads 2 --max-drafts "${MAX_DRAFTS:-7}" \
    --json "bench/results/heldout_$group.json" "$@"
done
