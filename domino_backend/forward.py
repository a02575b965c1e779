"""The target's forward pass over several sequences at once: rows packed, attention per sequence.

A `Pass` is one sequence's rows for one forward (a prefill chunk, a verify chain or a draft tree)
over its own KV cache (`TargetSession`). `PackedForward` runs any number of them as one [sum T_i, H]
activation: embeddings, every Linear, RMSNorm, RoPE (per-row positions) and the MLP see all rows
together, so each weight is read once per forward whatever the batch; attention runs per sequence
against its own cache with the row-wise rule of batch_invariant.py. Every op is row-wise or
per-sequence, so a sequence's logits and features have the same bits alone or in any batch
(tests/test_batched_rounds.py); a single request is a batch of one through the same code.

The layers are the Hugging Face model's own modules, called on 2-D row tensors (never their
Linear weights directly, so a packed or quantized Linear plugs in). On bf16 CPU rows the norms,
rotary products and MLP activation run as compiled kernels instead (`kernels.rowops`: same
arithmetic, one rounding each, row-wise too). Supported: the Llama-style decoder
families (`SUPPORTED`: pre-norm attention + gated MLP, RoPE, optional q/k norms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import int8, rowops

from .batch_invariant import attend_all, prefill_blocks, tree_mask, visible_rows
from .config import text_config
from .quant import Int8Linear

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class Preempted(Exception):
    """A forward stopped between layers because its caller asked (`PackedForward(passes, stop)`);
    like any failed forward it left every session's length, so every cache, as it was."""


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [T_kept, V] fp32
    feats: torch.Tensor | None  # [T, L*H] concatenated layer outputs, or None when not captured


