"""CPU speed settings: they must change kernels, never results."""

import copy
import os

import pytest
import torch

from domino_backend import cpu
from domino_backend.engine import Engine

from tiny import tiny_draft, tiny_target


def _packed_linears(model):
    return [m for m in model.modules() if isinstance(m, cpu.PackedLinear)]


def test_packing_keeps_parameters_and_logits_and_is_idempotent():
    t = tiny_target()
    model = t.model
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    lm_head = t.lm_head
    ids = torch.randint(0, t.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert cpu.pack_linears(model) == n_linear > 0
    assert len(_packed_linears(model)) == n_linear and t.lm_head is lm_head  # swapped in place
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1]), name  # same objects and values
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert cpu.pack_linears(model) == 0


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not cpu.cpu_has_fast_bf16(), reason="bf16 is packed only on CPUs with native bf16"))])
@pytest.mark.parametrize("shape", [(4864, 896), (896, 4864), (896, 128)])  # the default target's MLP, q/kv
def test_packed_rows_have_the_same_bits_for_any_number_of_rows(shape, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(*shape, bias=shape[1] == 128).to(dtype)
    cpu.pack_linears(lin)
    x = torch.randn(17, shape[0]).to(dtype)
    with torch.no_grad():
        ref = lin(x)
        for m in range(1, 17):
            assert torch.equal(lin(x[:m]), ref[:m]), m


def test_packing_takes_fp32_and_only_native_bf16(monkeypatch):
    t = tiny_target()
    t.model.to(torch.float64)
    assert cpu.pack_linears(t.model) == 0 and not _packed_linears(t.model)
    t.model.to(torch.bfloat16)
    monkeypatch.setattr(cpu, "cpu_has_fast_bf16", lambda: False)  # emulated bf16: leave it alone
    assert cpu.pack_linears(t.model) == 0
    if not ({"avx512bw", "avx512vl", "avx512dq"} <= cpu.cpu_flags() or "avx_ne_convert" in cpu.cpu_flags()):
        pytest.skip("oneDNN packs bf16 weights only on CPUs with AVX512BW/VL/DQ or AVX-NE-CONVERT")
    monkeypatch.setattr(cpu, "cpu_has_fast_bf16", lambda: True)
    assert cpu.pack_linears(t.model) > 0


def test_packed_linear_follows_weight_updates_and_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 40)
    ref = torch.nn.Linear(16, 40)
    ref.load_state_dict(lin.state_dict())
    cpu.pack_linears(lin)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        lin.weight.mul_(-2)  # in place: the packed copy must be remade
        ref.weight.mul_(-2)
        torch.testing.assert_close(lin(x), ref(x))
    lin.load_state_dict({"weight": torch.randn(40, 16), "bias": torch.randn(40)})
    ref.load_state_dict(lin.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), ref(x))
    # training passes gradients through the target's frozen LM head to the drafter
    lin.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    lin(xg).square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)


def test_packed_models_can_be_copied_and_cast():
    t = tiny_target()
    cpu.pack_linears(t.model)
    ids = torch.randint(0, t.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = t.model(ids).logits
        twin = copy.deepcopy(t.model)
        torch.testing.assert_close(twin(ids).logits, want)
        twin.to(torch.float64)  # cast after packing: the plain path, right dtype
        torch.testing.assert_close(twin(ids).logits, want.double(), rtol=1e-4, atol=1e-4)


def test_engine_packs_target_and_drafter():
    t = tiny_target()
    draft = tiny_draft(t)
    Engine(t, draft)
    assert isinstance(t.lm_head, cpu.PackedLinear)
    assert _packed_linears(draft)


def test_mkl_avx2_pinned_only_on_amd_and_never_over_the_users_choice(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"GenuineIntel", "avx2", "avx512f"}))
    assert not cpu.pin_mkl_avx2_on_amd() and "MKL_CBWR" not in os.environ
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"AuthenticAMD", "avx2"}))
    assert cpu.pin_mkl_avx2_on_amd()
    assert os.environ["MKL_CBWR"] == "AVX2"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert not cpu.pin_mkl_avx2_on_amd()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
