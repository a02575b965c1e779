"""PyTorch references for the Domino head kernels (the semantics the Triton kernels must match).

Every function here is capture-safe (no `.item()`, no data-dependent Python branches, static output
shapes) so the same code runs eagerly on CPU and inside a CUDA graph. Arithmetic is fp32 whatever
the storage dtype; where a kernel feeds a matrix unit (the vocabulary projection) the activation is
first rounded to the weight dtype, exactly as the kernel does before `tl.dot`.

Shapes: B rows (requests), V vocabulary, E bottleneck (`emb_dim`), G GRU width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gru_update(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The bias-free GRU update from the two projections, in PyTorch's gate order (r, z, n):
    r = σ(gi_r + gh_r), z = σ(gi_z + gh_z), n = tanh(gi_n + r·gh_n), h' = (1 − z)·n + z·h.

    gi = x·W_ih^T, gh = h·W_hh^T [B, 3G]; h [B, G]. Computes in the dtype of its inputs: the one
    op sequence shared by the engine's cell (`gru_cell`, model dtype) and the kernel reference
    (`gru_step_from_table`, fp32), so the two agree bit for bit whenever their inputs do.
    """
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h.to(n.dtype)


def gru_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:
    """One bias-free GRU step on an input vector, in the weights' dtype (the engine's head step).

    x [B, H], h [B, G], w_ih [3G, H], w_hh [3G, G] -> h' [B, G]. Equals one step of `nn.GRU`; the
    engine keeps the module's dtype (no fp32 upcast, no table) so its drafts do not change when
    the fused path's precision choices do.
    """
    return gru_update(F.linear(x.to(w_ih.dtype), w_ih), F.linear(h.to(w_hh.dtype), w_hh), h)


def gru_step_from_table(
    table: torch.Tensor,
    tokens: torch.Tensor,
    gh: torch.Tensor | None,
    h: torch.Tensor,
) -> torch.Tensor:
    """`gru_cell` with the input projection read from a precomputed table, gates in fp32.

    table [V, 3G] = E_target · W_ih^T (gate order r, z, n); tokens [B] ids; gh [B, 3G] = h · W_hh^T
    (None means h == 0, the first priming step); h [B, G]. Returns h' [B, G] in h's dtype.
    """
    gi = table.index_select(0, tokens).float()
    ghf = torch.zeros_like(gi) if gh is None else gh.float()
    return gru_update(gi, ghf, h.float()).to(h.dtype)


def head_logits(
    pre: torch.Tensor | None,
    w2: torch.Tensor | None,
    base: torch.Tensor | None,
    pre2: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 logits [B, V] = base + SiLU(pre [+ pre2]) · W2^T.

    pre/pre2 [B, E] bottleneck pre-activations (pre2 lets the split-W1 form `z·W_z^T + s·W_s^T` be
    added inside the kernel); w2 [V, E]; base [B, V] or None. pre/w2 None: logits = base alone.
    """
    if w2 is None:
        return base.float()
    a = pre.float() if pre2 is None else pre.float() + pre2.float()
    act = F.silu(a).to(w2.dtype).float()
    logits = act @ w2.float().T
    return logits if base is None else logits + base.float()


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """First index of the row maximum (torch.argmax semantics), int64."""
    return logits.float().argmax(-1)


def _inverse_cdf(scaled: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample index = first i with cumsum(exp(s − max))_i > u·Z; returns (ids, logZ) per row."""
    m = scaled.amax(-1, keepdim=True)
    p = torch.exp(scaled - m)
    cdf = p.cumsum(-1)
    z = cdf[:, -1:]
    target = uniform.float()[:, None] * z
    idx = (cdf <= target).sum(-1)
    # Round-off can leave the target at or past the total mass: take the last token with mass.
    v = scaled.shape[-1]
    last = (v - 1) - (p > 0).flip(-1).int().argmax(-1)
    idx = torch.minimum(idx, last)
    return idx, (m + torch.log(z))[:, 0]


def head_sample(
    pre: torch.Tensor | None,
    w2: torch.Tensor | None,
    base: torch.Tensor | None,
    uniform: torch.Tensor,
    temperature: torch.Tensor,
    pre2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row from softmax(logits / T) by inverse CDF with the given uniform.

    uniform [B] in [0, 1); temperature [B] (rows with T <= 0 take the argmax, so one captured graph
    serves mixed greedy/sampling batches). Returns (tokens [B] int64, logZ [B] = logsumexp(logits/T)
    (0 for greedy rows), logits [B, V] fp32): the token's draft probability is exp(l/T − logZ), so
    a verifier can use the exact distribution the token was drawn from (lossless rejection sampling).
    """
    logits = head_logits(pre, w2, base, pre2)
    t = temperature.float()
    greedy = t <= 0
    inv_t = torch.where(greedy, torch.ones_like(t), 1.0 / torch.where(greedy, torch.ones_like(t), t))
    ids, logz = _inverse_cdf(logits * inv_t[:, None], uniform)
    top1 = logits.argmax(-1)
    return torch.where(greedy, top1, ids), torch.where(greedy, torch.zeros_like(logz), logz), logits


def greedy_accept(
    drafts: torch.Tensor,
    target_top1: torch.Tensor,
    num_drafts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain verification, greedy: accept length and bonus token per row.

    drafts [B, K]; target_top1 [B, K+1] the target's argmax at [anchor, d_1..d_K]; num_drafts [B]
    (optional) how many drafts of each row are real (ragged blocks: the rest are padding and can
    never be accepted). accept[b] = number of leading j < num_drafts[b] with drafts == top1;
    bonus[b] = top1[b, accept[b]].
    """
    b, k = drafts.shape
    j = torch.arange(k, device=drafts.device)
    ok = drafts == target_top1[:, :k]
    if num_drafts is not None:
        ok = ok & (j[None, :] < num_drafts[:, None])
    accept = ok.long().cumprod(-1).sum(-1)
    bonus = target_top1.gather(1, accept[:, None])[:, 0]
    return accept, bonus.long()
