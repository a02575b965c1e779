"""Domino head kernels: Triton (run by the interpreter on CPU) vs the PyTorch references.

TRITON_INTERPRET=1 is set before `kernels._triton` is first imported (the dispatcher re-imports it
if it was imported without). The interpreter mis-computes bf16 arithmetic, so these tests use fp32
and fp16; bf16 parity is checked on a GPU by `bench/kernels_gpu.py`. Shapes are deliberately odd
(several vocabulary tiles with a ragged last one, a bottleneck wider than one chunk, more rows than
one row block) so the masks and the cross-tile reduction are exercised.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from torch import nn

import kernels
from domino_backend.config import DraftConfig
from domino_backend.draft_model import DraftModel
from domino_backend.head import rollout as head_rollout
from domino_backend.sampling import SamplingParams
from kernels import reference as ref

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed (pip install triton)")

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def rnd(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


# ---------------------------------------------------------------------------------------------
# GRU step from the input-projection table


def test_reference_gru_step_from_table_equals_gru_cell_on_embeddings():
    v, hdim, g, b = 50, 16, 9, 4
    emb, w_ih, w_hh = rnd(v, hdim, seed=1), rnd(3 * g, hdim, seed=2, scale=0.5), rnd(3 * g, g, seed=3, scale=0.5)
    h, tok = rnd(b, g, seed=4), torch.tensor([3, 0, 49, 3])
    table = emb @ w_ih.T
    out = ref.gru_step_from_table(table, tok, h @ w_hh.T, h)
    torch.testing.assert_close(out, ref.gru_cell(emb[tok], h, w_ih, w_hh), rtol=1e-5, atol=1e-5)
    # gh=None means a zero state: the first priming step.
    zero = torch.zeros_like(h)
    torch.testing.assert_close(ref.gru_step_from_table(table, tok, None, zero), ref.gru_cell(emb[tok], zero, w_ih, w_hh))
    # One gate sequence: fed the engine's own input projections, the table step is the engine's cell bit for bit.
    rows = emb[tok] @ w_ih.T
    assert torch.equal(ref.gru_step_from_table(rows, torch.arange(b), h @ w_hh.T, h), ref.gru_cell(emb[tok], h, w_ih, w_hh))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [7, 300])  # one masked block; two blocks of 256 with a ragged tail
def test_triton_gru_step_matches_reference(dtype, g):
    v, b = 33, 5
    table, gh, h = rnd(v, 3 * g, seed=5, dtype=dtype), rnd(b, 3 * g, seed=6, dtype=dtype), rnd(b, g, seed=7, dtype=dtype)
    tok = torch.tensor([0, 32, 7, 7, 19])
    for gh_in in (gh, None):
        out = kernels.gru_step_from_table(table, tok, gh_in, h, backend="triton")
        want = ref.gru_step_from_table(table, tok, gh_in, h)
        assert out.dtype == dtype and out.shape == (b, g)
        torch.testing.assert_close(out.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


# ---------------------------------------------------------------------------------------------
# SiLU bottleneck + vocabulary projection + base logits + argmax


def head_inputs(b, v, e, dtype, seed=0):
    return (rnd(b, e, seed=seed + 1, dtype=dtype), rnd(v, e, seed=seed + 2, dtype=dtype, scale=0.5),
            rnd(b, v, seed=seed + 3, dtype=dtype), rnd(b, e, seed=seed + 4, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_head_argmax_matches_reference_across_tiles_and_row_blocks(dtype):
    b, v, e = 19, 1000, 70  # 2 row blocks of 16, 4 vocab tiles of 256 (last has 232), 2 E-chunks of 64
    pre, w2, base, pre2 = head_inputs(b, v, e, dtype)
    for args in [(pre, w2, base, None), (pre, w2, base, pre2), (pre, w2, None, None), (None, None, base, None)]:
        got = kernels.head_argmax(*args, backend="triton")
        want = ref.argmax_rows(ref.head_logits(*args))
        assert got.dtype == torch.int64
        assert torch.equal(got, want), (args[1] is None, args[2] is None, args[3] is None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_head_logits_match_reference(dtype):
    pre, w2, base, pre2 = head_inputs(3, 517, 37, dtype, seed=10)
    out = torch.empty(3, 517)
    kernels.head_argmax(pre, w2, base, pre2, backend="triton", logits_out=out)
    want = ref.head_logits(pre, w2, base, pre2)
    err = (out - want).abs().max().item()
    assert err < 5 * TOL[dtype] * want.abs().max().item(), err


def test_triton_argmax_breaks_ties_at_the_first_index_across_tiles():
    v = 700
    base = torch.zeros(4, v)
    base[0, [5, 300, 650]] = 3.0  # same maximum in three tiles
    base[1, [650, 300]] = 3.0
    base[2, :] = 1.0  # all equal: index 0
    base[3, [699]] = 2.0  # maximum in the last, ragged tile
    got = kernels.head_argmax(None, None, base, backend="triton")
    assert got.tolist() == [5, 300, 0, 699] == base.argmax(-1).tolist()


def test_triton_argmax_rows_of_a_strided_base_slice():
    """base[:, j] of a [B, K, V] block is strided; the kernel must honour the row stride."""
    block = rnd(3, 4, 300, seed=20)
    for j in range(4):
        assert torch.equal(kernels.head_argmax(None, None, block[:, j], backend="triton"), block[:, j].argmax(-1))


# ---------------------------------------------------------------------------------------------
# Sampling variant: inverse CDF with a given uniform


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_head_sample_matches_reference_inverse_cdf(dtype):
    b, v, e = 40, 600, 24
    pre, w2, base, _ = head_inputs(b, v, e, dtype, seed=30)
    u = torch.rand(b, generator=torch.Generator().manual_seed(31))
    temp = torch.tensor([0.0, 0.3, 1.0, 2.5] * 10)  # rows with T=0 stay greedy
    tok, logz, logits = kernels.head_sample(pre, w2, base, u, temp, backend="triton")
    rtok, rlogz, rlogits = ref.head_sample(pre, w2, base, u, temp)
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(logz, rlogz, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, rlogits, rtol=1e-3, atol=1e-3)
    greedy = temp == 0
    assert torch.equal(tok[greedy], rlogits[greedy].argmax(-1))
    assert torch.all(logz[greedy] == 0)


def test_inverse_cdf_sample_frequencies_follow_the_softmax():
    """Inverse CDF with a uniform u is an exact sampler (chi-square on the reference, 20000 draws),
    and the Triton kernel picks the same token as the reference for the same u (300 draws)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n, v, t = 20000, 40, 0.8
    logits = rnd(1, v, seed=40, scale=1.5).expand(n, v).contiguous()
    u = torch.rand(n, generator=torch.Generator().manual_seed(41))
    temp = torch.full((n,), t)
    tok, logz, _ = kernels.head_sample(None, None, logits, u, temp, backend="torch")
    p = torch.softmax(logits[0] / t, -1)
    torch.testing.assert_close(logz[0], torch.logsumexp(logits[0] / t, -1))
    counts = torch.bincount(tok, minlength=v).double()
    expected = p.double() * n
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    pval = scipy_stats.chisquare(obs.numpy(), exp.numpy()).pvalue
    assert pval > 1e-3, pval
    m = 300
    ttok, tlogz, _ = kernels.head_sample(None, None, logits[:m], u[:m], temp[:m], backend="triton")
    assert torch.equal(ttok, tok[:m])
    torch.testing.assert_close(tlogz, logz[:m])


