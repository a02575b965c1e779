"""Teacher-forced target pass: cache the hidden states a drafter is conditioned on.

Layout of a capture folder (append-only, resumable):
- `feats.f16`: every captured token's concatenated layer outputs, float16, row-major [T_total, L*H];
- `index.jsonl`: one line per sequence {id, split, offset (row in feats), length, prompt_len, ids};
- `meta.json`: target layer ids, feature width, dtype;
- `labels.i32` + `labels.json` (optional, `label_targets`): per row, the target's greedy next token
  given the true prefix, so a drafter can be supervised with what verification will compare it to.
A crash leaves at most a partial tail in feats.f16 / labels.i32; resume truncates it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import text_config
from .data import read_complete_lines


def interleave(groups: list[list]) -> list:
    """Merge lists so each is spread evenly over the result (item i of a list of n sits at
    fraction (i+0.5)/n): a capture stopped part-way keeps the mix of its record files."""
    keyed = [((i + 0.5) / len(g), k, x) for k, g in enumerate(groups) for i, x in enumerate(g)]
    return [x for *_, x in sorted(keyed, key=lambda t: t[:2])]


def capture(model, records_files: list[Path], out: Path, layer_ids: list[int], split: str = "train",
            max_len: int = 1024) -> int:
    out.mkdir(parents=True, exist_ok=True)
    hidden = text_config(model.config).hidden_size
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
    recs = interleave([[json.loads(line) for line in read_complete_lines(f)] for f in records_files])
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


def label_targets(model, data_dir: Path, top_tokens: int | None = 16384) -> int:
    """Write `labels.i32`: row p = the target's greedy token after position p (teacher-forced on the
    captured sequence). Computed from the captured features: only the decoder layers after the last
    captured one run again (2 of 24 for the coder profile), then the final norm and the LM head.

    top_tokens: score only the data's N most frequent tokens (the LM head over 151k tokens would
    cost more than the layers). A drafter with that draft vocabulary cannot draft any other token,
    so the in-set argmax is the only label it could use; None scores the full vocabulary (slow, exact).
    Resumes after the last labelled sequence. Returns the number of sequences labelled by this call."""
    data = CapturedData(data_dir)
    decoder = model.get_decoder()
    n_layers = len(decoder.layers)
    last = max(data.layer_ids)
    if last >= n_layers - 1:  # HF's last hidden state is already normed: nothing to re-run from
        raise ValueError(f"labels need a captured layer before the last decoder layer (got {last})")
    types = getattr(text_config(model.config), "layer_types", None)
    rest = decoder.layers[last + 1:]
    if types is not None and list(types[last + 1:]) != list(types[:len(rest)]):
        raise ValueError("labels: the re-run layers must share the attention type of the first ones")
    meta_file, labels_file = data_dir / "labels.json", data_dir / "labels.i32"
    meta = {"top_tokens": top_tokens, "from_layer": last}
    written_with = json.loads(meta_file.read_text()) if meta_file.exists() else None
    if labels_file.exists() and written_with != meta:
        raise ValueError(f"{labels_file} was written with {written_with}; delete it to relabel")
    meta_file.write_text(json.dumps(meta))
    vocab = data.top_tokens(top_tokens, model.config.vocab_size) if top_tokens else None
    weight = model.get_output_embeddings().weight
    weight = weight[vocab] if vocab is not None else weight
    h = data.feats.shape[1] // len(data.layer_ids)
    col = data.layer_ids.index(last) * h
    done = labels_file.stat().st_size // 4 if labels_file.exists() else 0
    todo = [e for e in sorted(data.index, key=lambda e: e["offset"]) if e["offset"] + e["length"] > done]
    if todo and todo[0]["offset"] < done:  # a partial sequence from an interrupted run: redo it
        done = todo[0]["offset"]
    with labels_file.open("ab") as f:
        f.truncate(done * 4)
    full_layers = decoder.layers
    try:
        decoder.layers = rest  # the decoder now runs layers last+1.. on whatever it is given
        with labels_file.open("ab") as f, torch.inference_mode():
            for e in tqdm(todo, desc="label", unit="seq"):
                if e["offset"] != done:
                    raise ValueError(f"{data_dir}: index rows are not contiguous at offset {e['offset']}")
                x = torch.from_numpy(np.asarray(data.feats[done:done + e["length"], col:col + h], dtype=np.float32))
                x = decoder(inputs_embeds=x[None].to(weight.dtype), use_cache=False).last_hidden_state[0]
                best = (x @ weight.t()).argmax(-1)
                best = vocab[best] if vocab is not None else best
                f.write(best.to(torch.int32).numpy().tobytes())
                f.flush()
                done += e["length"]
    finally:
        decoder.layers = full_layers
    return len(todo)


@dataclass
class Sequence:
    ids: torch.Tensor  # [S]
    loss_mask: torch.Tensor  # [S] bool, True on response tokens
    feats: torch.Tensor  # [S, L*H] float32
    target_next: torch.Tensor | None = None  # [S] the target's greedy token after each position


def _most_frequent(counts: torch.Tensor, n: int) -> torch.Tensor:
    order = sorted(range(len(counts)), key=lambda t: (-int(counts[t]), t))
    return torch.tensor(order[:n])


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
        labels = path / "labels.i32"
        n = labels.stat().st_size // 4 if labels.exists() else 0
        self.labels = np.memmap(labels, dtype=np.int32, mode="r", shape=(n,)) if n >= rows else None

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for e in self.index:
            counts += torch.bincount(torch.tensor(e["ids"]), minlength=vocab_size)[:vocab_size]
        return counts

    def top_tokens(self, n: int, vocab_size: int) -> torch.Tensor:
        """The n most frequent token ids across all captured sequences (ties: lower id first)."""
        return _most_frequent(self.token_counts(vocab_size), n)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sequence:
        e = self.index[i]
        ids = torch.tensor(e["ids"], dtype=torch.long)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[e["prompt_len"]:] = True
        feats = torch.from_numpy(np.asarray(self.feats[e["offset"]:e["offset"] + e["length"]], dtype=np.float32))
        nxt = None
        if self.labels is not None:
            nxt = torch.from_numpy(np.asarray(self.labels[e["offset"]:e["offset"] + e["length"]], dtype=np.int64))
        return Sequence(ids, mask, feats, nxt)


class CaptureSet:
    """Several capture folders of one target (same layers and width) read as one dataset: sequence
    i of the set is sequence i - (lengths of the folders before) of its folder, in argument order."""

    def __init__(self, paths: list[Path]):
        self.parts = [CapturedData(p) for p in paths]
        first = self.parts[0]
        for p, d in zip(paths[1:], self.parts[1:]):
            if (d.layer_ids, d.width) != (first.layer_ids, first.width):
                raise ValueError(f"{p} captured layers {d.layer_ids} (width {d.width}), "
                                 f"{paths[0]} captured {first.layer_ids} (width {first.width})")
        self.layer_ids, self.width = first.layer_ids, first.width
        self.num_tokens = sum(d.num_tokens for d in self.parts)
        self.has_labels = all(d.has_labels for d in self.parts)
        self._where = [(k, i) for k, d in enumerate(self.parts) for i in range(len(d))]

    def top_tokens(self, n: int, vocab_size: int) -> torch.Tensor:
        counts = sum(d.token_counts(vocab_size) for d in self.parts)
        return _most_frequent(counts, n)

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i: int) -> Sequence:
        k, j = self._where[i]
        return self.parts[k][j]
