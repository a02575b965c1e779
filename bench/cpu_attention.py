"""What the attention kernel's AMX-BF16 path buys a forward: the default (`coder`, int8) target's
forward of S sequences x R new rows each (a batched verify round; S = 1, R = 1 a decoding step;
a prefill: a keystroke's ~85 prompt rows), every sequence with `--context` tokens cached, with
the kernel's tile path (the sessions keeping their caches packed; prompt rows through it too) and
without it (its AVX512 fp32 path; prompt rows in fused SDPA blocks), side by side in one process,
rounds interleaved. Reported: the median ms per forward of each and their ratio.

    python bench/cpu_attention.py          # ~2 min; writes bench/results/cpu_attention.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from domino_backend.bench import median_ms
from domino_backend.loader import build_engine
from domino_backend.target import Pass
from kernels import attention

SHAPES = ((1, 1, False), (1, 4, False), (4, 4, False), (16, 4, False), (1, 85, True))  # sequences, rows, prefill
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_attention.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="interleaved passes over both paths")
    p.add_argument("--json", default=str(RESULTS))
    a = p.parse_args()
    if not attention.amx():
        raise SystemExit("this CPU has no AMX-BF16 tiles (or the kernels do not build): nothing to compare")
    torch.manual_seed(0)
    target = build_engine("coder", "none", "auto", a.threads).target
    tile_path = attention.amx
    sessions = {}
    for amx in (True, False):  # a session keeps a packed cache only if it was made with the tile path on
        attention.amx = (lambda on=amx: on and tile_path())
        sessions[amx] = []
        for _ in range(max(s for s, *_ in SHAPES)):
            s = target.session()
            s.forward(torch.randint(100, 20000, (a.context,)), prefill=True, keep_last=None)
            sessions[amx].append(s)
    times: dict[tuple, list[float]] = {}
    for _ in range(a.rounds):
        for amx in (True, False):
            attention.amx = (lambda on=amx: on and tile_path())
            for n, r, prefill in SHAPES:
                rows = [torch.randint(100, 20000, (r,)) for _ in range(n)]

                def once():
                    for s in sessions[amx][:n]:
                        s.rollback(a.context)
                    target.forward_batch([Pass(s, x, prefill=prefill) for s, x in zip(sessions[amx], rows)])

                times.setdefault((amx, n, r, prefill), []).append(median_ms(once, iters=5))
    attention.amx = tile_path
    out = []
    print(f"{'sequences x rows':>22s} {'AMX tiles':>10s} {'without':>10s} {'ratio':>6s}")
    for n, r, prefill in SHAPES:
        tiles, fp32 = (sorted(times[amx, n, r, prefill])[len(times[amx, n, r, prefill]) // 2] for amx in (True, False))
        out.append({"sequences": n, "rows": r, "prefill": prefill, "amx_ms": round(tiles, 2),
                    "without_ms": round(fp32, 2), "speedup": round(fp32 / tiles, 2)})
        name = f"{n} x {r}" + " prefill" * prefill
        print(f"{name:>22s} {tiles:8.1f}ms {fp32:8.1f}ms {fp32 / tiles:6.2f}", flush=True)
    report = {"threads": a.threads, "context": a.context, "rounds": a.rounds, "forwards": out,
              "command": "python bench/cpu_attention.py"}
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
