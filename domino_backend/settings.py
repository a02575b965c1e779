"""Every engine setting in one dataclass, with its default and the reason for it.

`EngineSettings` is what an `Engine` is built with; `GenerationRequest` fields left as None take
their value from it. `add_arguments` / `from_args` expose each field once as a command-line flag,
for `python -m domino_backend` and `python -m app` alike (nested configs become `--ngram-...`,
`--tree-...`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NgramConfig:
    """Prompt lookup (`ngram`, and the lookup half of `domino+ngram`)."""

    max_ngram: int = 3  # longest recurring suffix tried first
    min_ngram: int = 1
    # Tokens proposed per round. Long: a copied line or block is accepted whole, and the adaptive
    # draft length verifies fewer where lookup drafts fail (docs/design.md, "Prompt lookup").
    num_draft: int = 16
    hybrid_min_match: int = 2  # domino+ngram: shorter matches (or none) draft with the Domino drafter


@dataclass(frozen=True)
class TreeConfig:
    """Draft trees for greedy requests (tree.py)."""

    width: float = 1.0  # a round drafting K tokens verifies round(width * K) nodes (<= batch_invariant.MAX_ROWS - 1)
    beam: int = 4  # nodes expanded per depth, each into its `beam` most probable children


@dataclass(frozen=True)
class EngineSettings:
    ngram: NgramConfig = field(default_factory=NgramConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    # Request defaults (a GenerationRequest field left None takes these):
    # Pick the drafts per round from measured acceptance and verify cost (draft_length.py); False
    # verifies the cap every round. Lossless either way.
    adaptive_drafts: bool = True
    # Greedy requests with the Domino head draft a tree instead of a chain (sampling: always a chain).
    draft_tree: bool = True
    # Cap on drafts verified per round (None: the method's own, 16 for a shift_label block-16
    # drafter; 15 reproduces SGLang's window).
    max_drafts: int | None = None
    # Engine-wide:
    # Requests sharing a forward draft only while whole steps measure faster with drafts than
    # without (draft_length.DraftGate); False leaves each round to its request's policy alone.
    draft_gate: bool = True
    prefill_chunk: int = 512  # prompt tokens per prefill forward; a long prompt yields between chunks
    # Rows per batched forward: every round's rows, then prefill chunks that fit (cut at block boundaries).
    batch_rows: int = 512
    # KV snapshots of recent prompts kept for prefix reuse (0: off): one per file being typed in or
    # conversation, so many clients' keystrokes do not evict each other's; and the memory they may
    # hold (prefix_cache.py), the bound that matters for long prompts and large models.
    prefix_cache: int = 64
    prefix_cache_mb: int = 2048
    prefix_min_reuse: int = 16  # shortest shared prompt prefix worth restoring

    def __post_init__(self) -> None:
        if self.prefill_chunk < 1 or min(self.prefix_cache, self.prefix_cache_mb, self.max_drafts or 0) < 0:
            raise ValueError("prefill_chunk must be >= 1, prefix_cache, prefix_cache_mb and max_drafts >= 0")
        if not self.tree.width > 0 or self.tree.beam < 1:
            raise ValueError("tree width must be > 0 and beam >= 1")
        if not 1 <= self.ngram.min_ngram <= self.ngram.max_ngram or self.ngram.num_draft < 0:
            raise ValueError("lookup needs 1 <= min_ngram <= max_ngram and num_draft >= 0")


def _fields(cls, prefix: str = ""):
    """(flag name, attribute path, type, default) of every leaf field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _fields(t, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield (prefix + f.name).replace(".", "-").replace("_", "-"), prefix + f.name, t, default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine settings (domino_backend/settings.py)")
    for flag, path, t, default in _fields(EngineSettings):
        dest = "engine__" + path.replace(".", "__")
        if t is bool:
            g.add_argument(f"--{flag}", dest=dest, action=argparse.BooleanOptionalAction, default=default)
        else:
            conv = int if t in (int, int | None) else float if t is float else str
            g.add_argument(f"--{flag}", dest=dest, type=conv, default=default, metavar=conv.__name__.upper(),
                           help=f"default {default}")


def from_args(args: argparse.Namespace) -> EngineSettings:
    values: dict = {}
    for _, path, _, _ in _fields(EngineSettings):
        *outer, leaf = path.split(".")
        d = values
        for o in outer:
            d = d.setdefault(o, {})
        d[leaf] = getattr(args, "engine__" + path.replace(".", "__"))
    return EngineSettings(ngram=NgramConfig(**values.pop("ngram")), tree=TreeConfig(**values.pop("tree")), **values)
