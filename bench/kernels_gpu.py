"""GPU check of the Domino head kernels (< 5 minutes on one GPU): compile, bf16 parity, CUDA graphs, timing.

    python bench/kernels_gpu.py --out bench/results/kernels_gpu.json        # needs CUDA + triton
    python bench/kernels_gpu.py --smoke --out /tmp/k.json                   # CPU, interpreter, tiny shapes

Steps, at Qwen3-8B head shapes (V 151936, H 4096, G 1024, E 256, block 16 -> 15 drafts):
1. compile every Triton kernel and compare with the PyTorch references on bf16 inputs
   (GRU step max error, logits max error, argmax / sample token agreement, accept lengths);
2. the whole rollout (`kernels.fused_rollout`): Triton vs reference tokens, and vs SGLang 0.5.23's
   `domino_greedy_rollout` (K=0 and K=2048) when the SGLang files are available
   (`domino_backend.sglang.upstream`; copy the wheel and set DOMINO_SGLANG_WHEEL);
3. capture the Triton rollout in a `torch.cuda.CUDAGraph` per batch size, replay, compare with eager;
4. time per batch size: Triton graph replay, Triton eager, PyTorch-reference eager, SGLang eager;
5. SGLang parity per batch size (needs the SGLang files): our reference vs SGLang's K=0 rollout in
   the run's dtype and again on fp32 copies of the same weights and inputs (TF32 off), each row
   alone vs the batch on both sides, and at every bf16 divergence the fp32 logit gap between the
   two picks (a near-tie means rounding; a logic bug would also diverge in fp32).
Writes one JSON report. Random weights: parity and speed only, not acceptance.

    python bench/kernels_gpu.py --cpu-parity --out /tmp/parity.json     # step 5 only, CPU, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels_gpu.json"))
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1 on tiny shapes (checks the script)")
    ap.add_argument("--cpu-parity", action="store_true", help="only the SGLang parity step, on CPU in bf16 (no Triton)")
    ap.add_argument("--shapes", default="32768,1024,256,256", help="V,H,G,E for --cpu-parity (Qwen3-8B's are too "
                    "slow on a CPU; the head keeps the GPU run's fan-in scaling)")
    return ap.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
from kernels import reference as ref  # noqa: E402
from domino_backend.bench import median_ms  # noqa: E402

if ARGS.smoke:
    DEV, V, H, G, E, BLOCK = torch.device("cpu"), 1000, 32, 16, 24, 8
    DTYPE = torch.float16  # the interpreter mis-computes bf16
    BATCHES = [1, 3]
    ITERS = 1
elif ARGS.cpu_parity:
    DEV, BLOCK, DTYPE = torch.device("cpu"), 16, torch.bfloat16
    V, H, G, E = (int(x) for x in ARGS.shapes.split(","))
    BATCHES = [int(b) for b in ARGS.batch_sizes.split(",")]
    ITERS = 1
else:
    DEV, V, H, G, E, BLOCK = torch.device("cuda"), 151936, 4096, 1024, 256, 16
    DTYPE = torch.bfloat16
    BATCHES = [int(b) for b in ARGS.batch_sizes.split(",")]
    ITERS = ARGS.iters
K = BLOCK - 1


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters=None):
    """Median milliseconds per call."""
    return median_ms(fn, iters or ITERS, sync)


def make_head(seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(DEV, DTYPE)

    gru = nn.GRU(H, G, num_layers=1, batch_first=True, bias=False).to(DEV, DTYPE).requires_grad_(False)
    proj = nn.Sequential(nn.Linear(H + G, E, bias=False), nn.SiLU(), nn.Linear(E, V, bias=False)).to(DEV, DTYPE)
    proj.requires_grad_(False)
    with torch.no_grad():  # scales chosen so the delta moves many argmaxes (as in the tests)
        gru.weight_ih_l0.copy_(r(3 * G, H, scale=0.8 / H ** 0.5 * 4))
        gru.weight_hh_l0.copy_(r(3 * G, G, scale=0.8 / G ** 0.5 * 4))
        proj[0].weight.copy_(r(E, H + G, scale=2.0 / (H + G) ** 0.5))
        proj[2].weight.copy_(r(V, E, scale=1.0 / E ** 0.5))
    embed = nn.Embedding(V, H).to(DEV, DTYPE).requires_grad_(False)
    with torch.no_grad():
        embed.weight.copy_(r(V, H))
    lm_head = r(V, H, scale=2.0 / H ** 0.5)
    return gru, proj, embed, lm_head


def block_inputs(b, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(b, BLOCK, H, generator=g).to(DEV, DTYPE)
    bonus = torch.randint(0, V, (b,), generator=g).to(DEV)
    return hidden, bonus


def kernel_parity(report):
    g = torch.Generator(device="cpu").manual_seed(1)
    b = 32 if DEV.type == "cuda" else 5

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(DEV, DTYPE)

    out = {}
    table, gh, h = r(V, 3 * G), r(b, 3 * G), r(b, G)
    tok = torch.randint(0, V, (b,), generator=g).to(DEV)
    t0 = time.perf_counter()
    got = kernels.gru_step_from_table(table, tok, gh, h, backend="triton")
    sync()
    out["gru_first_call_s"] = time.perf_counter() - t0
    out["gru_max_abs_err"] = (got.float() - ref.gru_step_from_table(table, tok, gh, h).float()).abs().max().item()
    pre, pre2, w2, base = r(b, E), r(b, E), r(V, E, scale=E ** -0.5), r(b, V)
    lo = torch.empty(b, V, device=DEV)
    t0 = time.perf_counter()
    top = kernels.head_argmax(pre, w2, base, pre2, backend="triton", logits_out=lo)
    sync()
    out["head_first_call_s"] = time.perf_counter() - t0
    want = ref.head_logits(pre, w2, base, pre2)
    out["head_logits_max_abs_err"] = (lo - want).abs().max().item()
    out["head_argmax_match"] = (top == want.argmax(-1)).float().mean().item()
    u = torch.rand(b, generator=g).to(DEV)
    temp = torch.linspace(0, 1.5, b).to(DEV)
    st, sz, _ = kernels.head_sample(pre, w2, base, u, temp, pre2, backend="triton")
    rt, rz, _ = ref.head_sample(pre, w2, base, u, temp, pre2)
    out["head_sample_match"] = (st == rt).float().mean().item()
    out["head_sample_logz_max_abs_err"] = (sz - rz).abs().max().item()
    drafts = torch.randint(0, 3, (b, K), generator=g).to(DEV)
    top1 = torch.randint(0, 3, (b, K + 1), generator=g).to(DEV)
    a1, b1 = kernels.greedy_accept(drafts, top1, backend="triton")
    a2, b2 = ref.greedy_accept(drafts, top1)
    out["accept_exact"] = bool(torch.equal(a1, a2) and torch.equal(b1, b2))
    report["kernels"] = out


def sglang_rollout_fn():
    try:
        from domino_backend.sglang import upstream

        return upstream.domino_utils().domino_greedy_rollout, str(upstream.find_source())
    except Exception as e:  # SGLangSourceUnavailable or anything odd in a foreign release
        return None, f"unavailable: {e}"


def rollout_checks(report):
    from domino_backend.sglang.rollout import domino_rollout, proposal_slots

    gru, proj, embed, lm_head = make_head()
    t0 = time.perf_counter()
    hw = kernels.prepare_from_modules(gru, proj, embed.weight)
    sync()
    report["prepare_table_s"] = time.perf_counter() - t0
    sgl, sgl_where = sglang_rollout_fn()
    report["sglang_source"] = sgl_where
    rows = []
    for b in BATCHES:
        hidden, bonus = block_inputs(b, seed=b)
        kw = dict(draft_hidden=hidden, bonus_tokens=bonus, target_embedding=embed, lm_head_weight=lm_head,
                  prefix_gru=gru, embed_proj=proj, vocab_size=V, shift_label=True)
        z = hidden[:, proposal_slots(BLOCK, True)]
        base = F.linear(z, lm_head)
        row = {"batch": b}
        tri = kernels.fused_rollout(hw, z, base, bonus, backend="triton").tokens
        torch_ref = kernels.fused_rollout(hw, z, base, bonus, backend="torch").tokens
        row["triton_vs_reference_token_match"] = (tri == torch_ref).float().mean().item()
        row["head_changes_tokens_frac"] = (tri != base.argmax(-1)).float().mean().item()
        if sgl is not None:
            s0 = sgl(**kw, candidate_pool_size=0, in_cuda_graph=False)
            s2k = sgl(**kw, candidate_pool_size=min(2048, V), in_cuda_graph=False)
            row["triton_vs_sglang_k0_token_match"] = (tri == s0).float().mean().item()
            row["reference_vs_sglang_k0_token_match"] = (torch_ref == s0).float().mean().item()
            row["sglang_k2048_vs_k0_token_match"] = (s2k == s0).float().mean().item()
            # bf16 rounding differences compound along the chain: report the exact-prefix length too
            same = (tri == s0).int().cumprod(-1).sum(-1).float()
            row["triton_vs_sglang_k0_mean_identical_prefix"] = same.mean().item()
        row["ms_triton_eager"] = timed(lambda: kernels.fused_rollout(hw, z, base, bonus, backend="triton"))
        row["ms_reference_eager"] = timed(lambda: kernels.fused_rollout(hw, z, base, bonus, backend="torch"))
        row["ms_ours_with_base_gemm_eager"] = timed(lambda: domino_rollout(**kw, head=hw, backend="triton"))
        if sgl is not None:
            row["ms_sglang_k0_eager"] = timed(lambda: sgl(**kw, candidate_pool_size=0, in_cuda_graph=False))
            row["ms_sglang_k2048_eager"] = timed(lambda: sgl(**kw, candidate_pool_size=2048, in_cuda_graph=False))
        if DEV.type == "cuda":
            row.update(graph_check(hw, z, base, bonus, tri))
        rows.append(row)
        print(json.dumps(row), flush=True)
    report["rollout"] = rows


@contextlib.contextmanager
def strict_fp32():
    """fp32 GEMMs and cuDNN RNNs in full fp32 (PyTorch lets cuDNN use TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sglang_parity(report):
    """Logic or rounding? Our reference vs SGLang's K=0 rollout per batch size, in DTYPE and in fp32."""
    from domino_backend.sglang.rollout import domino_rollout, proposal_slots

    sgl, report["sglang_source"] = sglang_rollout_fn()
    if sgl is None:
        return False
    head = make_head()
    head32 = [copy.deepcopy(m).float() for m in head[:3]] + [head[3].float()]
    hw = kernels.prepare_from_modules(head[0], head[1], head[2].weight)
    hw32 = kernels.prepare_from_modules(head32[0], head32[1], head32[2].weight)

    def both(h, hidden, bonus, hw_):
        gru, proj, embed, lm_head = h
        kw = dict(draft_hidden=hidden, bonus_tokens=bonus, target_embedding=embed, lm_head_weight=lm_head,
                  prefix_gru=gru, embed_proj=proj, vocab_size=V, shift_label=True)
        return (domino_rollout(**kw, head=hw_, backend="torch").tokens,
                sgl(**kw, candidate_pool_size=0, in_cuda_graph=False))

    rows = []
    for b in BATCHES:
        hidden, bonus = block_inputs(b, seed=b)
        ours, theirs = both(head, hidden, bonus, hw)
        alone = [both(head, hidden[i:i + 1], bonus[i:i + 1], hw) for i in range(b)]
        with strict_fp32():
            ours32, theirs32 = both(head32, hidden.float(), bonus, hw32)
            z32 = hidden.float()[:, proposal_slots(BLOCK, True)]
            fp32_logits = kernels.fused_rollout(hw32, z32, F.linear(z32, head32[3]), bonus, backend="torch",
                                                return_logits=True).logits
        row = {"batch": b,
               "reference_vs_sglang_token_match": (ours == theirs).float().mean().item(),
               "fp32_reference_vs_sglang_token_match": (ours32 == theirs32).float().mean().item(),
               "reference_batch_equals_rows_alone": all(torch.equal(ours[i], a[0][0]) for i, a in enumerate(alone)),
               "sglang_batch_equals_rows_alone": all(torch.equal(theirs[i], a[1][0]) for i, a in enumerate(alone)),
               "rows_alone_reference_vs_sglang_token_match":
                   torch.cat([(a[0] == a[1]).float() for a in alone], 1).mean().item()}
        # First divergence of each row that differs: where both chains still share the fp32 chain's
        # prefix, the fp32 logit gap between our pick and SGLang's (and the row's logit scale).
        gaps, scale = [], 0.0
        for i in range(b):
            diff = (ours[i] != theirs[i]).nonzero()
            if not len(diff):
                continue
            j = int(diff[0])
            if torch.equal(ours32[i, :j], ours[i, :j]):
                lg = fp32_logits[i, j]
                gaps.append(abs(float(lg[ours[i, j]] - lg[theirs[i, j]])))
                scale = max(scale, float(lg.abs().max()))
        row.update(divergent_rows=int((ours != theirs).any(-1).sum()), divergences_checked_in_fp32=len(gaps),
                   fp32_gap_at_divergence_max=max(gaps, default=None), fp32_logit_abs_max=scale or None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report["sglang_parity"] = rows
    return True


def graph_check(hw, z, base, bonus, eager_tokens):
    """Capture the whole Triton rollout (plus a sampled one) in CUDA graphs; replay; compare; time."""
    out = {}
    sz, sbase, sbonus = z.clone(), base.clone(), bonus.clone()
    temp = torch.full((z.shape[0],), 0.8, device=DEV)
    unif = torch.rand(z.shape[0], K, device=DEV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside capture
        for _ in range(2):
            kernels.fused_rollout(hw, sz, sbase, sbonus, backend="triton")
            kernels.fused_rollout(hw, sz, sbase, sbonus, temperature=temp, uniforms=unif, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            res = kernels.fused_rollout(hw, sz, sbase, sbonus, backend="triton")
        graph.replay()
        sync()
        out["graph_greedy_equals_eager"] = bool(torch.equal(res.tokens, eager_tokens))
        # new inputs through the same static buffers
        sz.copy_(torch.flip(z, dims=[0]))
        sbase.copy_(torch.flip(base, dims=[0]))
        sbonus.copy_(torch.flip(bonus, dims=[0]))
        graph.replay()
        sync()
        again = kernels.fused_rollout(hw, sz, sbase, sbonus, backend="triton").tokens
        out["graph_replay_tracks_new_inputs"] = bool(torch.equal(res.tokens, again))
        out["ms_triton_graph_replay"] = timed(graph.replay)
        sgraph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(sgraph):
            sres = kernels.fused_rollout(hw, sz, sbase, sbonus, temperature=temp, uniforms=unif, backend="triton")
        sgraph.replay()
        sync()
        eager_s = kernels.fused_rollout(hw, sz, sbase, sbonus, temperature=temp, uniforms=unif, backend="triton")
        out["graph_sampled_equals_eager"] = bool(torch.equal(sres.tokens, eager_s.tokens))
        out["ms_triton_sampled_graph_replay"] = timed(sgraph.replay)
        rgraph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(rgraph):
            kernels.fused_rollout(hw, sz, sbase, sbonus, backend="torch")
        out["ms_reference_graph_replay"] = timed(rgraph.replay)
    except Exception as e:  # report, do not hide: a capture failure is a finding
        out["graph_error"] = f"{type(e).__name__}: {e}"
    return out


def git_commit() -> str | None:
    """The checked-out commit, "+dirty" when kernels/ or this script differ from it; None without git."""
    def run(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    try:
        dirty = run("status", "--porcelain", "--", "kernels", "bench/kernels_gpu.py").strip()
        return run("rev-parse", "HEAD").strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    report = {"smoke": ARGS.smoke, "cpu_parity": ARGS.cpu_parity, "date": time.strftime("%Y-%m-%d", time.gmtime()),
              "commit": git_commit(), "device": str(DEV), "dtype": str(DTYPE).removeprefix("torch."),
              "shapes": dict(V=V, H=H, G=G, E=E, block=BLOCK, drafts=K), "torch": torch.__version__}
    if ARGS.cpu_parity:
        t0 = time.perf_counter()
        if not sglang_parity(report):
            print(f"SGLang parity skipped, SGLang files {report['sglang_source']}", file=sys.stderr)
            return 2
        return write(report, t0)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        report["status"] = "skipped: no CUDA device (use --smoke on CPU)"
        print(report["status"], file=sys.stderr)
        Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.out).write_text(json.dumps(report, indent=1) + "\n")
        return 2
    if not kernels.triton_available():
        report["status"] = "skipped: triton not installed"
        print(report["status"], file=sys.stderr)
        return 2
    import triton

    report["triton"] = triton.__version__
    if DEV.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    t0 = time.perf_counter()
    kernel_parity(report)
    print(json.dumps(report["kernels"]), flush=True)
    rollout_checks(report)
    sglang_parity(report)
    return write(report, t0)


def write(report, t0):
    report["wall_s"] = time.perf_counter() - t0
    report["status"] = "ok"
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {ARGS.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
