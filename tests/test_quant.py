"""The int8 target: the C kernels (AMX, AVX512-VNNI and AVX2 paths) and the PyTorch reference give
the same bits, every row is independent of the rest of the batch, and speculative decoding of the quantized
target equals its own plain decoding."""

import pytest
import torch

from domino_backend.engine import Engine, GenerationRequest
from domino_backend.quant import Int8Linear, quantize_linears, quantize_target, resolve_quant, smooth, weight_format
from domino_backend.target import Target
from kernels import int8, native, rowops

from tiny import tiny_draft, tiny_target

needs_kernel = pytest.mark.skipif(int8.kernel() is None, reason="no AVX2 or AVX512-VNNI CPU, or no C compiler")
# Every int8 GEMM this CPU runs: the AVX512 library (AMX / VNNI) and the AVX2 one.
KERNELS = [pytest.param(lib, id=lib.isa) for lib in int8.kernels()]

SHAPES = [(896, 896), (896, 128), (4864, 96), (100, 50), (64, 33)]  # (in, out): K % 64 != 0 -> VNNI path


def _weight(k: int, n: int, seed: int = 0) -> int8.QuantWeight:
    g = torch.Generator().manual_seed(seed)
    return int8.pack(int8.quantize_weight(torch.randn(n, k, generator=g)))


