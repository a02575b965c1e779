"""The Domino head rollout built from the fused kernels (greedy, or sampling with given uniforms).

Same contract as `domino_backend.head.rollout` restricted to what a fused loop supports (temperature
only; no top-k/top-p), and capture-safe: static shapes, preallocated outputs, no host syncs, a
Python loop of fixed length K. Per step j >= P it runs

    pre   = [z_j ; h] · W1^T                      (cat form, default; or z_j·W_z^T + h·W_s^T, split form)
    d_j   = argmax / inverse-CDF sample of base_j + SiLU(pre) · W2^T     (one tiled kernel + reduction)
    h     = GRU(h, table[d_j])                     (table = E_target · W_ih^T, gathered in the kernel)

The cat form matches the concatenate-then-Linear reference bit for bit in the bottleneck input,
which keeps draft tokens identical to SGLang's `domino_greedy_rollout` and the HF reference; the
split form merges `h·W_s^T` and `h·W_hh^T` into one GEMM (one launch fewer per step) at the cost of
a different rounding of the bottleneck input in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dispatch


@dataclass
class HeadWeights:
    """Head tensors laid out for the fused loop (prepare once per model, outside graph capture)."""

    table: torch.Tensor  # [V, 3G] target embedding · W_ih^T
    w_hh: torch.Tensor  # [3G, G]
    w1: torch.Tensor  # [E, H + G] (cat form)
    w_sh: torch.Tensor  # [E + 3G, G] = [W_s ; W_hh] (split form)
    w2: torch.Tensor  # [V, E]
    prefix_len: int = 1

    @property
    def hidden(self) -> int:
        return self.w1.shape[1] - self.w_hh.shape[1]

    @property
    def gru_hidden(self) -> int:
        return self.w_hh.shape[1]

    @property
    def emb_dim(self) -> int:
        return self.w1.shape[0]

    @property
    def vocab(self) -> int:
        return self.w2.shape[0]


@torch.no_grad()
def prepare_head(
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    embed_weight: torch.Tensor,
    prefix_len: int = 1,
    chunk: int = 16384,
) -> HeadWeights:
    """Build the [V, 3G] GRU input table in vocabulary chunks (bounded peak memory)."""
    v = embed_weight.shape[0]
    table = torch.empty(v, w_ih.shape[0], dtype=w_ih.dtype, device=w_ih.device)
    for i in range(0, v, chunk):
        table[i:i + chunk] = embed_weight[i:i + chunk].to(w_ih.dtype) @ w_ih.T
    h = w1.shape[1] - w_hh.shape[1]
    w_sh = torch.cat([w1[:, h:], w_hh], dim=0).contiguous()
    return HeadWeights(table=table, w_hh=w_hh, w1=w1.contiguous(), w_sh=w_sh, w2=w2.contiguous(), prefix_len=prefix_len)


def prepare_from_modules(prefix_gru, embed_proj, embed_weight: torch.Tensor, prefix_len: int = 1) -> HeadWeights:
    """From `nn.GRU` (bias-free) + `Sequential(Linear, SiLU, Linear)`, the checkpoint's modules."""
    return prepare_head(prefix_gru.weight_ih_l0, prefix_gru.weight_hh_l0, embed_proj[0].weight,
                        embed_proj[2].weight, embed_weight, prefix_len)


@dataclass
class RolloutResult:
    tokens: torch.Tensor  # [B, K] int64
    logz: torch.Tensor | None  # [B, K] log-normaliser of softmax(logits/T) per draft (sampling only)
    logits: torch.Tensor | None  # [B, K, V] fp32 logits each draft was picked from (if requested)

    def draft_probs(self, temperature: torch.Tensor) -> torch.Tensor:
        """q [B, K, V]: the exact distributions the drafts were sampled from (needs return_logits)."""
        t = temperature.float()[:, None, None]
        q = torch.exp(self.logits / t.clamp_min(1e-20) - self.logz[:, :, None])
        point = torch.nn.functional.one_hot(self.tokens, self.logits.shape[-1]).float()
        return torch.where(t > 0, q, point)  # greedy rows are point masses


@torch.no_grad()
def fused_rollout(
    hw: HeadWeights,
    z: torch.Tensor,
    base: torch.Tensor,
    anchor: torch.Tensor,
    *,
    temperature: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    split_w1: bool = False,
    return_logits: bool = False,
    backend: str | None = None,
) -> RolloutResult:
    """Draft K tokens per row.

    z [B, K, H] draft-slot hiddens; base [B, K, V] their base logits (target LM head); anchor [B].
    Greedy when `temperature` is None; otherwise temperature [B] (rows <= 0 stay greedy) and
    uniforms [B, K] in [0, 1) drive an inverse-CDF sample per draft.
    """
    b, k, _ = z.shape
    p = hw.prefix_len
    sample = temperature is not None
    if sample and uniforms is None:
        raise ValueError("sampling needs uniforms [B, K]")
    if base.stride(-1) != 1:
        base = base.contiguous()
    dev = z.device
    tokens = torch.empty(b, k, dtype=torch.long, device=dev)
    logz = torch.zeros(b, k, dtype=torch.float32, device=dev) if sample else None
    logits = torch.empty(b, k, base.shape[-1], dtype=torch.float32, device=dev) if return_logits else None

    def pick(j, pre, w2, pre2):
        out = logits[:, j] if logits is not None else None
        if sample:
            tok, lz, _ = dispatch.head_sample(pre, w2, base[:, j], uniforms[:, j].contiguous(), temperature,
                                              pre2, backend=backend, logits_out=out)
            logz[:, j] = lz
        else:
            tok = dispatch.head_argmax(pre, w2, base[:, j], pre2, backend=backend, logits_out=out)
        tokens[:, j] = tok
        return tok

    picked = [pick(j, None, None, None) for j in range(min(p, k))]
    if k <= p:
        return RolloutResult(tokens, logz, logits)
    # Prime the GRU from zero on [anchor, d_0 .. d_{P-1}].
    h = torch.zeros(b, hw.gru_hidden, dtype=hw.w_hh.dtype, device=dev)
    h = dispatch.gru_step_from_table(hw.table, anchor, None, h, backend=backend)
    for tok in picked:
        h = dispatch.gru_step_from_table(hw.table, tok, h @ hw.w_hh.T, h, backend=backend)
    e = hw.emb_dim
    pre_z = z.to(hw.w1.dtype) @ hw.w1[:, :hw.hidden].T if split_w1 else None  # [B, K, E]
    for j in range(p, k):
        if split_w1:
            sh = h @ hw.w_sh.T  # [B, E + 3G]: s·W_s^T and s·W_hh^T in one GEMM
            tok = pick(j, pre_z[:, j], hw.w2, sh[:, :e])
            gh = sh[:, e:]
        else:
            pre = torch.cat([z[:, j].to(hw.w1.dtype), h.to(hw.w1.dtype)], dim=-1) @ hw.w1.T
            tok = pick(j, pre, hw.w2, None)
            gh = None
        if j < k - 1:  # no GRU step after the last draft
            if gh is None:
                gh = h @ hw.w_hh.T
            h = dispatch.gru_step_from_table(hw.table, tok, gh, h, backend=backend)
    return RolloutResult(tokens, logz, logits)
