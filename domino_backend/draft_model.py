"""DFlash block drafter with the optional Domino head, in the public checkpoint layout.

Parameter names match the published drafters exactly (`layers.{i}.self_attn.q_proj.weight`,
`fc.weight`, `hidden_norm.weight`, `norm.weight`, `prefix_gru.weight_ih_l0`, `embed_proj.0.weight`,
...). The drafter owns no embedding and no LM head: callers pass the target's.

How the context conditions the block (DFlash): the target's hidden states at `target_layer_ids`
are concatenated per token, fused by `fc` + `hidden_norm` into one context feature c_t, and in
*every* draft layer c_t is projected by that layer's own k_proj/v_proj (k_norm + RoPE at the
token's absolute position) and placed in front of the block's own K/V. Queries come only from the
block. Attention inside the block is bidirectional; the block sees context positions < anchor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.reference import gru_cell

from .config import DraftConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Qwen3, then cast back before scaling.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] (half-split layout, as in HF Qwen)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DraftAttention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, H] -> k, v [B, n_kv, T, head_dim]; k gets k_norm + RoPE, v gets neither."""
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, ctx_k, ctx_v, cos, sin, mask=None):
        """x [B, S, H] block states (normed); ctx_k/v [B, n_kv, C, D]; mask bool [B|1, 1, S, C+S] or None."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.n_heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        k = torch.cat([ctx_k, k], dim=2)
        v = torch.cat([ctx_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class DraftMLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg)

    def forward(self, x, ctx_k, ctx_v, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), ctx_k, ctx_v, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DraftCache:
    """Per-layer K/V of the *committed* context only ([B, n_kv, C, D] each).

    Block K/V are never stored: every round recomputes them, so no crop is needed after
    verification (the reference appends then crops; the result is the same).
    """

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0
        self.error: Exception | None = None  # a queued extension that failed (`DraftModel.flush_context`)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]


class DraftModel(nn.Module):
    """DFlash backbone (+ Domino head when `cfg.projector_type` is set)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.fc = nn.Linear(len(cfg.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        # Domino head: GRU over target embeddings of the tokens already fixed in the block, and a
        # low-rank MLP giving a full-vocabulary logit delta. Top-level names, as in the checkpoints.
        if cfg.has_head:
            self.prefix_gru = nn.GRU(h, cfg.gru_hidden_dim, num_layers=1, batch_first=True, bias=False)
            self.embed_proj = nn.Sequential(
                nn.Linear(h + cfg.gru_hidden_dim, cfg.emb_dim, bias=False),
                nn.SiLU(),
                nn.Linear(cfg.emb_dim, cfg.scored_vocab, bias=False),
            )
        if cfg.draft_vocab_size is not None:
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self._head_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (lm_head weight, its draft rows)
        self._queued: list[tuple[torch.Tensor, DraftCache]] = []  # commits not yet projected (`queue_context`)
        self._draft_ids: torch.Tensor | None = None
        self._t2d: torch.Tensor | None = None
        # Both caches derive from d2t / the LM head: drop them whenever weights are (re)loaded.
        self.register_load_state_dict_post_hook(lambda m, _keys: m._drop_vocab_caches())
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.GRU):
            for p in m.parameters():
                nn.init.uniform_(p, -1 / math.sqrt(m.hidden_size), 1 / math.sqrt(m.hidden_size))

    @property
    def has_head(self) -> bool:
        return self.cfg.has_head

    # -- vocabulary: draft index <-> target token id (identity for full-vocabulary drafters) --------

    def draft_token_ids(self) -> torch.Tensor | None:
        """[V_draft] target ids of the scored tokens, or None for a full-vocabulary drafter."""
        if self.cfg.draft_vocab_size is None:
            return None
        if self._draft_ids is None or self._draft_ids.device != self.d2t.device:  # derived from d2t, kept
            self._draft_ids = torch.arange(self.cfg.draft_vocab_size, device=self.d2t.device) + self.d2t
        return self._draft_ids

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Choose the scored target tokens (e.g. the most frequent ones in the training data)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() != self.cfg.draft_vocab_size or ids.unique().numel() != ids.numel():
            raise ValueError(f"need {self.cfg.draft_vocab_size} distinct token ids, got {ids.numel()}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
            raise ValueError("draft vocabulary ids must lie in the target vocabulary")
        ids = ids.sort().values
        self.d2t.copy_(ids - torch.arange(ids.numel()))
        self._drop_vocab_caches()

    def _drop_vocab_caches(self) -> None:
        self._head_rows = self._draft_ids = self._t2d = None

    def target_to_draft(self) -> torch.Tensor:
        """[V_target] draft index of each target token, -1 where the draft vocabulary lacks it."""
        if self._t2d is None:
            ids = self.draft_token_ids()
            self._t2d = torch.full((self.cfg.vocab_size,), -1, dtype=torch.long, device=ids.device)
            self._t2d[ids] = torch.arange(ids.numel(), device=ids.device)
        return self._t2d

    def to_target_ids(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.cfg.draft_vocab_size is None else idx + self.d2t[idx]

    def base_logits(self, z: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """The target's frozen LM head applied to slot hiddens, restricted to the draft vocabulary."""
        # Rows folded to 2-D: the engine passes a strided view of the first K < S slots, on which
        # F.linear takes a batched matmul that copies the whole weight every call (a short draft
        # then costs more than a long one).
        x = z.reshape(-1, z.shape[-1])  # the drafter runs in the target's dtype (Engine moves it)
        ids = self.draft_token_ids()
        if ids is None:
            return lm_head(x).reshape(*z.shape[:-1], -1)
        w = getattr(lm_head, "weight", None)
        if w is None:  # a quantized head (quant.Int8Linear) keeps no float weight to slice
            return lm_head(x)[:, ids].reshape(*z.shape[:-1], -1)
        if self._head_rows is None or self._head_rows[0] is not w:  # slice once, reuse every round
            self._head_rows = (w, w.detach()[ids].contiguous())
        return F.linear(x, self._head_rows[1]).reshape(*z.shape[:-1], -1)

    def head_delta(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """z [..., H] slot hidden, s [..., G] GRU state -> logit delta [..., V] (cat-then-Linear form)."""
        return self.embed_proj(torch.cat([z, s.to(z.dtype)], dim=-1))

    def head_gru_step(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One GRU step, x [B, H] token embedding, h [B, G] -> h' [B, G] (the kernels' reference
        cell, in the module's dtype; training runs the same weights through `nn.GRU`)."""
        return gru_cell(x, h, self.prefix_gru.weight_ih_l0, self.prefix_gru.weight_hh_l0)

    def fuse_context(self, target_feats: torch.Tensor) -> torch.Tensor:
        """[B, T, L*H_target] concatenated target layer outputs -> context features [B, T, H]."""
        return self.hidden_norm(self.fc(target_feats.to(self.fc.weight.dtype)))

    def queue_context(self, feats: torch.Tensor, cache: DraftCache) -> None:
        """`extend_contexts([(feats[None], cache)])` (feats [T, L*H], a B = 1 cache) deferred to
        `flush_context`, which runs every queued commit in one pass: a batched engine step queues
        all of its requests' and reads `fc`'s weight once instead of once per request."""
        self._queued.append((feats[None], cache))

    def flush_context(self) -> None:
        """Project every queued commit into its cache. A commit that fails by itself leaves its
        cache's `error` set (its owner raises it at its next use) and the others go on."""
        items, self._queued = self._queued, []
        try:
            self.extend_contexts(items)
        except Exception:
            for item in items:
                try:
                    self.extend_contexts([item])
                except Exception as e:
                    item[1].error = e

    @torch.inference_mode()
    def extend_contexts(self, items: list[tuple[torch.Tensor, DraftCache]]) -> None:
        """Append to each cache the K/V of its committed tokens' features, feats [B, T_i, L*H]
        (the same B for all), at positions cache.length .. cache.length + T_i - 1. All rows are
        fused and projected together: every op is row-wise and the Linears give a row the same
        bits for any number of rows (cpu.PackedLinear), so each cache gets the bits it would get
        alone. Nothing is appended unless every row computed."""
        items = [(f, c) for f, c in items if f.shape[1]]
        if not items:
            return
        sizes = [f.shape[1] for f, _ in items]
        ctx = self.fuse_context(torch.cat([f for f, _ in items], 1))
        pos = torch.cat([torch.arange(c.length, c.length + t, device=ctx.device) for (_, c), t in zip(items, sizes)])
        cos, sin = rope_cos_sin(pos.expand(ctx.shape[0], -1), self.cfg.head_dim, self.cfg.rope_theta, ctx.dtype)
        kv = [[x.split(sizes, 2) for x in layer.self_attn.project_kv(ctx, cos, sin)] for layer in self.layers]
        for j, ((_, cache), t) in enumerate(zip(items, sizes)):
            for i, (k, v) in enumerate(kv):
                cache.append(i, k[j].contiguous(), v[j].contiguous())
            cache.length += t

    def forward_block(self, block_emb: torch.Tensor, block_pos: torch.Tensor, cache: DraftCache) -> torch.Tensor:
        """Inference forward for one block per sequence, over the context already in `cache`
        (`extend_contexts`; every cached position is < block_pos[:, 0]).

        block_emb [B, S, H]: target embeddings of [anchor, MASK x (S-1)]; block_pos [B, S].
        Returns z [B, S, H] (after the final norm).
        """
        b = block_emb.shape[0]
        cos, sin = rope_cos_sin(block_pos, self.cfg.head_dim, self.cfg.rope_theta, block_emb.dtype)
        x = block_emb
        for i, layer in enumerate(self.layers):
            ck, cv = cache.k[i], cache.v[i]
            if ck is None:  # empty context (cannot happen after a prefill, kept for tiny tests)
                ck = x.new_zeros(b, self.cfg.num_key_value_heads, 0, self.cfg.head_dim)
                cv = ck
            x = layer(x, ck, cv, cos, sin)
        return self.norm(x)

    def forward_train(
        self,
        block_emb: torch.Tensor,
        block_pos: torch.Tensor,
        ctx_feats: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Training forward over many blocks of one or more sequences.

        block_emb [B, N*S, H], block_pos [B, N*S]; ctx_feats [B, C, L*H] at positions 0..C-1;
        mask bool [B, 1, N*S, C+N*S]: True where a block query may attend (context < anchor and
        its own block). Returns z [B, N*S, H].
        """
        b, c = ctx_feats.shape[:2]
        dtype = block_emb.dtype
        ctx = self.fuse_context(ctx_feats).to(dtype)
        cos, sin = rope_cos_sin(block_pos, self.cfg.head_dim, self.cfg.rope_theta, dtype)
        ctx_pos = torch.arange(c, device=ctx.device).expand(b, c)
        ccos, csin = rope_cos_sin(ctx_pos, self.cfg.head_dim, self.cfg.rope_theta, dtype)
        x = block_emb
        for layer in self.layers:
            ck, cv = layer.self_attn.project_kv(ctx, ccos, csin)
            x = layer(x, ck, cv, cos, sin, mask)
        return self.norm(x)
