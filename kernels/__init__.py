"""Fused kernels for the Domino head's sequential loop, with PyTorch references and a dispatcher.

- `gru_step_from_table`: GRU cell fed from the precomputed [V, 3G] input-projection table;
- `head_argmax` / `head_sample`: SiLU bottleneck + vocabulary projection + base logits + argmax
  (or an inverse-CDF sample with a given uniform), tiled over the vocabulary with a final reduction;
- `greedy_accept` / `greedy_verify`: the verify step's accept length and bonus token per row;
- `fused_rollout`: the whole head rollout from these pieces (capture-safe).

Triton is used for CUDA tensors when it is installed (`pip install domino[kernels]`); everything
else runs the references in `kernels.reference`. See `kernels.dispatch` for the overrides.
"""

from .dispatch import (
    argmax_rows,
    greedy_accept,
    greedy_verify,
    gru_step_from_table,
    head_argmax,
    head_sample,
    resolve_backend,
    triton_available,
)
from .rollout import HeadWeights, RolloutResult, fused_rollout, prepare_from_modules, prepare_head

__all__ = [
    "argmax_rows", "greedy_accept", "greedy_verify", "gru_step_from_table", "head_argmax", "head_sample",
    "resolve_backend", "triton_available", "HeadWeights", "RolloutResult", "fused_rollout",
    "prepare_from_modules", "prepare_head",
]
