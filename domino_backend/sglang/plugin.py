"""SGLang plugin (entry point group `sglang.srt.plugins`, name `domino`).

SGLang 0.5.23 already serves Domino drafters as DFLASH with `projector_type: "domino"`: greedy
drafts, an approximate 2048-token candidate pool by default, PyTorch ops per step. This plugin
keeps all of DFlash's capture, draft-KV, CUDA-graph and verify plumbing and only wraps three
private seams with `HookRegistry` AROUND hooks (no forked worker):

- `domino_utils.domino_greedy_rollout` (the eager path and `_DominoDraftSampler`, which runs
  inside the draft CUDA graph): replaced, at TP=1, by `domino_backend.sglang.rollout.domino_rollout`
  — exact full-vocabulary scoring and our fused Triton kernels; and, when sampling is on, a
  temperature-T draft sampled by inverse CDF from uniforms held in static buffers (capture-safe;
  rows with T = 0 stay greedy). TP > 1 falls through to upstream (its cross-rank candidate pool).
- `DFlashWorkerV2._maybe_build_draft_sampler`: after upstream builds the sampler (before graph
  capture) the head tables are prepared and, with sampling on, the static buffers allocated.
- `DFlashWorkerV2.forward_batch_generation` / `._accept_block`: stage each batch's temperatures and
  fresh uniforms before the draft runs; hand the exact draft distributions q to upstream's
  rejection-sampling verifier (the DFlash2-selector path, `_selector_sample`), which accepts d with
  min(1, p/q) and resamples from max(p − q, 0): lossless for any q the drafts were really drawn from.

Settings (environment, read in every SGLang process when the plugin loads):
  DOMINO_SGLANG_KERNELS=1   fused rollout (0: keep upstream's rollout; 1 is the default)
  DOMINO_SGLANG_EXACT=1     full-vocabulary scoring even where upstream would use its pool (default 1)
  DOMINO_SGLANG_SAMPLING=0  temperature > 0 drafting (default 0: verified on CPU only, see docs)
  DOMINO_KERNELS=torch      use the PyTorch references instead of Triton (debugging)
  SGLANG_PLUGINS=domino     SGLang's own allow-list, if several plugins are installed

Only the pinned SGLang release is hooked; any other version logs a warning and leaves SGLang as is
(set DOMINO_SGLANG_FORCE=1 to hook anyway).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from kernels import HeadWeights, prepare_from_modules

from .rollout import domino_rollout
from .upstream import SGLANG_VERSION

logger = logging.getLogger("domino.sglang")

ENTRY_POINT_GROUP = "sglang.srt.plugins"
ENTRY_POINT_NAME = "domino"
ROLLOUT_TARGET = "sglang.srt.speculative.domino_utils.domino_greedy_rollout"
WORKER = "sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2"
SAMPLER_TARGET = WORKER + "._maybe_build_draft_sampler"
FORWARD_TARGET = WORKER + ".forward_batch_generation"
ACCEPT_TARGET = WORKER + "._accept_block"


def _flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None or v == "" else v.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    kernels: bool = True
    exact: bool = True
    sampling: bool = False

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(kernels=_flag("DOMINO_SGLANG_KERNELS", True), exact=_flag("DOMINO_SGLANG_EXACT", True),
                   sampling=_flag("DOMINO_SGLANG_SAMPLING", False))

    @property
    def replaces_rollout(self) -> bool:
        return self.kernels or self.sampling


@dataclass
class SamplingBuffers:
    """Static per-worker inputs of the sampled rollout (filled before each draft, read in-graph)."""

    temperature: torch.Tensor  # [max_bs] fp32, 0 = greedy row
    uniforms: torch.Tensor  # [max_bs, K] fp32
    active: bool = False  # this batch has a row with T > 0
    result: object | None = None  # the last RolloutResult (its tensors are graph outputs when captured)
    bs: int = 0

    @classmethod
    def allocate(cls, max_bs: int, num_drafts: int, device) -> "SamplingBuffers":
        return cls(torch.zeros(max_bs, dtype=torch.float32, device=device),
                   torch.zeros(max_bs, num_drafts, dtype=torch.float32, device=device))


@dataclass
class PluginState:
    settings: Settings = field(default_factory=Settings)
    heads: dict = field(default_factory=dict)
    buffers: SamplingBuffers | None = None
    calls: int = 0  # rollouts served by our path (a test/diagnostic counter)
    fallbacks: int = 0  # rollouts left to upstream
    local: threading.local = field(default_factory=threading.local)

    def head_for(self, prefix_gru, embed_proj, target_embedding, allow_build: bool) -> HeadWeights | None:
        key = (id(prefix_gru), id(embed_proj), id(target_embedding))
        entry = self.heads.get(key)
        if entry is not None and entry[0] is prefix_gru and entry[1] is embed_proj and entry[2] is target_embedding:
            return entry[3]
        if not allow_build:
            return None
        hw = prepare_from_modules(prefix_gru, embed_proj, target_embedding.weight)
        self.heads[key] = (prefix_gru, embed_proj, target_embedding, hw)  # refs keep the ids unique
        return hw


STATE = PluginState()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def rollout_hook(original_fn, *args, **kw):
    """AROUND `domino_greedy_rollout`: our exact (and optionally sampled) rollout at TP=1."""
    s = STATE.settings
    if args or not s.replaces_rollout:
        return original_fn(*args, **kw)
    if s.exact:
        kw["candidate_pool_size"] = 0
    tp = kw.get("tp_group")
    pool = int(kw.get("candidate_pool_size", 0))
    if (tp is not None and int(getattr(tp, "world_size", 1)) > 1) or 0 < pool < int(kw["vocab_size"]):
        STATE.fallbacks += 1
        return original_fn(**kw)
    hw = STATE.head_for(kw["prefix_gru"], kw["embed_proj"], kw["target_embedding"], allow_build=not _capturing())
    if hw is None:  # first call inside a graph capture: never build a 1 GB table in a graph pool
        STATE.fallbacks += 1
        return original_fn(**kw)
    buf = STATE.buffers if s.sampling else None
    extra = {}
    if buf is not None:
        bs = kw["draft_hidden"].shape[0]
        extra = dict(temperature=buf.temperature[:bs], uniforms=buf.uniforms[:bs], return_logits=True)
    res = domino_rollout(**kw, head=hw, **extra)
    if buf is not None:
        buf.result = res
    STATE.calls += 1
    return res.tokens


def sampler_build_hook(original_fn, self, *args, **kw):
    """AROUND `_maybe_build_draft_sampler`: prepare head tables (and sampling buffers) pre-capture."""
    sampler = original_fn(self, *args, **kw)
    if not getattr(self, "_is_domino", False):
        return sampler
    try:
        model = self.target_worker.model_runner.model
        emb = model.get_input_embeddings()
        STATE.head_for(self.draft_model.prefix_gru, self.draft_model.embed_proj, emb, allow_build=True)
        if STATE.settings.sampling and STATE.buffers is None:
            max_bs = int(getattr(sampler, "out", torch.empty(0)).numel() // max(1, self.block_size - 1)) or 256
            STATE.buffers = SamplingBuffers.allocate(max_bs, int(self.block_size) - 1, emb.weight.device)
    except Exception:  # never break serving: the rollout hook prepares lazily or falls back
        logger.exception("domino plugin: could not prepare the head before graph capture")
    return sampler


def _row_temperatures(sampling_info, bs: int, device) -> torch.Tensor:
    """Per-row temperature with 0 for greedy rows (SGLang marks greedy as top_k == 1)."""
    if sampling_info is None or getattr(sampling_info, "is_all_greedy", True):
        return torch.zeros(bs, device=device)
    t = sampling_info.temperatures.reshape(-1)[:bs].float()
    top_k = getattr(sampling_info, "top_ks", None)
    if top_k is not None:
        t = torch.where(top_k.reshape(-1)[:bs] <= 1, torch.zeros_like(t), t)
    return t


def forward_hook(original_fn, self, batch, *args, **kw):
    """AROUND `forward_batch_generation`: stage temperatures and fresh uniforms for this batch."""
    buf = STATE.buffers
    if buf is None or not getattr(self, "_is_domino", False):
        return original_fn(self, batch, *args, **kw)
    bs = len(batch.reqs)
    t = _row_temperatures(getattr(batch, "sampling_info", None), bs, buf.temperature.device)
    buf.temperature[:bs].copy_(t)
    buf.temperature[bs:].zero_()
    buf.uniforms[:bs].uniform_()
    buf.active, buf.bs = bool((t > 0).any()), bs  # one host sync per step, outside any graph
    try:
        return original_fn(self, batch, *args, **kw)
    finally:
        buf.active, buf.result = False, None


def accept_hook(original_fn, self, *args, **kw):
    """AROUND `_accept_block`: give upstream's sampling verifier our exact draft distributions."""
    buf = STATE.buffers
    if (buf is None or not buf.active or buf.result is None or buf.result.logits is None
            or getattr(self, "_selector_sample", None) is not None):
        return original_fn(self, *args, **kw)
    res = buf.result
    rows, k, v = res.logits.shape  # rows >= bs when a padded graph batch ran the rollout
    cand = kw.get("candidates")
    bs = int(cand.shape[0]) if cand is not None else buf.bs
    q = res.draft_probs(buf.temperature[:rows])[:bs]
    ids = torch.arange(v, device=q.device).expand(bs, k, v)
    self._selector_sample = (ids, q)
    try:
        return original_fn(self, *args, **kw)
    finally:
        self._selector_sample = None


def _sglang_version() -> str | None:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def register() -> None:
    """The entry point SGLang calls in every process (`load_plugins()`); registers the hooks."""
    version = _sglang_version()
    if version is not None and version != SGLANG_VERSION and not _flag("DOMINO_SGLANG_FORCE", False):
        logger.warning("domino plugin: SGLang %s is not the pinned %s; leaving SGLang unchanged "
                       "(DOMINO_SGLANG_FORCE=1 hooks anyway)", version, SGLANG_VERSION)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    STATE.settings = Settings.from_env()
    s = STATE.settings
    if s.replaces_rollout:
        HookRegistry.register(ROLLOUT_TARGET, rollout_hook, HookType.AROUND)
        HookRegistry.register(SAMPLER_TARGET, sampler_build_hook, HookType.AROUND)
    if s.sampling:
        HookRegistry.register(FORWARD_TARGET, forward_hook, HookType.AROUND)
        HookRegistry.register(ACCEPT_TARGET, accept_hook, HookType.AROUND)
    logger.info("domino plugin: %s", s)
