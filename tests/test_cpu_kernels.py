"""The CPU kernels beside the int8 GEMM: the decoder's row operations (kernels.rowops) compute what
the PyTorch ops compute, give every row the same bits alone, in any batch and on any thread count,
and fused int8 projections give each part the bits it gives alone."""

import pytest
import torch
import torch.nn.functional as F

from domino_backend.quant import Int8Linear
from kernels import int8, rowops
from kernels.attention import kernel

pytestmark = pytest.mark.skipif(kernel() is None, reason="the CPU kernels need AVX512 and a C compiler")


def _bf16(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _rows_are_independent(fn, x_rows: list[torch.Tensor]):
    """fn on all rows, on each row alone, and on one thread: the same bits."""
    whole = fn(torch.stack(x_rows))
    before = _threads(1)
    try:
        single = fn(torch.stack(x_rows))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(whole, single)
    for i, row in enumerate(x_rows):
        assert torch.equal(fn(row[None])[0], whole[i])


@pytest.mark.parametrize("rows,d", [(1, 896), (9, 896), (100, 896), (5, 40)])  # 100 x 896: threads split rows
def test_add_rms_norm_is_the_residual_add_then_rmsnorm_and_rowwise(rows, d):
    h, delta, w = _bf16(rows, d, seed=1), _bf16(rows, d, seed=2), _bf16(d, seed=3)
    total, out = rowops.add_rms_norm(h, delta, w, 1e-6)
    assert torch.equal(total, h + delta)  # the add rounds like torch's bf16 add
    x = total.float()
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    same, normed = rowops.add_rms_norm(total, None, w, 1e-6)
    assert same is total and torch.equal(normed, out)
    _rows_are_independent(lambda x: rowops.add_rms_norm(x, None, w, 1e-6)[1], list(total))


def test_rope_rotates_each_head_by_its_rows_angles_in_place_and_rowwise():
    n, heads, d = 6, 14, 64
    x = _bf16(n, heads, d, seed=4)
    ang = torch.arange(n)[:, None].float() * torch.rand(d // 2, generator=torch.Generator().manual_seed(5))
    cos, sin = torch.cat([ang.cos()] * 2, 1).bfloat16(), torch.cat([ang.sin()] * 2, 1).bfloat16()
    xf = x.float()
    rot = torch.cat([-xf[..., d // 2:], xf[..., :d // 2]], -1)
    ref = xf * cos.float()[:, None] + rot * sin.float()[:, None]
    out = rowops.rope_(x.clone(), cos, sin)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    wide = torch.cat([x.reshape(n, -1), _bf16(n, 32, seed=6)], 1)  # rows at a stride, as a fused q/k/v gives them
    assert torch.equal(rowops.rope_(wide[:, :heads * d].view(n, heads, d), cos, sin), out)
    for i in range(n):
        assert torch.equal(rowops.rope_(x[i:i + 1].clone(), cos[i:i + 1], sin[i:i + 1])[0], out[i])


@pytest.mark.parametrize("rows", [1, 17, 40])  # 40 x 4864: threads split rows
def test_silu_mul_is_silu_of_gate_times_up_and_rowwise(rows):
    gate, up = _bf16(rows, 4864, seed=7, scale=4.0), _bf16(rows, 4864, seed=8)
    out = rowops.silu_mul(gate, up)
    torch.testing.assert_close(out.float(), F.silu(gate.float()) * up.float(), atol=2e-2, rtol=1e-2)
    gate_up = torch.cat([gate, up], 1)
    assert torch.equal(rowops.silu_mul(*gate_up.chunk(2, 1)), out)
    _rows_are_independent(lambda x: rowops.silu_mul(*x.chunk(2, 1)), list(gate_up))


@pytest.mark.parametrize("rows", [1, 17, 40])  # 40 x 4864: threads split rows
def test_hadamard16_is_the_orthonormal_block_transform_with_the_reference_bits_and_rowwise(rows):
    x = _bf16(rows, 4864, seed=9) * torch.rand(4864, generator=torch.Generator().manual_seed(10)).pow(8).mul(50).bfloat16()
    out = rowops.hadamard16(x)
    assert torch.equal(out, rowops.hadamard16_reference(x))  # the same butterflies, the same roundings
    h = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(16)] for i in range(16)]) / 4
    torch.testing.assert_close(out.float(), (x.float().view(rows, -1, 16) @ h).view(rows, -1), atol=2e-2, rtol=1e-2)
    back = rowops.hadamard16(out).float()  # H H = I, up to two bf16 roundings
    assert (back - x.float()).norm() < 1e-2 * x.float().norm()
    assert out.float().abs().amax() < x.float().abs().amax()  # a loud channel spreads over its block
    wide = torch.cat([x, _bf16(rows, 16, seed=11)], 1)[:, :4864]  # rows at a stride
    assert torch.equal(rowops.hadamard16(wide), out)
    _rows_are_independent(rowops.hadamard16, list(x))


@pytest.mark.skipif(int8.kernel() is None, reason="no AVX512-VNNI CPU")
@pytest.mark.parametrize("bias", [True, False])
def test_fused_int8_projections_give_each_part_its_own_bits(bias):
    g = torch.Generator().manual_seed(9)
    parts = [torch.nn.Linear(96, n, bias=bias) for n in (64, 32, 32)]
    for p in parts:
        torch.nn.init.normal_(p.weight, generator=g)
    q = [Int8Linear(p) for p in parts]
    x = _bf16(5, 96, seed=10)
    alone = [m(x) for m in q]
    fused = Int8Linear.fused(q)
    assert fused is not None and fused.out_features == 128
    assert torch.equal(fused(x), torch.cat(alone, 1))
    assert all(torch.equal(m(x), a) for m, a in zip(q, alone))  # the parts now read views of the fused weight
    assert Int8Linear.fused([q[0], Int8Linear(torch.nn.Linear(96, 40))]) is None  # 40 channels: not block-aligned
    assert Int8Linear.fused([q[0], parts[1]]) is None  # a float part
