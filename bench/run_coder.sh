#!/usr/bin/env bash
# Engine benchmark on the embedded `coder` profile: every method side by side, greedy, pinned args.
# Writes bench/results/coder.json and prints the table. Ratios (speedup, tau) are what we quote.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
python -m domino_backend bench --profile coder --prompts bench/prompts_coder.jsonl \
  --methods ar,hf,ngram,dflash,domino --max-new-tokens "${MAX_NEW_TOKENS:-64}" --threads 2 \
  --json bench/results/coder.json "$@"
