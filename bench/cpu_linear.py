"""Small-M fp32 GEMMs on the default target's shapes: what one forward's Linear layers cost at the
token counts the engine runs (M=1 decoding step, M=9 block-8 verify, M=17 block-16 verify).

Compares, side by side in one process, the layout the engine uses today (`domino_backend/cpu.py`:
MKL with widening weights column-major) against oneDNN with weights pre-packed for a batch-size
hint. Random weights of Qwen2.5-Coder-0.5B's shapes (24 layers of q/k/v/o/gate/up/down + the LM
head); the ratio `M=9 / M=1` is the verify:step cost that decides whether drafting pays.

    python bench/cpu_linear.py            # ~2 min, ~6 GB RAM
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import domino_backend  # noqa: F401  (sets MKL_CBWR=AVX2 on AMD, as the engine does)
from domino_backend.bench import median_ms
from domino_backend.cpu import tune_linear_layout

HIDDEN, INTER, KV, VOCAB, LAYERS = 896, 4864, 128, 151936, 24
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
          (INTER, HIDDEN)]  # (in, out): q k v o gate up down
MS = (1, 9, 17)


def forward_ms(linears, m: int) -> float:
    """Median wall time of one pass over every linear at M=m tokens (fp32, no grad)."""
    xs = {n: torch.randn(m, n) for n in (HIDDEN, INTER)}

    def once():
        for f, n in linears:
            f(xs[n])

    return median_ms(once, iters=6)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    mods = [torch.nn.Linear(i, o, bias=False) for _ in range(LAYERS) for i, o in SHAPES]
    mods.append(torch.nn.Linear(HIDDEN, VOCAB, bias=False))
    model = torch.nn.ModuleList(mods).requires_grad_(False)
    tune_linear_layout(model)
    rows = {"mkl (engine today)": [(m, m.in_features) for m in mods]}
    for hint in (1, 9):
        packed = [(torch.ops.mkldnn._reorder_linear_weight(m.weight.contiguous(), hint), m.in_features) for m in mods]
        rows[f"onednn packed (hint M={hint})"] = [
            (lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), n) for p, n in packed]
        x = torch.randn(9, HIDDEN)
        err = (rows[f"onednn packed (hint M={hint})"][-1][0](x) - F.linear(x, mods[-1].weight)).abs().max().item()
        assert err < 1e-4, err  # same fp32 product, another summation order
    print(f"{'layout':30s}" + "".join(f"{'M=' + str(m):>10s}" for m in MS) + f"{'M9/M1':>8s}")
    base = None
    for name, linears in rows.items():
        t = {m: forward_ms(linears, m) for m in MS}
        base = base or t
        print(f"{name:30s}" + "".join(f"{t[m]:8.1f}ms" for m in MS) + f"{t[9] / t[1]:8.2f}"
              + "   vs engine: " + " ".join(f"{base[m] / t[m]:.2f}x" for m in MS), flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
