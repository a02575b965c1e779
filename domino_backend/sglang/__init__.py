"""SGLang integration: serve our drafters on GPU with SGLang 0.5.23's DFLASH+Domino path.

- `export`: write/check checkpoints SGLang loads unchanged (and run SGLang's own config parser);
- `plugin`: the `sglang.srt.plugins` entry point (`domino`) — exact full-vocabulary rollout with the
  fused kernels, optional temperature > 0 drafting with lossless verification, via HookRegistry;
- `rollout`: our rollout behind SGLang's `domino_greedy_rollout` calling convention;
- `launch`: `python -m domino_backend serve-sglang` (builds the `sglang.launch_server` command);
- `upstream`: loads the pinned release's pure-Python files (rollout, parser, plugin loader) without
  importing `sglang`, for CPU tests and GPU parity benches.

Nothing here imports `sglang` at module import time.
"""

from .upstream import SGLANG_VERSION

__all__ = ["SGLANG_VERSION"]
