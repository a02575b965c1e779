"""CPU speed settings: they must change kernels, never results."""

import os

import torch

from domino_backend import cpu
from domino_backend.engine import Engine

from tiny import tiny_draft, tiny_target


def test_layout_tuning_keeps_weights_and_logits_and_touches_only_widening_linears():
    t = tiny_target()
    model = t.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, t.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    changed = cpu.tune_linear_layout(model)
    widening = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features > m.in_features]
    assert changed == len(widening) > 0
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # same values, same names
        mod_is_wide = any(p is m.weight for m in widening)
        assert p.is_contiguous() != mod_is_wide, name
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert cpu.tune_linear_layout(model) == 0  # idempotent


def test_layout_tuning_leaves_non_fp32_models_alone():
    t = tiny_target()
    t.model.to(torch.bfloat16)
    assert cpu.tune_linear_layout(t.model) == 0
    assert all(p.is_contiguous() for p in t.model.parameters())


def test_engine_tunes_target_and_drafter():
    t = tiny_target()
    draft = tiny_draft(t)
    Engine(t, draft)
    assert not t.model.lm_head.weight.is_contiguous()
    assert any(not p.is_contiguous() for p in draft.parameters())


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
