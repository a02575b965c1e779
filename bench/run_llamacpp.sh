#!/usr/bin/env bash
# Domino against llama.cpp on the same CPU: our plain decoding (`ar`), the method the server picks on
# a CPU (`domino+ngram` with the adaptive draft length, methods.resolve) and llama.cpp
# (llama-cpp-python, built natively by `bash setup.sh dev`) running the GGUF the `coder` target is
# built from, all in one process per prompt set, greedy, 128 new tokens, 2 threads. Long-context
# code (held-out source files, first 8) and 20 short code prompts (bench/short_code.jsonl).
#   bash bench/run_llamacpp.sh                                  # writes bench/results/llamacpp_*.json
#   RESULTS=/tmp/r bash bench/run_llamacpp.sh --limit 2 --max-new-tokens 16  # a quick check (extra args go to `bench`)
set -euo pipefail
cd "$(dirname "$0")/.."
results=${RESULTS:-bench/results}
mkdir -p "$results"
for spec in code:bench/heldout_code.jsonl:8 short:bench/short_code.jsonl:20; do
  IFS=: read -r name prompts limit <<<"$spec"
  python -m domino_backend bench --profile coder --prompts "$prompts" --limit "$limit" \
    --methods ar,domino+ngram:adaptive,llamacpp --max-new-tokens 128 --threads 2 \
    --json "$results/llamacpp_$name.json" "$@"
done
