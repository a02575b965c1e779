"""Teacher-forced target pass: cache the hidden states a drafter is conditioned on.

Layout of a capture folder (append-only, resumable):
- `feats.f16`: every captured token's concatenated layer outputs, float16, row-major [T_total, L*H];
- `index.jsonl`: one line per sequence {id, split, offset (row in feats), length, prompt_len, ids};
- `meta.json`: target layer ids, feature width, dtype.
A crash leaves at most a partial tail in feats.f16; resume truncates it to the last indexed row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import read_complete_lines


def capture(model, records_file: Path, out: Path, layer_ids: list[int], split: str = "train",
            max_len: int = 1024) -> int:
    out.mkdir(parents=True, exist_ok=True)
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else model.config.hidden_size
    width = len(layer_ids) * hidden
    meta = {"layer_ids": layer_ids, "width": width, "dtype": "float16", "max_len": max_len}
    meta_file = out / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text())["layer_ids"] != layer_ids:
        raise ValueError(f"{out} was captured with other layer ids; use a new folder")
    meta_file.write_text(json.dumps(meta))
    index_file, feats_file = out / "index.jsonl", out / "feats.f16"
    done, rows = set(), 0
    for line in read_complete_lines(index_file):
        e = json.loads(line)
        done.add(e["id"])
        rows = max(rows, e["offset"] + e["length"])
    with feats_file.open("ab") as f:
        f.truncate(rows * width * 2)  # drop a partial tail from an interrupted run
    recs = [json.loads(line) for line in records_file.read_text().splitlines() if line.strip()]
    todo = [r for r in recs if r["split"] == split and r["id"] not in done and r["response_ids"]]
    written = 0
    with feats_file.open("ab") as f, index_file.open("a") as idx:
        for r in tqdm(todo, desc=f"capture {split}", unit="seq"):
            ids = (r["prompt_ids"] + r["response_ids"])[-max_len:]
            prompt_len = max(0, len(ids) - len(r["response_ids"]))
            with torch.inference_mode():
                o = model(input_ids=torch.tensor([ids]), output_hidden_states=True, logits_to_keep=1)
            feats = torch.cat([o.hidden_states[i + 1][0] for i in layer_ids], dim=-1)
            f.write(feats.to(torch.float16).numpy().tobytes())
            f.flush()
            idx.write(json.dumps({"id": r["id"], "split": split, "offset": rows, "length": len(ids),
                                  "prompt_len": prompt_len, "ids": ids}) + "\n")
            idx.flush()
            rows += len(ids)
            written += 1
    return written


@dataclass
class Sequence:
    ids: torch.Tensor  # [S]
    loss_mask: torch.Tensor  # [S] bool, True on response tokens
    feats: torch.Tensor  # [S, L*H] float32


class CapturedData:
    """Memory-mapped view of a capture folder."""

    def __init__(self, path: Path):
        meta = json.loads((path / "meta.json").read_text())
        self.layer_ids, self.width = meta["layer_ids"], meta["width"]
        self.index = [json.loads(line) for line in (path / "index.jsonl").read_text().splitlines() if line.strip()]
        if not self.index:
            raise ValueError(f"{path} holds no captured sequences")
        rows = max(e["offset"] + e["length"] for e in self.index)
        self.feats = np.memmap(path / "feats.f16", dtype=np.float16, mode="r", shape=(rows, self.width))
        self.num_tokens = sum(e["length"] - e["prompt_len"] for e in self.index)

    def top_tokens(self, n: int, vocab_size: int) -> torch.Tensor:
        """The n most frequent token ids across all captured sequences (ties: lower id first)."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for e in self.index:
            counts += torch.bincount(torch.tensor(e["ids"]), minlength=vocab_size)[:vocab_size]
        order = sorted(range(vocab_size), key=lambda t: (-int(counts[t]), t))
        return torch.tensor(order[:n])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sequence:
        e = self.index[i]
        ids = torch.tensor(e["ids"], dtype=torch.long)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[e["prompt_len"]:] = True
        feats = torch.from_numpy(np.asarray(self.feats[e["offset"]:e["offset"] + e["length"]], dtype=np.float32))
        return Sequence(ids, mask, feats)
