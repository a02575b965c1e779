"""SGLang 0.5.23 integration checks that run on CPU.

SGLang itself cannot run here (CUDA only, 11 GB), so these tests execute the pinned release's own
pure-Python files, read from the wheel without importing `sglang` (`domino_backend.sglang.upstream`):
`domino_greedy_rollout` (parity), `parse_dflash_draft_config` (export), and the plugin loader +
HookRegistry (entry-point discovery and hooking). They skip, saying how to get the wheel, only when
the release's files are not on the machine.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the one Triton parity case below runs on CPU

import pytest
import torch
from torch import nn

from domino_backend import cli
from domino_backend.checkpoint import HEAD_TENSORS, load_draft
from domino_backend.config import CheckpointError
from domino_backend.draft_model import DraftModel
from domino_backend.head import rollout as engine_rollout
from domino_backend.sampling import SamplingParams
from domino_backend.sglang import plugin, upstream
from domino_backend.sglang.export import export_for_sglang, parse_with_sglang, sglang_problems, tensor_problems
from domino_backend.sglang.rollout import domino_rollout, proposal_slots
from tiny import head_test_draft


@pytest.fixture(scope="module")
def sgl():
    try:
        src = upstream.find_source()
    except upstream.SGLangSourceUnavailable as e:
        pytest.skip(f"SGLang {upstream.SGLANG_VERSION} wheel unavailable: {e}")
    return src


@pytest.fixture(autouse=True)
def fresh_plugin_state(monkeypatch):
    for k in ("DOMINO_SGLANG_KERNELS", "DOMINO_SGLANG_EXACT", "DOMINO_SGLANG_SAMPLING", "DOMINO_KERNELS", "SGLANG_PLUGINS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(plugin, "STATE", plugin.PluginState())


# ---------------------------------------------------------------------------------------------
# Tiny Domino head + SGLang-shaped inputs

H, G, E = 16, 12, 20


def make_draft(v=300, block=8, shift_label=True, prefix=1, projector="domino", seed=0) -> DraftModel:
    return head_test_draft(v, block, G, E, 2, [1, 3], shift_label, prefix, projector, seed)


def sglang_inputs(model: DraftModel, batch: int, seed: int) -> dict:
    v, block = model.cfg.vocab_size, model.cfg.block_size
    g = torch.Generator().manual_seed(seed)
    embedding = nn.Embedding(v, H).requires_grad_(False)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(v, H, generator=g))
    return dict(
        draft_hidden=torch.randn(batch, block, H, generator=g),
        bonus_tokens=torch.randint(0, v, (batch,), generator=g),
        target_embedding=embedding,
        lm_head_weight=0.5 * torch.randn(v, H, generator=g),
        prefix_gru=model.prefix_gru,
        embed_proj=model.embed_proj,
        vocab_size=v,
        shift_label=model.cfg.shift_label,
    )


def upstream_rollout(sgl, kw, pool=0):
    return upstream.domino_utils().domino_greedy_rollout(**kw, candidate_pool_size=pool, in_cuda_graph=False)


# ---------------------------------------------------------------------------------------------
# Rollout parity with SGLang's domino_greedy_rollout (K = 0, full vocabulary), fp32


@pytest.mark.parametrize("shift_label", [True, False])
@pytest.mark.parametrize("batch,block,vocab", [(1, 3, 50), (4, 8, 300), (7, 16, 1000)])
def test_rollouts_are_token_identical_to_sglang_full_vocab_rollout(sgl, shift_label, batch, block, vocab):
    model = make_draft(v=vocab, block=block, shift_label=shift_label)
    kw = sglang_inputs(model, batch, seed=block + vocab)
    want = upstream_rollout(sgl, kw)
    assert want.shape == (batch, block - 1)

    # (1) the plugin's rollout (fused pieces, PyTorch references on CPU)
    ours = domino_rollout(**kw, backend="torch").tokens
    # (2) the engine's rollout on SGLang's draft slots (block_size - 1 drafts: slot 15 dropped with shift)
    z = kw["draft_hidden"][:, proposal_slots(block, shift_label)]
    base = z @ kw["lm_head_weight"].T
    engine, _ = engine_rollout(model, z, base, kw["bonus_tokens"], kw["target_embedding"], SamplingParams())
    assert torch.equal(ours, want)
    assert torch.equal(engine, want)
    if block > 3:  # the head must be doing something, or parity would prove little
        assert (base.argmax(-1) != want).float().mean() > 0.3


def test_triton_rollout_is_token_identical_to_sglang_in_the_interpreter(sgl):
    model = make_draft(v=300, block=8)
    kw = sglang_inputs(model, 3, seed=5)
    assert torch.equal(domino_rollout(**kw, backend="triton").tokens, upstream_rollout(sgl, kw))


def bench_scaled_inputs(batch: int, v=2048, h=64, g=32, e=48, block=16, seed=0) -> dict:
    """SGLang's arguments with a random head scaled by fan-in like `bench/kernels_gpu.py`'s, the
    H200 run's setup (GRU weights x4 so the state, not the base logits, picks most drafts)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return scale * torch.randn(*s, generator=gen)

    gru = nn.GRU(h, g, num_layers=1, batch_first=True, bias=False).requires_grad_(False)
    proj = nn.Sequential(nn.Linear(h + g, e, bias=False), nn.SiLU(), nn.Linear(e, v, bias=False)).requires_grad_(False)
    embedding = nn.Embedding(v, h).requires_grad_(False)
    with torch.no_grad():
        gru.weight_ih_l0.copy_(r(3 * g, h, scale=3.2 / h ** 0.5))
        gru.weight_hh_l0.copy_(r(3 * g, g, scale=3.2 / g ** 0.5))
        proj[0].weight.copy_(r(e, h + g, scale=2.0 / (h + g) ** 0.5))
        proj[2].weight.copy_(r(v, e, scale=e ** -0.5))
        embedding.weight.copy_(r(v, h))
    return dict(draft_hidden=r(batch, block, h), bonus_tokens=torch.randint(0, v, (batch,), generator=gen),
                target_embedding=embedding, lm_head_weight=r(v, h, scale=2.0 / h ** 0.5), prefix_gru=gru,
                embed_proj=proj, vocab_size=v, shift_label=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_of_eight_is_token_identical_to_sglang_and_to_each_row_alone(sgl, backend):
    """Batch > 1 in fp32: rows are laid out alike on both sides (SGLang runs position-major, we run
    batch-major) and share no state, so every token matches and each row drafts what it drafts
    alone. The H200 run's 87-88 % match at batch 8/32 is bf16 rounding, not logic (see
    bench/results/kernels_h200.md)."""
    kw = bench_scaled_inputs(8)
    want = upstream_rollout(sgl, kw)
    assert torch.equal(domino_rollout(**kw, backend=backend).tokens, want)
    for i in range(8):
        row = {**kw, "draft_hidden": kw["draft_hidden"][i:i + 1], "bonus_tokens": kw["bonus_tokens"][i:i + 1]}
        assert torch.equal(upstream_rollout(sgl, row)[0], want[i])
        assert torch.equal(domino_rollout(**row, backend="torch").tokens[0], want[i])
    # Parity must be able to fail: the head moves most drafts off the base argmax.
    z = kw["draft_hidden"][:, proposal_slots(16, True)]
    assert (z @ kw["lm_head_weight"].T).argmax(-1).ne(want).float().mean() > 0.5


def test_sglang_candidate_pool_is_approximate_and_ours_is_exact(sgl):
    """Upstream's default 2048-token pool, scaled down: a pool of 4 changes drafts; we score all."""
    model = make_draft(v=300, block=16)
    kw = sglang_inputs(model, 8, seed=6)
    exact, pooled = upstream_rollout(sgl, kw, pool=0), upstream_rollout(sgl, kw, pool=4)
    assert not torch.equal(exact, pooled)
    assert torch.equal(domino_rollout(**kw, candidate_pool_size=4, backend="torch").tokens, exact)


# ---------------------------------------------------------------------------------------------
# Export: SGLang's own config parser accepts what we write


@pytest.mark.parametrize("shift_label", [True, False])
def test_exported_checkpoint_passes_sglang_config_parser(sgl, tmp_path, shift_label):
    model = make_draft(block=16, shift_label=shift_label)
    out = export_for_sglang(model, tmp_path / "ckpt")
    parsed = parse_with_sglang(out)
    assert parsed.is_domino and parsed.projector_type == "domino"
    assert parsed.shift_label is shift_label
    assert (parsed.pure_draft_prefix_len, parsed.gru_hidden_dim, parsed.emb_dim) == (1, G, E)
    assert parsed.block_size == 16 and parsed.num_hidden_layers == 2 and parsed.num_target_layers == 4
    assert parsed.target_layer_ids == [1, 3] and parsed.mask_token_id == 299
    assert parsed.resolve_target_layer_ids(target_num_layers=4) == [1, 3]
    # and our own strict loader reads the export back unchanged
    again = load_draft(out, dtype=torch.float32)
    for k, t in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], t.to(torch.bfloat16).float())


