"""The quantized CPU target: every Linear layer (LM head included) as int8 weights times int8 rows.

Decoding one token reads every weight once, so on a CPU the target's speed is its weight bytes over
the memory bandwidth; int8 halves bf16's bytes. Speculative decoding also needs a verify of K + 1
rows to cost about what one row does, and to give each row the same bits as decoding it alone.
`kernels.int8` provides both: an AMX int8 GEMM whose time is flat from M = 1 to 32 (AVX512-VNNI or
AVX2 kernels with the same bits where there is no AMX), with per-row activation quantization and
an exact integer sum, so rows are independent bitwise (`python bench/cpu_linear.py` measures them
against bf16 and fp32 per M).

Per-row int8 rounds every channel of a row to the row's largest value, and a few input channels of
these models carry values 10-100x the rest (the MLP's down projection above all). `smooth` first
moves that range from the activations into the weights (SmoothQuant, alpha = 0.5): per input
channel j, x_j / s_j and W[:, j] * s_j, an exact rewrite folded into the RMSNorm weight before
q/k/v and gate/up, and into up_proj's rows before down_proj. The scales come from one bf16 forward
over a fixed calibration text shipped with the package (`quant_calibration.txt`, as a chat).
down_proj's input (SiLU(gate) * up) stays heavy-tailed after that, so down_proj also rotates it:
an orthonormal 16-point Hadamard transform H per block of 16 channels at run time
(`kernels.rowops.hadamard16`, a handful of vector ops per row), and W H in place of W, another
exact rewrite (x W^T = (x H)(W H)^T). A block's outliers spread over its 16 channels, so the row's
int8 scale no longer flattens the rest: on held-out chat text this removes most of int8's
perplexity increase (bench/quant_quality.py).

`--quant int8` is lossless with respect to the quantized target: every method's output equals
plain decoding of the same int8 model. It is a different model from the bf16 one, slightly:
`python bench/quant_quality.py` measures perplexity and greedy agreement against bf16.
`auto` picks int8 where a compiled kernel runs (CPUs with AVX512-VNNI or AVX2, and a C compiler)
and leaves the weights as they are elsewhere, where int8 would only be slower.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from kernels import int8, rowops

from .models import cache_dir

QUANT_MODES = ("auto", "int8", "none")
CALIBRATION = Path(__file__).with_name("quant_calibration.txt")
CALIBRATION_TOKENS = 2048
ALPHA = 0.5  # share of the activation range moved into the weights
HADAMARD = 16  # down_proj's input rotation: block size (kernels.rowops.hadamard16)
CACHE_SAMPLES = 4096  # values of each weight the calibration cache key reads (all of smaller ones)


def rotate_weight(w: torch.Tensor) -> torch.Tensor:
    """W H for a [N, K] weight: each block of HADAMARD input channels times the Hadamard matrix
    (symmetric, orthonormal), in fp64 -> fp32."""
    n, k = w.shape
    h = rowops.hadamard16_reference(torch.eye(HADAMARD, dtype=torch.float64))
    return (w.detach().double().reshape(n, k // HADAMARD, HADAMARD) @ h).reshape(n, k).float()


class Int8Linear(nn.Module):
    """Drop-in for an inference-only `nn.Linear`: int8 weight (one scale per output channel), fp32
    bias, activations quantized per row when it runs. Output in the input's dtype.

    hadamard: the layer computes the same function from a rotated weight (W H, quantized) and
    rotates each input row (x H, `kernels.rowops.hadamard16`) before quantizing it."""

    def __init__(self, linear: nn.Linear, hadamard: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if hadamard and self.in_features % HADAMARD:
            raise ValueError(f"a Hadamard-rotated Linear needs in_features divisible by {HADAMARD}")
        self.hadamard = hadamard
        w = rotate_weight(linear.weight) if hadamard else linear.weight
        self.qweight = int8.pack(int8.quantize_weight(w))
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Int8Linear is inference-only (no gradients through a quantized target)")
        rows = x.reshape(-1, self.in_features)
        if self.hadamard:
            rows = rowops.hadamard16(rows)
        lib = int8.kernel()
        if lib is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            y = int8.kernel_linear(lib, rows, self.qweight, self.bias)
        else:
            y = int8.reference_linear(rows, self.qweight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8" + ", hadamard" * self.hadamard

    @classmethod
    def fused(cls, parts: list[nn.Module]) -> "Int8Linear | None":
        """One Int8Linear computing `parts` (Int8Linears of the same input) side by side, or None
        when they are not all int8 or not fusable. Output channels are independent, so each part's
        slice of the result has the bits the part gives alone; the parts keep working, on views
        into the fused weight (no extra memory)."""
        if (not all(isinstance(p, cls) and not p.hadamard for p in parts)
                or len({p.bias is None for p in parts}) > 1):
            return None
        try:
            weight = int8.concat([p.qweight for p in parts])
        except ValueError:
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = parts[0].in_features, int(weight.q.shape[0])
        fused.qweight, fused.hadamard = weight, False
        fused.bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        return fused


def resolve_quant(mode: str) -> str:
    """The meaning of `auto`: int8 where the compiled kernel runs, else none."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose from {', '.join(QUANT_MODES)}")
    if mode == "auto":
        return "int8" if int8.kernel() is not None else "none"
    return mode