@dataclass(eq=False)
class Pass:
    """One sequence's rows in a forward. ids [T] run at positions length .. length + T - 1 of
    `session` (a draft tree: each node at its depth, seeing the cache, its ancestors and itself).

    keep_last: logits for the last N rows only (0 = all; None = none: a prefill chunk that is not
    the prompt's last). layer_ids: capture these layers' outputs. parents: `ids` is a draft tree,
    ids[0] its root and parents[i] the index of ids[i + 1]'s parent (0 = the root). prefill: prompt
    rows, whose aligned blocks attend in fused calls (batch_invariant.py); else every row attends
    as decoding does."""

    session: object  # target.TargetSession
    ids: torch.Tensor
    layer_ids: list[int] | None = None
    keep_last: int | None = 0
    parents: list[int] | None = None
    prefill: bool = False


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PackedForward:
    """The forward of a Hugging Face Llama-style causal LM over packed rows of many sequences."""

    def __init__(self, model):
        cfg = text_config(model.config)
        kind = getattr(cfg, "model_type", None)
        if kind not in SUPPORTED:
            raise ValueError(f"target architecture {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
        if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
            raise ValueError("targets with sliding-window attention layers are not supported")
        base = model.get_decoder()
        self.embed, self.layers, self.norm, self.rotary = base.embed_tokens, base.layers, base.norm, base.rotary_emb
        self.lm_head = model.get_output_embeddings()
        attn = self.layers[0].self_attn
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.qk_norm = hasattr(attn, "q_norm")
        # Per layer, q/k/v and gate/up as one int8 call each where the target is quantized (None: separate calls).
        self.qkv = [Int8Linear.fused([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in self.layers]
        self.gate_up = [Int8Linear.fused([l.mlp.gate_proj, l.mlp.up_proj]) for l in self.layers]
        # Per layer, the descriptors of its four int8 GEMMs (q/k/v, o, gate/up, down) and whether
        # down_proj rotates its input, when the whole layer around attention can run as two kernel
        # calls (rowops.layer_attn_in / layer_mlp).
        self.fused_layers = [self._fuse(l, qkv, gu) for l, qkv, gu in zip(self.layers, self.qkv, self.gate_up)]

    def _fuse(self, layer, qkv, gate_up) -> tuple | None:
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        if self.qk_norm or qkv is None or gate_up is None or not all(isinstance(m, Int8Linear) for m in (o, down)):
            return None
        return (*(int8.descriptor(m.qweight, m.bias) for m in (qkv, o, gate_up, down)), down.hadamard)

    @staticmethod
    def _add_norm(fast: bool, h: torch.Tensor, delta: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, norm(h + delta)); h itself when delta is None."""
        if fast:
            return rowops.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon)
        if delta is not None:
            h = h + delta
        return h, norm(h)

    def _qkv(self, li: int, h, delta, cos, sin, fast: bool, whole: bool):
        """Layer li up to attention: (h + delta, q [N, H, D], k and v [N, KV, D]) with rotary applied.
        fast: the row-op kernels; whole: the layer's int8 GEMMs too, in one kernel call."""
        layer, a = self.layers[li], self.layers[li].self_attn
        n, nh, nkv, d = h.shape[0], self.heads, self.kv_heads, self.head_dim
        plan = self.fused_layers[li] if whole else None
        if plan is not None:
            h, qkv = rowops.layer_attn_in(h, delta, layer.input_layernorm, plan[0], cos, sin, nh, nkv, d)
            q, k, v = qkv.split([nh * d, nkv * d, nkv * d], 1)
            return h, q.view(n, nh, d), k.view(n, nkv, d), v.view(n, nkv, d)
        h, x = self._add_norm(fast, h, delta, layer.input_layernorm)
        if self.qkv[li] is not None:
            q, k, v = self.qkv[li](x).split([nh * d, nkv * d, nkv * d], 1)
        else:
            q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
        q, k, v = q.view(n, nh, d), k.view(n, nkv, d), v.view(n, nkv, d)
        if self.qk_norm:
            q = self._add_norm(fast, q.reshape(n * nh, d), None, a.q_norm)[1].view(n, nh, d)
            k = self._add_norm(fast, k.reshape(n * nkv, d), None, a.k_norm)[1].view(n, nkv, d)
        if fast:
            return h, rowops.rope_(q, cos, sin), rowops.rope_(k, cos, sin), v
        cs, sn = cos[:, None], sin[:, None]  # [N, 1, D]: one row's angles for all its heads
        return h, q * cs + _rotate_half(q) * sn, k * cs + _rotate_half(k) * sn, v

    def _mlp(self, li: int, h, attn, fast: bool, whole: bool):
        """The rest of layer li: (h + o_proj(attn), the MLP's output on its norm)."""
        layer, mlp = self.layers[li], self.layers[li].mlp
        plan = self.fused_layers[li] if whole else None
        if plan is not None:
            return rowops.layer_mlp(h, attn, plan[1], layer.post_attention_layernorm, plan[2], plan[3], plan[4])
        h, x = self._add_norm(fast, h, layer.self_attn.o_proj(attn), layer.post_attention_layernorm)
        if not fast:
            return h, mlp(x)
        if self.gate_up[li] is not None:
            g, u = self.gate_up[li](x).chunk(2, 1)
        else:
            g, u = mlp.gate_proj(x), mlp.up_proj(x)
        return h, mlp.down_proj(rowops.silu_mul(g, u))

    @torch.inference_mode()
    def __call__(self, passes: list[Pass], stop=None) -> list[ForwardOut]:
        """Run every pass in one forward, append their rows' K/V to their sessions (a session's
        length moves only once the whole forward succeeded) and return each pass's output.
        stop: a callable asked before each layer; when it answers True the forward raises
        `Preempted` (a more urgent request should not wait for the rest of it)."""
        dev = self.embed.weight.device
        plans, positions, offset = [], [], 0
        for p in passes:
            t, start = p.ids.shape[0], p.session.length
            if p.parents is None:
                positions.append(torch.arange(start, start + t, device=dev))
            else:
                positions.append(start + tree_mask(p.parents).sum(1).to(dev) - 1)  # depth = ancestors
            p.session.reserve(start + t)
            blocks = prefill_blocks(start, t) if p.prefill and p.parents is None else []
            plans.append((offset, t, start, visible_rows(p.parents, t), blocks))
            offset += t
        n, nh, nkv, d = offset, self.heads, self.kv_heads, self.head_dim
        h = self.embed(torch.cat([p.ids for p in passes]).to(dev))
        cos, sin = self.rotary(h[None], torch.cat(positions)[None])
        cos, sin = cos[0], sin[0]  # [N, D]
        wanted = {i for p in passes for i in (p.layer_ids or [])}
        last = len(self.layers) - 1
        captured: dict[int, torch.Tensor] = {}
        fast = rowops.supports(h)
        whole = fast and getattr(int8.kernel(), "isa", None) == "avx512"  # layer.c runs the AVX512 library's GEMM
        delta = None  # the previous layer's MLP output, added to h by the next norm
        masks: dict = {}  # prefill blocks' attention masks, the same in every layer
        for li, layer in enumerate(self.layers):
            if stop is not None and stop():
                raise Preempted(f"stopped before layer {li}")
            h, q, k, v = self._qkv(li, h, delta, cos, sin, fast, whole)
            if li - 1 in wanted:
                captured[li - 1] = h
            out = q.new_empty(n, nh, d)
            attend_all([(q[o:o + t], p.session.keys[li][:, :start + t], p.session.values[li][:, :start + t], start,
                         rows, blocks, (k[o:o + t], v[o:o + t]), p.session.pack(li), out[o:o + t])
                        for p, (o, t, start, rows, blocks) in zip(passes, plans)], self.scale, masks)
            h, delta = self._mlp(li, h, out.view(n, nh * d), fast, whole)
        _, h = self._add_norm(fast, h, delta, self.norm)
        captured[last] = h  # Hugging Face's last hidden state is the normed one; drafters use that convention
        keep = []
        for p, (o, t, *_) in zip(passes, plans):
            if p.keep_last is not None:
                keep.append(torch.arange(o + t - (p.keep_last or t), o + t, device=dev))
        logits = self.lm_head(h[torch.cat(keep)]).float() if keep else None
        outs, row = [], 0
        for p, (o, t, *_) in zip(passes, plans):
            kept = 0 if p.keep_last is None else p.keep_last or t
            feats = None if p.layer_ids is None else torch.cat([captured[i][o:o + t] for i in p.layer_ids], -1)
            outs.append(ForwardOut(logits[row:row + kept] if kept else h.new_empty(0, 0).float(), feats))
            row += kept
        for p, (_, t, start, *_) in zip(passes, plans):
            p.session.length = start + t
        return outs