def test_plain_dflash_export_parses_without_a_head(sgl, tmp_path):
    out = export_for_sglang(make_draft(projector=None), tmp_path / "plain")
    parsed = parse_with_sglang(out)
    assert not parsed.is_domino and parsed.gru_hidden_dim is None


def test_legacy_causal_v5_head_is_exported_under_the_name_sglang_knows(sgl, tmp_path):
    model = make_draft(projector="causal_v5")
    raw = model.cfg.to_hf_dict()
    assert not upstream.dflash_config_parser()(draft_hf_config=raw).is_domino  # 0.5.23 ignores the old name
    assert any("projector_type" in p for p in sglang_problems(raw))
    assert parse_with_sglang(export_for_sglang(model, tmp_path / "v5")).is_domino


def test_sglang_parser_and_our_export_refuse_prefix_len_two(sgl, tmp_path):
    model = make_draft(prefix=2)
    raw = model.cfg.to_hf_dict()
    with pytest.raises(ValueError, match="pure_draft_prefix_len"):
        upstream.dflash_config_parser()(draft_hf_config=raw)
    assert any("pure_draft_prefix_len" in p for p in sglang_problems(raw))
    with pytest.raises(CheckpointError, match="pure_draft_prefix_len"):
        export_for_sglang(model, tmp_path / "p2")


