"""Token selection and chain verification shared by every decoding method.

Verification rule (one function for `ar`, `ngram`, `dflash`, `domino`):
- greedy: accept the longest prefix where draft == target argmax, then emit the target argmax at
  the first mismatch (or after the last draft) as the bonus token;
- sampling: standard speculative rejection sampling. Draft d_j drawn from q_j is accepted with
  probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the bonus is drawn from
  norm(max(p_j - q_j, 0)); if all drafts pass, the bonus is drawn from p_{K+1}. Every emitted
  token is then distributed exactly as the target's p given the emitted prefix. A deterministic
  drafter (n-gram) is the point mass q = one_hot(d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> the sampling distribution [..., V] (fp32) after temperature, top-k, top-p."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the token crossing the line stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [..., V] -> token ids [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def select(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """Pick tokens from logits [..., V]. Returns (tokens [...], probs [..., V] or None when greedy)."""
    if params.greedy:
        return logits.argmax(-1), None
    probs = probs_from_logits(logits, params)
    return sample(probs, generator), probs


def verify_chain(
    draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Chain verification for one sequence.

    draft [K] proposed ids; draft_probs [K, V] the distributions they were drawn from, or None for a
    deterministic proposal; target_logits [K+1, V] the target's logits at [anchor, d_1..d_K].
    Returns (accepted a in 0..K, bonus token id).
    """
    k = draft.shape[0]
    if params.greedy:
        best = target_logits.argmax(-1)
        a = int((draft.to(best.device) == best[:k]).int().cumprod(0).sum()) if k else 0
        return a, int(best[a])
    p = probs_from_logits(target_logits, params)  # [K+1, V]
    if k:
        draft = draft.to(p.device)
        idx = torch.arange(k, device=p.device)
        p_d = p[idx, draft]
        q_d = draft_probs[idx, draft].to(p_d) if draft_probs is not None else torch.ones_like(p_d)
        u = torch.rand(k, generator=generator).to(p.device)  # the generator lives on the CPU
        ok = u * q_d < p_d  # u < p/q without dividing by a possibly tiny q
        a = int(ok.int().cumprod(0).sum())
    else:
        a = 0
    if a == k:
        return a, int(sample(p[k], generator))
    if draft_probs is not None:
        residual = (p[a] - draft_probs[a].to(p)).clamp_min(0)
    else:
        residual = p[a].clone()
        residual[draft[a]] = 0
    total = residual.sum()
    # A rejection implies p(d) < q(d), hence positive residual mass; guard against fp round-off.
    residual = residual / total if total > 0 else p[a]
    return a, int(sample(residual, generator))
