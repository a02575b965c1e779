"""What one forward of the default target costs per row count M: the verify cost that decides
whether drafting pays (M=1 a decoding step, M=5/9/17 verifies of 4/8/16 drafts, M=33 a wide tree).

The real `coder` target, one sequence with a context of `--context` tokens already cached, a pass
of M new rows (a chain verify), logits for every row; side by side in one process, rounds
interleaved: `--quant int8` and `--quant none`, each with the CPU kernels for attention and the
row ops (kernels/attention.py, kernels/rowops.py) and with the PyTorch ops instead
(DOMINO_CPU_KERNELS=torch). Reported: the median ms per forward and the ratio to M=1.

    python bench/cpu_forward.py            # ~3 min; writes bench/results/cpu_forward.json
    python bench/cpu_forward.py --json bench/results/avx2/cpu_forward.json   # on an AVX2 CPU (no AVX512)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from domino_backend.bench import median_ms
from domino_backend.cpu import cpu_name
from domino_backend.loader import build_engine
from kernels import attention

MS = (1, 5, 9, 17, 33)
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_forward.json"


def use_kernels(on: bool) -> bool:
    """Switch the attention/row-op kernels for the forwards that follow; False when they cannot run."""
    os.environ["DOMINO_CPU_KERNELS"] = "" if on else "torch"
    attention.kernel.cache_clear()
    return attention.kernel() is not None if on else True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="interleaved passes over every variant")
    p.add_argument("--json", default=str(RESULTS))
    a = p.parse_args()
    torch.manual_seed(0)
    targets = {q: build_engine("coder", "none", "auto", a.threads, quant=q).target for q in ("int8", "none")}
    ctx = torch.randint(100, 20000, (a.context,))
    sessions = {}
    for q, t in targets.items():
        sessions[q] = t.session()
        sessions[q].forward(ctx, prefill=True, keep_last=None)
    variants = [(q, k) for q in targets for k in (True, False) if use_kernels(k)]
    times: dict[tuple, list[float]] = {}
    for _ in range(a.rounds):
        for q, k in variants:
            use_kernels(k)
            s = sessions[q]
            for m in MS:
                rows = torch.randint(100, 20000, (m,))

                def once():
                    s.rollback(a.context)
                    s.forward(rows, keep_last=0)

                times.setdefault((q, k, m), []).append(median_ms(once, iters=5))
    use_kernels(True)
    out = []
    print(f"{'target':28s}" + "".join(f"{'M=' + str(m):>9s}" for m in MS))
    for q, k in variants:
        ms = {m: sorted(times[q, k, m])[len(times[q, k, m]) // 2] for m in MS}
        name = f"{q} + " + ("CPU kernels" if k else "PyTorch ops")
        out.append({"target": name, "quant": q, "kernels": k, "ms": {str(m): round(v, 2) for m, v in ms.items()},
                    "over_m1": {str(m): round(v / ms[1], 2) for m, v in ms.items()}})
        print(f"{name:28s}" + "".join(f"{ms[m]:7.1f}ms" for m in MS), flush=True)
    dtype = str(next(iter(targets.values())).dtype).removeprefix("torch.")
    report = {"cpu": cpu_name(), "threads": a.threads, "context": a.context, "dtype": dtype, "rounds": a.rounds, "forwards": out,
              "command": "python bench/cpu_forward.py"}
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