def test_export_refuses_a_reduced_vocabulary_drafter(tmp_path):
    model = make_draft()
    cfg = model.cfg.replace(draft_vocab_size=100)
    assert any("draft_vocab_size" in p for p in sglang_problems(cfg.to_hf_dict()))
    with pytest.raises(CheckpointError, match="full-vocabulary"):
        export_for_sglang(DraftModel(cfg), tmp_path / "reduced")


def test_exported_tensors_are_bf16_flat_names_with_the_four_head_tensors(tmp_path):
    out = export_for_sglang(make_draft(), tmp_path / "ckpt")
    assert tensor_problems(out) == []
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert set(HEAD_TENSORS) <= set(state)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]
    # a prefixed name SGLang would silently skip is reported
    from safetensors.torch import save_file

    save_file({"draft_model.fc.weight": state["fc.weight"]}, str(out / "extra.safetensors"))
    assert any("silently skip" in p for p in tensor_problems(out))


# ---------------------------------------------------------------------------------------------
# Plugin: discovered through the entry point by SGLang's own loader, hooks the rollout


def test_plugin_is_discovered_by_sglang_load_plugins_and_makes_the_rollout_exact(sgl, monkeypatch):
    monkeypatch.setenv("SGLANG_PLUGINS", plugin.ENTRY_POINT_NAME)
    model = make_draft(v=300, block=16)
    kw = sglang_inputs(model, 5, seed=7)
    with upstream.lightweight_sglang(sgl) as plugins:
        registry = plugins.HookRegistry
        du = __import__("sys").modules["sglang.srt.speculative.domino_utils"]
        original = du.domino_greedy_rollout
        plugins.load_plugins()  # SGLang's code: entry points -> register() -> apply_hooks()
        hooks = registry._hooks[plugin.ROLLOUT_TARGET]
        assert [(t.value, h, src.plugin_name) for t, h, src in hooks] == [("around", plugin.rollout_hook, "domino")]
        assert plugin.ROLLOUT_TARGET in registry._patched
        hooked = du.domino_greedy_rollout
        assert hooked is not original and hooked.__wrapped__ is original
        # Upstream would score a 4-token pool; through the hook the drafts are the exact ones.
        got = hooked(**kw, candidate_pool_size=4, in_cuda_graph=False)
        assert plugin.STATE.calls == 1
        assert torch.equal(got, original(**kw, candidate_pool_size=0, in_cuda_graph=False))
        assert not torch.equal(got, original(**kw, candidate_pool_size=4, in_cuda_graph=False))


def test_plugin_not_in_sglang_allow_list_is_not_loaded(sgl, monkeypatch):
    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else")
    with upstream.lightweight_sglang(sgl) as plugins:
        plugins.load_plugins()
        assert plugin.ROLLOUT_TARGET not in plugins.HookRegistry._hooks


def test_plugin_leaves_sglang_alone_on_another_release(monkeypatch):
    monkeypatch.setattr(plugin, "_sglang_version", lambda: "0.5.24")
    plugin.register()  # would need `sglang` importable if it went on
    assert plugin.STATE.calls == 0 and plugin.STATE.settings == plugin.Settings()