def calibration_ids(tokenizer) -> list[int]:
    """The calibration text as a two-turn chat when the tokenizer has a template (its special tokens
    drive some of the largest activations, and chat prompts meet them), else as plain text."""
    text = CALIBRATION.read_text()
    if getattr(tokenizer, "chat_template", None):
        half = len(text) // 2
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text[:half]},
                                             {"role": "assistant", "content": text[half:]}], tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(text)["input_ids"]
    return list(ids)[:CALIBRATION_TOKENS]


def calibration_amax(model: nn.Module, tokenizer, linears: list[nn.Module]) -> dict[nn.Module, torch.Tensor]:
    """Each of `linears`' largest absolute input per channel over one forward of the calibration
    text. Kept in the Domino cache (`quant/`), keyed by the calibration tokens, the model's config
    and dtype and a digest of its weights (every value of the small ones, norms and biases, a
    strided sample of the large ones: a fine-tune changes them all), so a later load of the same
    model skips the forward (a few seconds on 2 cores, more in fp32)."""
    ids = calibration_ids(tokenizer)
    names = {m: n for n, m in model.named_modules()}
    config = getattr(model, "config", None)
    digest = hashlib.sha256(json.dumps([ids, str(getattr(model, "dtype", "")),
                                        config.to_json_string() if config is not None else ""]).encode())
    for _, p in sorted(model.named_parameters()):  # small tensors whole, large ones by a strided sample
        flat = p.detach().reshape(-1)
        digest.update(flat[::max(1, flat.numel() // CACHE_SAMPLES)].float().cpu().numpy().tobytes())
    path = cache_dir() / "quant" / f"amax-{digest.hexdigest()[:24]}.pt"
    try:
        saved = torch.load(path, weights_only=True)
        return {lin: saved[names[lin]].to(lin.weight.device) for lin in linears}
    except Exception:  # not cached yet, or unreadable: measure
        pass
    amax: dict[nn.Module, torch.Tensor] = {}

    def record(mod, args):
        a = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
        amax[mod] = torch.maximum(amax[mod], a) if mod in amax else a

    hooks = [lin.register_forward_pre_hook(record) for lin in linears]
    try:
        model(torch.tensor(ids, device=model.device)[None])
    finally:
        for h in hooks:
            h.remove()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({names[lin]: a.cpu() for lin, a in amax.items()}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent load wins or loses the rename
    except OSError:
        pass  # a read-only cache only costs the next load the forward
    return amax


def _smoothing_scale(amax: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """s_j = amax_j^alpha / max|W[:, j]|^(1 - alpha) over the linears that share input channel j."""
    w = torch.stack([lin.weight.detach().float().abs().amax(0) for lin in linears]).amax(0)
    return (amax.clamp_min(1e-5).pow(ALPHA) / w.clamp_min(1e-5).pow(1 - ALPHA)).clamp_min(1e-5)


def _scale_inputs(linears: list[nn.Linear], s: torch.Tensor) -> None:
    for lin in linears:  # fp32 from here on: quantize_linears rounds once, to int8
        lin.weight.data = lin.weight.detach().float() * s


@torch.inference_mode()
def smooth(model: nn.Module, tokenizer) -> int:
    """Rewrite `model` in place so that its Linear inputs quantize well (see the module docstring);
    the float model computes the same function up to rounding. Returns the layers rewritten: 0 for
    architectures without the Llama-style layout (`model.model.layers[i]` with input_layernorm,
    self_attn.{q,k,v}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    try:
        points = [(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                   layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.up_proj,
                   layer.mlp.down_proj) for layer in layers or []]
    except AttributeError:
        return 0
    if not points:
        return 0
    first = [p[1][0] for p in points] + [p[3][0] for p in points] + [p[5] for p in points]
    amax = calibration_amax(model, tokenizer, first)
    for norm1, qkv, norm2, gate_up, up, down in points:
        for norm, group in ((norm1, qkv), (norm2, gate_up)):
            s = _smoothing_scale(amax[group[0]], group)
            norm.weight.data = (norm.weight.detach().float() / s).to(norm.weight.dtype)
            _scale_inputs(group, s)
        s = _smoothing_scale(amax[down], [down])
        up.weight.data = up.weight.detach().float() / s[:, None]
        if up.bias is not None:
            up.bias.data = up.bias.detach().float() / s
        _scale_inputs([down], s)
    return len(points)


def quantize_target(model: nn.Module, tokenizer) -> int:
    """`smooth`, then the Hadamard-rotated int8 down_proj of each layer where smoothing applied,
    then `quantize_linears` for the rest: the int8 target. Returns how many Linears were swapped."""
    rotated = 0
    if smooth(model, tokenizer):
        for layer in model.model.layers:
            if layer.mlp.down_proj.in_features % HADAMARD == 0:
                layer.mlp.down_proj = Int8Linear(layer.mlp.down_proj, hadamard=True)
                rotated += 1
    return rotated + quantize_linears(model)


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Replace every `nn.Linear` (or subclass, e.g. `PackedLinear`) of `model` whose attribute name
    is not in `skip` by an `Int8Linear`, in place; returns how many. The float weights are dropped
    unless something else (a tied embedding) still holds them."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and name not in skip]
    for parent, name, child in swaps:
        setattr(parent, name, Int8Linear(child))
    return len(swaps)


def weight_format(model: nn.Module) -> str:
    """"int8" when the model's Linear layers are quantized, else "none"."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else "none"
