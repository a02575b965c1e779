"""Small-M GEMMs on the default target's shapes: what one forward's Linear layers cost at the
token counts the engine runs (M=1 decoding step, M=9 block-8 verify, M=17 block-16 verify, M=128 a
prefill chunk).

Compares, side by side in one process, plain `nn.Linear` (fp32: MKL, with `MKL_CBWR=AVX2` on AMD as
the package sets it) against what the engine runs: the same modules after
`domino_backend.cpu.pack_linears` (oneDNN, weights pre-packed); in fp32, and in bf16 too where the
CPU has native bf16 (what `--dtype auto` then picks). Random weights of Qwen2.5-Coder-0.5B's shapes (24 layers of
q/k/v/o/gate/up/down + the LM head); the ratio `M=9 / M=1` is the verify:step cost that decides
whether drafting pays.

    python bench/cpu_linear.py            # ~1 min, ~5 GB RAM
"""

from __future__ import annotations

import copy

import torch

from domino_backend.bench import median_ms
from domino_backend.cpu import cpu_has_fast_bf16, pack_linears, pin_mkl_avx2_on_amd

pin_mkl_avx2_on_amd()  # MKL_CBWR=AVX2 on AMD before the first BLAS call, as build_engine does

HIDDEN, INTER, KV, VOCAB, LAYERS = 896, 4864, 128, 151936, 24
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
          (INTER, HIDDEN)]  # (in, out): q k v o gate up down
MS = (1, 9, 17, 128)


def forward_ms(model: torch.nn.ModuleList, m: int, dtype: torch.dtype) -> float:
    """Median wall time of one pass over every linear at M=m tokens (no grad)."""
    xs = {n: torch.randn(m, n, dtype=dtype) for n in (HIDDEN, INTER)}

    def once():
        for lin in model:
            lin(xs[lin.in_features])

    return median_ms(once, iters=6)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    plain = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for _ in range(LAYERS) for i, o in SHAPES)
    plain.append(torch.nn.Linear(HIDDEN, VOCAB, bias=False))
    plain.requires_grad_(False)
    print(f"{'linears':32s}" + "".join(f"{'M=' + str(m):>10s}" for m in MS) + f"{'M9/M1':>8s}")
    for dtype in (torch.float32, torch.bfloat16) if cpu_has_fast_bf16() else (torch.float32,):
        plain.to(dtype)
        packed = copy.deepcopy(plain)
        pack_linears(packed)
        x = torch.randn(9, HIDDEN, dtype=dtype)
        err = (packed[-1](x).float() - plain[-1](x).float()).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 0.1), err  # same product, another summation order
        base = None
        for name, model in (("plain nn.Linear", plain), ("packed (engine)", packed)):
            t = {m: forward_ms(model, m, dtype) for m in MS}
            base = base or t
            print(f"{str(dtype)[6:] + ' ' + name:32s}" + "".join(f"{t[m]:8.1f}ms" for m in MS)
                  + f"{t[9] / t[1]:8.2f}" + "   vs plain: " + " ".join(f"{base[m] / t[m]:.2f}x" for m in MS),
                  flush=True)
        del packed


if __name__ == "__main__":
    with torch.no_grad():
        main()
