#!/usr/bin/env bash
# Serving load benchmark (pinned): `python -m app` on loopback, the server's default method vs ar:
# 1/4/16 concurrent single-line FIM completion clients over /v1/ws (about 1,000-token prompts, the
# prefix cache warm), a voice-like chat stream alone and beside 8 completion clients, and one
# served request's speed against the engine alone (served/bench). Writes
# bench/results/load_<profile>.json and the plot (docs/img/load.png for coder, the default model;
# docs/img/load_<profile>.png otherwise) and prints the tables. PROFILE=coder for the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-tiny}
PLOT=docs/img/load.png
[ "$PROFILE" = coder ] || PLOT="docs/img/load_${PROFILE}.png"
mkdir -p bench/results
python bench/load_completions.py --spawn --profile "$PROFILE" --dtype "${DTYPE:-auto}" ${THREADS:+--threads "$THREADS"} \
  --clients 1,4,16 --methods default,ar --requests "${REQUESTS:-4}" --max-tokens 24 --voice-turns "${VOICE_TURNS:-10}" \
  --json "bench/results/load_${PROFILE}.json" --plot "$PLOT" "$@"
