#!/usr/bin/env bash
# Serving load benchmark (pinned): N concurrent WebSocket clients sending single-line FIM completions
# to `python -m app`, domino vs ar, 1/4/16 clients. Writes bench/results/load_<profile>.json and prints
# the table. PROFILE=coder for the default model (slow on 2 CPU cores); tiny by default.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-tiny}
mkdir -p bench/results
python bench/load_completions.py --spawn --profile "$PROFILE" --dtype float32 --threads "${THREADS:-1}" \
  --clients 1,4,16 --methods domino,ar --requests "${REQUESTS:-4}" --max-tokens 24 \
  --json "bench/results/load_${PROFILE}.json" "$@"