@pytest.mark.parametrize("lib", KERNELS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_has_the_reference_bits_for_every_batch_size(lib, k, n, dtype):
    w = _weight(k, n)
    bias = torch.randn(n)
    for m in (1, 2, 9, 16, 17, 32, 33, 70):
        x = (torch.randn(m, k) * 4).to(dtype)
        ref = int8.reference_linear(x, w, bias)
        assert torch.equal(int8.kernel_linear(lib, x, w, bias), ref), m
        assert torch.equal(int8.kernel_linear(lib, x, w, bias, amx=False), ref), m


@pytest.mark.parametrize("lib", KERNELS)
def test_a_row_has_the_same_bits_alone_in_any_batch_and_with_any_thread_count(lib):
    w = _weight(896, 4864)
    x = torch.randn(17, 896).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        both = int8.kernel_linear(lib, x, w)
        torch.set_num_threads(1)
        one_thread = int8.kernel_linear(lib, x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(both, one_thread)
    alone = torch.cat([int8.kernel_linear(lib, x[i:i + 1], w) for i in range(17)])
    assert torch.equal(both, alone)
    # a different neighbour changes nothing in row 0
    other = torch.cat([x[:1], torch.randn(8, 896).bfloat16() * 100])
    assert torch.equal(int8.kernel_linear(lib, other, w)[:1], both[:1])


def test_reference_rows_are_independent_and_close_to_the_float_product():
    lin = torch.nn.Linear(256, 64)
    q = Int8Linear(lin)
    x = torch.randn(9, 256)
    y = int8.reference_linear(x, q.qweight, q.bias)
    assert torch.equal(torch.cat([int8.reference_linear(x[i:i + 1], q.qweight, q.bias) for i in range(9)]), y)
    exact = lin(x).detach()
    assert (y - exact).norm() / exact.norm() < 0.02


def test_zero_rows_and_odd_shapes_are_handled():
    lin = torch.nn.Linear(8, 3, bias=False)
    q = Int8Linear(lin)
    assert torch.equal(q(torch.zeros(2, 8)), torch.zeros(2, 3))
    assert q(torch.randn(4, 5, 8)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        int8.pack(int8.quantize_weight(torch.randn(3, 6)))


def test_quantize_linears_swaps_every_linear_and_reports_the_format():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(16, 4)))
    assert weight_format(model) == "none"
    assert quantize_linears(model) == 2
    assert weight_format(model) == "int8"
    assert model(torch.randn(3, 8)).shape == (3, 4)
    with pytest.raises(ValueError, match="unknown quantization"):
        resolve_quant("int3")
    assert resolve_quant("auto") == ("int8" if int8.kernel() is not None else "none")


def test_gradients_are_refused_with_a_clear_error():
    q = Int8Linear(torch.nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="inference-only"):
        q(torch.randn(2, 8, requires_grad=True))


class ByteTokenizer:
    """Calibration text -> ids in a tiny vocabulary (no chat template)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text: str) -> dict:
        return {"input_ids": [b % self.vocab for b in text.encode()]}


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_smoothing_keeps_the_float_model_and_shrinks_the_activation_range(family):
    model = tiny_target(family, seed=3).model
    layer = model.model.layers[0]
    with torch.no_grad():  # one loud input channel, as real models have
        layer.post_attention_layernorm.weight[5] = 40.0
    x = torch.randint(0, 64, (1, 40))
    before = model(x).logits
    seen = []

    def record(mod, args):  # returns None: the input goes on unchanged
        seen.append(args[0].abs().amax((0, 1)))

    hook = layer.mlp.gate_proj.register_forward_pre_hook(record)
    model(x)
    assert smooth(model, ByteTokenizer(64)) == len(model.model.layers)
    after = model(x).logits
    hook.remove()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    spread = [(a.max() / a.median()).item() for a in seen[:1] + seen[-1:]]  # before, after
    assert spread[1] < spread[0] / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_hadamard_rotated_int8_linear_keeps_the_function_and_quantizes_outlier_channels_better(dtype):
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(256, 64, bias=True)
    x = torch.randn(9, 256, generator=g)
    x[:, 3] *= 60  # one loud input channel: per-row int8 flattens the others
    want = lin(x).detach()
    errors = []
    for hadamard in (False, True):
        q = Int8Linear(lin, hadamard=hadamard)
        assert q.hadamard == hadamard and ("hadamard" in repr(q)) == hadamard
        errors.append((q(x.to(dtype)).float() - want).pow(2).mean().item() / want.pow(2).mean().item())
    assert errors[1] < errors[0] / 4, errors
    assert errors[1] < 1e-3
    with pytest.raises(ValueError, match="divisible by 16"):
        Int8Linear(torch.nn.Linear(24, 8), hadamard=True)


@pytest.mark.skipif(native.library_avx2() is None, reason="no AVX2 CPU or no C compiler")
@pytest.mark.parametrize("rows", [1, 17, 40])  # 40 x 4864: threads split rows
def test_the_fp32_hadamard_kernel_has_the_reference_bits_alone_in_any_batch_and_on_any_thread_count(rows):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(rows, 4864, generator=g) * torch.rand(4864, generator=g).pow(8).mul(50)  # loud channels
    out = rowops.hadamard16(x)
    assert torch.equal(out, rowops.hadamard16_reference(x))  # the same butterflies, in the same order
    h = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(16)] for i in range(16)]) / 4
    torch.testing.assert_close(out, (x.view(rows, -1, 16) @ h).view(rows, -1), atol=1e-4, rtol=1e-4)
    wide = torch.cat([x, torch.randn(rows, 16, generator=g)], 1)[:, :4864]  # rows at a stride
    assert torch.equal(rowops.hadamard16(wide), out)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(rowops.hadamard16(x), out)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(rowops.hadamard16(x[i:i + 1])[0], out[i]) for i in range(rows))
    calls = []
    lib = native.library_avx2()
    real = lib.hadamard16_f32
    try:  # the kernel, not the reference, gave these bits
        lib.hadamard16_f32 = lambda *a: (calls.append(a), real(*a))
        rowops.hadamard16(x)
    finally:
        lib.hadamard16_f32 = real
    assert len(calls) == 1


def test_the_int8_target_rotates_every_down_projection_and_fuses_only_unrotated_parts():
    model = tiny_target("llama", seed=1).model
    quantize_target(model, ByteTokenizer(64))
    layers = model.model.layers
    assert all(l.mlp.down_proj.hadamard and not l.mlp.up_proj.hadamard for l in layers)
    assert Int8Linear.fused([layers[0].mlp.gate_proj, layers[0].mlp.up_proj]) is not None
    assert Int8Linear.fused([layers[0].mlp.down_proj, layers[0].mlp.down_proj]) is None


def test_calibration_is_measured_once_per_model_and_remeasured_when_a_weight_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DOMINO_CACHE", str(tmp_path))
    forwards = []

    def smoothed(edit=None):
        model = tiny_target("llama", seed=5).model
        if edit:
            with torch.no_grad():
                edit(model)
        model.register_forward_pre_hook(lambda mod, args: forwards.append(1))
        smooth(model, ByteTokenizer(64))
        return model.state_dict()

    first, again = smoothed(), smoothed()
    assert len(forwards) == 1 and len(list((tmp_path / "quant").iterdir())) == 1
    assert all(torch.equal(first[k], again[k]) for k in first)  # the cached ranges smooth identically
    loud = smoothed(lambda m: m.model.layers[0].post_attention_layernorm.weight.__setitem__(5, 40.0))
    assert len(forwards) == 2  # one norm value changed: another model, measured afresh
    assert not torch.equal(loud["model.layers.0.mlp.gate_proj.weight"], first["model.layers.0.mlp.gate_proj.weight"])


def test_smoothing_skips_models_without_the_decoder_layout():
    assert smooth(torch.nn.Sequential(torch.nn.Linear(4, 4)), ByteTokenizer(8)) == 0


def _int8_engine(family: str, dtype: torch.dtype = torch.float32) -> Engine:
    """bf16 runs with head_dim 32: q/k/v and gate/up fuse into one int8 call each, and the norms,
    rotary products and attention run as CPU kernels (kernels.rowops, kernels.attention; with AMX
    tiles and the sessions' packed caches where the CPU has them)."""
    model = tiny_target(family, peak=3.0, seed=1, head_dim=8 if dtype == torch.float32 else 32).model.to(dtype)
    quantize_target(model, ByteTokenizer(64))  # before Target(): it keeps a handle on the LM head
    target = Target(model, tokenizer=None)
    return Engine(target, tiny_draft(target, seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("method", ["ngram", "dflash", "domino", "domino+ngram"])
def test_speculation_on_the_int8_target_equals_its_plain_decoding(family, method, dtype):
    engine = _int8_engine(family, dtype)
    assert weight_format(engine.target.model) == "int8"
    prompts = [[5, 9, 13, 5, 9, 13, 5, 9], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
    for ids in prompts:
        ref = engine.generate(ids, GenerationRequest(max_new_tokens=24, method="ar"))
        gen = engine.generate(ids, GenerationRequest(max_new_tokens=24, method=method, adaptive_drafts=False))
        assert gen.token_ids == ref.token_ids


def test_a_mixed_batch_on_the_int8_bf16_target_equals_each_ones_plain_decoding():
    """The served configuration: int8 target in bf16, attention on the CPU kernel (on AMX CPUs one
    call per layer for every sequence of a forward, against their packed caches)."""
    engine = _int8_engine("qwen3", torch.bfloat16)
    prompts = [[5, 9, 13, 5, 9, 13, 5, 9], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], list(range(2, 40)), [7]]
    methods = ["ar", "domino", "domino+ngram", "ngram"]
    gens = [engine.stream(p, GenerationRequest(max_new_tokens=20 + 3 * i, method=m))
            for i, (p, m) in enumerate(zip(prompts, methods))]
    while any(g.finish_reason is None for g in gens):
        engine.step([g for g in gens if g.finish_reason is None])
    for i, (p, g) in enumerate(zip(prompts, gens)):
        assert g.token_ids == engine.generate(p, GenerationRequest(max_new_tokens=20 + 3 * i, method="ar")).token_ids


def test_switching_threads_between_rounds_changes_no_token():
    """The server gives a voice reply's first rounds more threads than the rest (app/scheduler.py):
    a generation whose rounds alternate 1 and 2 threads equals plain decoding on 1 thread."""
    engine = _int8_engine("qwen3", torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
        ref = engine.generate(ids, GenerationRequest(max_new_tokens=24, method="ar"))
        for method in ("ar", "domino+ngram"):
            gen, n = engine.stream(ids, GenerationRequest(max_new_tokens=24, method=method)), 0
            while gen.finish_reason is None:
                torch.set_num_threads(1 + n % 2)
                engine.step([gen])
                n += 1
            assert gen.token_ids == ref.token_ids, method
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(getattr(int8.kernel(), "isa", None) != "avx512", reason="the layer kernels need AVX512-VNNI")
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_a_layer_in_two_kernel_calls_gives_the_step_by_step_bits(family):
    """kernels/cpu/layer.c runs a layer's int8 GEMMs and row ops in two calls; logits and features
    equal those of the same ops called one by one, for a prefill and a verify."""
    engine = _int8_engine(family, torch.bfloat16)
    fwd = engine.target.forward_batch
    fused = fwd.fused_layers
    assert all(p is not None for p in fused) == (family == "llama")  # qwen3's q/k norms: step by step
    layers = [0, 1, engine.target.num_layers - 1]
    outs = []
    for plans in (fused, [None] * len(fused)):
        fwd.fused_layers = plans
        s = engine.target.session()
        first = s.forward(torch.arange(3, 40), layer_ids=layers, keep_last=1, prefill=True)
        second = s.forward(torch.tensor([5, 9, 13, 2]), layer_ids=layers)
        outs.append([first.logits, first.feats, second.logits, second.feats])
    fwd.fused_layers = fused
    assert all(torch.equal(a, b) for a, b in zip(*outs))
