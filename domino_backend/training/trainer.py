"""Drafter training loop: AdamW + cosine schedule with warmup, grad clipping, optional bf16
autocast, the base-anchored curriculum, periodic checkpoints with exact resume, a JSONL log and a
PNG of the curves. The target's embedding and LM head are frozen inputs, never trained."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import load_draft, save_draft
from ..config import DraftConfig
from ..draft_model import DraftModel
from .capture import CapturedData, CaptureSet
from .objective import lambda_base, sample_anchors, sequence_loss


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    num_anchors: int = 32  # blocks per sequence and step
    gamma: float = 7.0  # position-decay of the loss weights (7 for block 16)
    lambda_start: float = 1.0
    lambda_decay_ratio: float = 1.0  # the public recipe: decay over the whole run
    use_head: bool = True  # False: DFlash ablation (head absent from the loss)
    curriculum: bool = True  # False: no-curriculum ablation (lambda = 0 throughout)
    bf16: bool = False  # bf16 autocast (only worth it on CPUs with native bf16)
    seed: int = 0
    init: str | None = None  # warm start: an exported drafter folder (same shape); optimizer starts fresh
    target_labels: bool = False  # supervise with the target's greedy tokens (capture's labels.i32), not the data's
    save_every: int = 200
    log_every: int = 1


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.steps * cfg.warmup_ratio))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(draft_cfg: DraftConfig, target_model, data: CapturedData | CaptureSet, out: Path, cfg: TrainConfig,
          progress: bool = True) -> DraftModel:
    """Train (or resume) into `out`: ckpt.pt (full state), log.jsonl, curves.png, final/ (export)."""
    try:  # fail now, not at the first checkpoint an hour in
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("training draws curves.png with matplotlib: pip install -e '.[train]'") from e
    out.mkdir(parents=True, exist_ok=True)
    if list(draft_cfg.target_layer_ids) != list(data.layer_ids):
        raise ValueError(f"drafter layer ids {draft_cfg.target_layer_ids} != captured {data.layer_ids}")
    if cfg.target_labels and not data.has_labels:
        raise ValueError("target labels asked for, but the capture has none for every row: run the `label` step")
    embed, lm_head = target_model.get_input_embeddings(), target_model.get_output_embeddings()
    for p in list(embed.parameters()) + list(lm_head.parameters()):
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    model = DraftModel(draft_cfg).float()  # fp32 master weights; autocast handles bf16 compute
    if cfg.init:  # its d2t comes along: no second scan of the data for the draft vocabulary
        init = load_draft(cfg.init, dtype=torch.float32)
        if init.cfg.to_hf_dict() != draft_cfg.to_hf_dict():
            raise ValueError(f"--init {cfg.init} has another drafter configuration than this run")
        model.load_state_dict(init.state_dict())
    elif draft_cfg.draft_vocab_size is not None:  # score only the tokens the data actually uses
        model.set_draft_vocab(data.top_tokens(draft_cfg.draft_vocab_size, draft_cfg.vocab_size))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    ckpt, log_file = out / "ckpt.pt", out / "log.jsonl"
    start = 0
    # Steps draw sequences by index, so exact resume needs the very same data, not only the config.
    data_id = {"sequences": len(data), "tokens": data.num_tokens}
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["train_cfg"] != asdict(cfg) or state["draft_cfg"] != draft_cfg.to_hf_dict():
            raise ValueError(f"{ckpt} was written with another configuration; use a new --out folder")
        if state.get("data") != data_id:
            raise ValueError(f"{ckpt} was trained on other data ({state.get('data')}, now {data_id}): the capture "
                             "changed since; use a new --out folder (with --init to warm-start from an export)")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        _truncate_log(log_file, start)
    (out / "train_config.json").write_text(json.dumps({"train": asdict(cfg), "draft": draft_cfg.to_hf_dict()}, indent=1))
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress)
    with log_file.open("a") as log:
        for step in bar:
            # Per-step generator: the data order and anchors depend only on (seed, step) -> exact resume.
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            seq = data[int(torch.randint(len(data), (1,), generator=g))]
            anchors = sample_anchors(seq.loss_mask, cfg.num_anchors, g)
            if anchors.numel() == 0:
                continue
            lam = lambda_base(step, cfg.steps, cfg.lambda_start, cfg.lambda_decay_ratio) if cfg.curriculum else 0.0
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, m = sequence_loss(model, embed, lm_head, seq.feats, seq.ids, seq.loss_mask, anchors,
                                        lam, cfg.gamma, cfg.use_head, seq.target_next if cfg.target_labels else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            m.update(step=step + 1, lr=lr, s_per_step=time.perf_counter() - t0)
            if (step + 1) % cfg.log_every == 0:
                log.write(json.dumps(m) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{m['loss']:.3f}", lam=f"{lam:.2f}", acc=f"{m['acc_final']:.2f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                _save(ckpt, model, opt, step + 1, cfg, draft_cfg, data_id)
                plot_curves(log_file, out / "curves.png")
    model.eval()
    save_draft(model, out / "final")
    return model


def _save(path: Path, model, opt, step: int, cfg: TrainConfig, draft_cfg: DraftConfig, data_id: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "train_cfg": asdict(cfg),
                "draft_cfg": draft_cfg.to_hf_dict(), "data": data_id}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from."""
    if log_file.exists():
        keep = [line for line in log_file.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        log_file.write_text("".join(line + "\n" for line in keep))


def plot_curves(log_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    if not rows:
        return
    step = [r["step"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        ("loss", ["loss_base", "loss_final"]), ("accuracy", ["acc_base", "acc_final"]),
        ("train-time accept length", ["accept_len_base", "accept_len_final"]), ("lambda (base weight)", ["lambda"]),
    ]
    # Each step sees one sequence, so raw values are noisy: draw them faint, a moving average bold.
    win = max(1, len(rows) // 50)
    for a, (title, keys) in zip(ax.flat, panels):
        for k in keys:
            y = [r[k] for r in rows]
            line, = a.plot(step, y, linewidth=0.5, alpha=0.25)
            smooth = [sum(y[max(0, i - win + 1):i + 1]) / (i + 1 - max(0, i - win + 1)) for i in range(len(y))]
            a.plot(step, smooth, color=line.get_color(), linewidth=1.8, label=f"{k} (mean of {win})")
        a.set_title(title)
        a.set_xlabel("step")
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
