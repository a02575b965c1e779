"""The decoding methods: one table, read by the engine, every CLI, the server and the UI.

Each entry names the proposer that drafts for it and what it needs; `resolve` turns "auto" (and a
method this engine cannot run) into the method to use, the same way for the CLI and the server.
Every method is lossless: they differ only in speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .draft_model import DraftModel
from .drafters import BlockProposer, HybridProposer, NgramProposer, Proposer
from .settings import EngineSettings
from .target import Target


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Callable[[Target, DraftModel | None, EngineSettings, bool], Proposer]  # (.., tree allowed)
    needs_drafter: bool = False
    needs_head: bool = False


def _block(use_head: bool):
    def build(target, draft, s, tree):
        return BlockProposer(draft, target, use_head, s.tree if tree and use_head else None)
    return build


def _hybrid(target, draft, s, tree):
    return HybridProposer(_block(True)(target, draft, s, tree), NgramProposer(s.ngram), s.ngram.hybrid_min_match)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ar", "plain decoding (the reference every method equals)", lambda t, d, s, tree: Proposer()),
    Method("ngram", "prompt lookup: copies what followed an earlier occurrence of the recent tokens",
           lambda t, d, s, tree: NgramProposer(s.ngram)),
    Method("dflash", "DFlash block drafter, base logits only (the Domino head off)", _block(False),
           needs_drafter=True),
    Method("domino", "block drafter + Domino head; a draft tree for greedy requests", _block(True),
           needs_drafter=True, needs_head=True),
    Method("domino+ngram", "prompt lookup where the text repeats itself, the Domino drafter elsewhere",
           _hybrid, needs_drafter=True, needs_head=True),
)}


def check(name: str, draft: DraftModel | None) -> Method:
    """The method `name`, or ValueError saying why this engine cannot run it."""
    m = METHODS.get(name)
    if m is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if m.needs_drafter and draft is None:
        raise ValueError(f"method {name!r} needs a drafter checkpoint (--draft)")
    if m.needs_head and not draft.has_head:
        raise ValueError(f"method {name!r} needs a Domino head; this drafter is plain DFlash (use 'dflash')")
    return m


def make_proposer(name: str, target: Target, draft: DraftModel | None, settings: EngineSettings,
                  tree: bool) -> Proposer:
    """A fresh proposer (per request: it holds the request's draft state); `tree` allows draft trees."""
    return check(name, draft).build(target, draft, settings, tree)


def available(draft: DraftModel | None) -> list[str]:
    """Methods an engine with this drafter (or none) can run."""
    return [n for n, m in METHODS.items()
            if not m.needs_drafter or (draft is not None and (draft.has_head or not m.needs_head))]


def resolve(name: str, draft: DraftModel | None, trained: bool, on_gpu: bool, adaptive: bool) -> str:
    """The method to serve for `name`; "auto" picks what bench/results/heldout_*.json measured fastest.

    With a trained drafter: `domino` on a GPU, where verifying a whole block costs about one step;
    `domino+ngram` on a CPU, where prompt lookup's nearly free, long drafts win wherever the text
    repeats itself. Without one: prompt lookup with the adaptive draft length (it falls back to
    plain decoding on prose), or `ar` with fixed drafts. A method that needs a missing drafter
    falls back to `ar` (ValueError for an unknown name)."""
    if name == "auto":
        if draft is not None and trained and draft.has_head:
            return "domino" if on_gpu else "domino+ngram"
        return "ngram" if adaptive else "ar"
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from auto, {', '.join(METHODS)}")
    return name if name in available(draft) else "ar"