def test_reference_sample_never_picks_a_zero_probability_token():
    logits = torch.full((3, 10), -1e4)
    logits[:, 2] = 0.0
    logits[:, 6] = 0.0
    u = torch.tensor([0.0, 0.999999, 1.0 - 2**-24])
    for backend in ("torch", "triton"):
        tok, _, _ = kernels.head_sample(None, None, logits, u, torch.ones(3), backend=backend)
        assert set(tok.tolist()) <= {2, 6}
        assert tok[0] == 2 and tok[2] == 6


# ---------------------------------------------------------------------------------------------
# Verify: greedy accept length + bonus


def loop_accept(drafts, top1, nd):
    out = []
    for i in range(drafts.shape[0]):
        a = 0
        while a < nd[i] and drafts[i, a] == top1[i, a]:
            a += 1
        out.append((a, int(top1[i, a])))
    return out


@pytest.mark.parametrize("k", [0, 1, 5, 8])
def test_greedy_accept_matches_a_plain_loop_with_ragged_rows(k):
    g = torch.Generator().manual_seed(k)
    b = 9
    top1 = torch.randint(0, 3, (b, k + 1), generator=g)
    drafts = torch.where(torch.rand(b, k, generator=g) < 0.8, top1[:, :k], torch.randint(0, 3, (b, k), generator=g))
    nd = torch.randint(0, k + 1, (b,), generator=g)
    nd[0] = k
    for num in (None, nd):
        want = loop_accept(drafts, top1, num if num is not None else torch.full((b,), k))
        for backend in ("torch", "triton"):
            a, bonus = kernels.greedy_accept(drafts, top1, num, backend=backend)
            assert list(zip(a.tolist(), bonus.tolist())) == want, backend


def test_greedy_verify_from_target_logits():
    b, k, v = 4, 6, 300
    logits = rnd(b, k + 1, v, seed=50)
    top1 = logits.argmax(-1)
    drafts = top1[:, :k].clone()
    drafts[1, 2] = (drafts[1, 2] + 1) % v  # reject at 2
    drafts[2, 0] = (drafts[2, 0] + 1) % v  # reject at 0
    for backend in ("torch", "triton"):
        a, bonus = kernels.greedy_verify(drafts, logits, torch.tensor([6, 6, 6, 4]), backend=backend)
        assert a.tolist() == [6, 2, 0, 4]
        assert bonus.tolist() == [top1[0, 6], top1[1, 2], top1[2, 0], top1[3, 4]]


# ---------------------------------------------------------------------------------------------
# Whole rollout from the fused pieces


H, V, G, E, S = 16, 300, 12, 20, 8


