"""Small-M GEMMs on the default target's shapes: what one forward's Linear layers cost at the
token counts the engine runs (M=1 a decoding step, M=9 a block-8 verify, M=17 a block-16 verify,
M=33 a wide tree, M=128 a prefill chunk).

Side by side in one process, on random weights of Qwen2.5-Coder-0.5B's shapes (24 layers of
q/k/v/o/gate/up/down + the LM head):
* fp32 / bf16 `nn.Linear` as is (MKL, with `MKL_CBWR=AVX2` on AMD as the package sets it);
* the same after `domino_backend.cpu.pack_linears` (oneDNN, weights pre-packed: `--quant none`);
* int8 (`--quant int8`, kernels/int8.py): each C kernel the CPU runs (AMX tiles, the AVX512-VNNI
  path, the AVX2 kernel) and the PyTorch reference (`torch._int_mm`), all with the same bits.
The ratio `M=9 / M=1` is the verify:step cost that decides whether drafting pays.

    python bench/cpu_linear.py            # ~2 min, ~5 GB RAM; writes bench/results/cpu_linear.json
    python bench/cpu_linear.py --json bench/results/avx2/cpu_linear.json   # on an AVX2 CPU (no AVX512)
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from domino_backend.bench import median_ms
from domino_backend.cpu import cpu_has_fast_bf16, cpu_name, pack_linears, pin_mkl_avx2_on_amd
from domino_backend.quant import quantize_linears
from kernels import int8

HIDDEN, INTER, KV, VOCAB, LAYERS = 896, 4864, 128, 151936, 24
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
          (INTER, HIDDEN)]  # (in, out): q k v o gate up down
MS = (1, 9, 17, 33, 128)
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_linear.json"


def forward_ms(model: torch.nn.ModuleList, m: int, dtype: torch.dtype) -> float:
    """Median wall time of one pass over every linear at M=m tokens (no grad)."""
    xs = {n: torch.randn(m, n, dtype=dtype) for n in (HIDDEN, INTER)}

    def once():
        for lin in model:
            lin(xs[lin.in_features])

    return median_ms(once, iters=6)


def int8_variants(model: torch.nn.ModuleList) -> dict:
    """The int8 model run every way this CPU can (same bits): each compiled kernel (the AVX512
    library with AMX tiles where the CPU has them, its VNNI path, the AVX2 kernel), then PyTorch."""
    out = {}
    for lib in int8.kernels():
        if lib.isa == "avx2":
            out["int8 kernel (AVX2)"] = torch.nn.ModuleList(_Kernel(lin, lib) for lin in model)
            continue
        if lib.amx:
            out["int8 kernel (AMX)"] = torch.nn.ModuleList(_Kernel(lin, lib, amx=True) for lin in model)
        out["int8 kernel (VNNI)"] = torch.nn.ModuleList(_Kernel(lin, lib) for lin in model)
    out["int8 torch._int_mm"] = torch.nn.ModuleList(_Reference(lin) for lin in model)
    return out


class _Kernel(torch.nn.Module):
    def __init__(self, lin, lib=None, amx: bool = False):
        super().__init__()
        self.lin, self.in_features, self.lib, self.amx = lin, lin.in_features, lib, amx

    def forward(self, x):
        return int8.kernel_linear(self.lib, x, self.lin.qweight, self.lin.bias, amx=self.amx)


class _Reference(_Kernel):
    def forward(self, x):
        return int8.reference_linear(x, self.lin.qweight, self.lin.bias)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(RESULTS))
    a = p.parse_args()
    pin_mkl_avx2_on_amd()  # MKL_CBWR=AVX2 on AMD before the first BLAS call, as build_engine does
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    plain = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for _ in range(LAYERS) for i, o in SHAPES)
    plain.append(torch.nn.Linear(HIDDEN, VOCAB, bias=False))
    plain.requires_grad_(False)
    rows = []

    def measure(name: str, model, dtype: torch.dtype) -> None:
        t = {m: forward_ms(model, m, dtype) for m in MS}
        rows.append({"linears": name, "ms": {str(m): round(t[m], 2) for m in MS}, "m9_over_m1": round(t[9] / t[1], 2)})
        print(f"{name:32s}" + "".join(f"{t[m]:8.1f}ms" for m in MS) + f"{t[9] / t[1]:8.2f}", flush=True)

    print(f"{'linears':32s}" + "".join(f"{'M=' + str(m):>10s}" for m in MS) + f"{'M9/M1':>8s}")
    for dtype in (torch.float32, torch.bfloat16) if cpu_has_fast_bf16() else (torch.float32,):
        plain.to(dtype)
        packed = copy.deepcopy(plain)
        pack_linears(packed)
        x = torch.randn(9, HIDDEN, dtype=dtype)
        err = (packed[-1](x).float() - plain[-1](x).float()).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 0.1), err  # same product, another summation order
        name = str(dtype).removeprefix("torch.")
        measure(f"{name} nn.Linear", plain, dtype)
        measure(f"{name} packed (--quant none)", packed, dtype)
        del packed
    dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    quantize_linears(plain)  # activations stay in the model dtype; weights int8
    for name, model in int8_variants(plain).items():
        measure(name, model, dtype)
    report = {"cpu": cpu_name(), "threads": a.threads, "layers": LAYERS, "activations": str(dtype).removeprefix("torch."),
              "ms_per_forward": rows, "command": "python bench/cpu_linear.py"}
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