def test_rollout_hook_defers_to_upstream_for_tp_and_for_a_requested_pool(monkeypatch):
    model = make_draft(v=300, block=8)
    kw = sglang_inputs(model, 2, seed=8)
    seen = []

    def original(**k):
        seen.append(k["candidate_pool_size"])
        return "upstream"

    tp2 = type("TP", (), {"world_size": 2})()
    assert plugin.rollout_hook(original, **kw, candidate_pool_size=2048, tp_group=tp2, in_cuda_graph=False) == "upstream"
    assert seen == [0]  # exact by default, even on upstream's TP path
    plugin.STATE.settings = plugin.Settings(exact=False)
    assert plugin.rollout_hook(original, **kw, candidate_pool_size=8, in_cuda_graph=False) == "upstream"
    out = plugin.rollout_hook(original, **kw, candidate_pool_size=0, in_cuda_graph=False)
    assert out.shape == (2, 7) and seen == [0, 8] and plugin.STATE.fallbacks == 2


def test_sampling_hooks_stage_temperatures_and_hand_the_exact_draft_distribution_to_verify(sgl):
    """forward_batch_generation -> (draft) domino_greedy_rollout -> _accept_block, with fakes for the
    worker and batch: greedy rows keep the exact greedy drafts, sampled rows expose q with the
    drafted token in its support, and `_selector_sample` is set only while verify runs."""
    plugin.STATE.settings = plugin.Settings(sampling=True)
    model = make_draft(v=300, block=8)
    bs, k = 3, 7
    kw = sglang_inputs(model, bs, seed=9)
    plugin.STATE.buffers = plugin.SamplingBuffers.allocate(4, k, "cpu")
    info = type("Info", (), {"is_all_greedy": False, "temperatures": torch.tensor([[0.7], [1.0], [0.9]]),
                             "top_ks": torch.tensor([50, 1, 20])})()
    batch = type("Batch", (), {"reqs": [0] * bs, "sampling_info": info})()
    worker = type("Worker", (), {"_is_domino": True, "_selector_sample": None})()
    seen = {}

    def accept(self, **akw):
        seen["sample"] = self._selector_sample
        return "accepted"

    def forward(self, batch_):
        tokens = plugin.rollout_hook(lambda **_: None, **kw, candidate_pool_size=2048, in_cuda_graph=False)
        seen["tokens"] = tokens
        return plugin.accept_hook(accept, self, candidates=torch.zeros(bs, k + 1, dtype=torch.long))

    torch.manual_seed(0)
    assert plugin.forward_hook(forward, worker, batch) == "accepted"
    assert worker._selector_sample is None
    ids, q = seen["sample"]
    tokens = seen["tokens"]
    assert ids.shape == q.shape == (bs, k, 300)
    torch.testing.assert_close(q.sum(-1), torch.ones(bs, k))
    qd = q.gather(-1, tokens[..., None])[..., 0]
    assert torch.all(qd > 0)
    # row 1 has top_k == 1: SGLang's greedy marker -> exact greedy drafts and a point mass
    assert torch.equal(tokens[1], upstream_rollout(sgl, kw)[1])
    assert torch.all(qd[1] == 1)
    assert plugin.STATE.buffers.temperature.tolist()[:bs] == pytest.approx([0.7, 0.0, 0.9])


# ---------------------------------------------------------------------------------------------
# serve-sglang command builder


def test_serve_sglang_dry_run_prints_the_launch_command(tmp_path, capsys):
    out = export_for_sglang(make_draft(block=16), tmp_path / "ckpt")
    rc = cli.main(["serve-sglang", "--target", "Qwen/Qwen3-8B", "--draft", str(out), "--tp", "2", "--dp", "2",
                   "--port", "31000", "--dry-run", "--", "--context-length", "4096"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("SGLANG_PLUGINS=domino ")
    for part in ["-m sglang.launch_server", "--model-path Qwen/Qwen3-8B", "--speculative-algorithm DFLASH",
                 f"--speculative-draft-model-path {out}", "--speculative-domino-candidate-pool-size 0",
                 "--dtype bfloat16", "--tp-size 2", "--dp-size 2", "--port 31000", "--context-length 4096"]:
        assert part in line, part


def test_serve_sglang_refuses_a_drafter_sglang_cannot_load(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(make_draft(prefix=2).cfg.to_hf_dict()))
    assert cli.main(["serve-sglang", "--target", "t", "--draft", str(bad), "--dry-run"]) == 2
    assert "pure_draft_prefix_len" in capsys.readouterr().err


def test_serve_sglang_without_sglang_says_how_to_install(monkeypatch, capsys):
    from domino_backend.sglang import launch

    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: pytest.fail("must not launch"))
    assert cli.main(["serve-sglang", "--target", "t", "--draft", "org/drafter"]) == 2
    assert "pip install 'domino[sglang]'" in capsys.readouterr().err