def make_model(shift_label=True, prefix=1, dtype=torch.float32, seed=0):
    cfg = DraftConfig(
        hidden_size=H, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=V, block_size=S, num_target_layers=4, target_layer_ids=[1, 2], mask_token_id=V - 1,
        projector_type="domino", shift_label=shift_label, pure_draft_prefix_len=prefix, gru_hidden_dim=G, emb_dim=E,
    )
    torch.manual_seed(seed)
    model = DraftModel(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # make the head change most tokens (see tests/test_head.py)
        model.prefix_gru.weight_ih_l0.normal_(0, 0.8)
        model.prefix_gru.weight_hh_l0.normal_(0, 0.8)
        model.embed_proj[0].weight[:, :H].normal_(0, 0.3)
        model.embed_proj[0].weight[:, H:].normal_(0, 2.0)
        model.embed_proj[2].weight.normal_(0, 0.5)
    return model.to(dtype)


def block_inputs(b, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, k, H, generator=g).to(dtype)
    base = (2.0 * torch.randn(b, k, V, generator=g)).to(dtype)
    anchor = torch.randint(0, V, (b,), generator=g)
    embed = nn.Embedding(V, H).requires_grad_(False)
    with torch.no_grad():
        embed.weight.copy_(torch.randn(V, H, generator=g))
    return z, base, anchor, embed.to(dtype)


def prepared(model, embed):
    return kernels.prepare_from_modules(model.prefix_gru, model.embed_proj, embed.weight, model.cfg.pure_draft_prefix_len)


@pytest.mark.parametrize("shift_label,prefix", [(True, 1), (False, 1), (True, 2)])
def test_fused_rollout_reference_is_token_identical_to_engine_rollout(shift_label, prefix):
    model = make_model(shift_label, prefix)
    k = model.cfg.num_drafts
    z, base, anchor, embed = block_inputs(6, k, seed=60)
    want, _ = head_rollout(model, z, base, anchor, embed, SamplingParams())
    got = kernels.fused_rollout(prepared(model, embed), z, base, anchor, backend="torch").tokens
    assert torch.equal(got, want)
    # The head matters here: without it most drafts differ.
    assert (base.argmax(-1) != want).float().mean() > 0.3


def test_fused_rollout_split_w1_matches_cat_form_in_fp32():
    model = make_model()
    z, base, anchor, embed = block_inputs(6, S, seed=61)
    hw = prepared(model, embed)
    cat = kernels.fused_rollout(hw, z, base, anchor, backend="torch").tokens
    split = kernels.fused_rollout(hw, z, base, anchor, split_w1=True, backend="torch").tokens
    assert torch.equal(cat, split)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rollout_triton_matches_reference(dtype):
    model = make_model(dtype=dtype)
    z, base, anchor, embed = block_inputs(3, S, seed=62, dtype=dtype)
    hw = prepared(model, embed)
    want = kernels.fused_rollout(hw, z, base, anchor, backend="torch", return_logits=True)
    got = kernels.fused_rollout(hw, z, base, anchor, backend="triton", return_logits=True)
    assert torch.equal(got.tokens, want.tokens)
    err = (got.logits - want.logits).abs().max().item()
    assert err < 50 * TOL[dtype], err


def test_fused_rollout_sampling_reports_the_distribution_it_sampled_from():
    model = make_model()
    z, base, anchor, embed = block_inputs(4, S, seed=63)
    hw = prepared(model, embed)
    temp = torch.tensor([0.0, 0.7, 1.0, 1.3])
    u = torch.rand(4, S, generator=torch.Generator().manual_seed(64))
    res = {b: kernels.fused_rollout(hw, z, base, anchor, temperature=temp, uniforms=u, return_logits=True, backend=b)
           for b in ("torch", "triton")}
    assert torch.equal(res["torch"].tokens, res["triton"].tokens)
    r = res["torch"]
    q = r.draft_probs(temp)
    torch.testing.assert_close(q.sum(-1), torch.ones(4, S))
    # Row 0 is greedy: a point mass on the argmax, the same tokens as the greedy rollout.
    greedy = kernels.fused_rollout(hw, z, base, anchor, backend="torch").tokens
    assert torch.equal(r.tokens[0], greedy[0])
    assert torch.all(q[0].gather(-1, r.tokens[0][:, None]) == 1)
    # Sampled rows: each token is the inverse-CDF pick of its own reported q with its uniform.
    cdf = q[1:].double().cumsum(-1)
    pick = (cdf <= u[1:, :, None].double() * cdf[..., -1:]).sum(-1)
    assert torch.equal(pick, r.tokens[1:])


# ---------------------------------------------------------------------------------------------
# Dispatcher


def test_dispatcher_uses_the_reference_on_cpu_and_refuses_triton_without_interpreter(monkeypatch):
    monkeypatch.delenv("DOMINO_KERNELS", raising=False)
    assert kernels.resolve_backend(torch.device("cpu")) == "torch"
    assert kernels.resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("DOMINO_KERNELS", "torch")
    assert kernels.resolve_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.resolve_backend(torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.resolve_backend(torch.device("cpu"), "cuda")
