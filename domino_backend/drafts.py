"""What a proposer hands the engine each round: a draft that verifies and commits itself.

A round is draft -> verify -> commit -> account (engine.py). The shapes differ only here:
`ChainDraft` (K tokens in a row, greedy or sampled) and `DraftTree` (tree.py, greedy branches
verified in one pass). Both are verified from the target's logits at [anchor, tokens...] and say
which of those rows are now committed (the anchor's row 0 first, then the accepted drafts);
`commit` leaves the target's KV cache holding exactly those rows at pos, pos + 1, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingParams, verify_chain

_EMPTY = torch.empty(0, dtype=torch.long)


@dataclass
class Draft:
    tokens: torch.Tensor  # [N] target token ids, on the CPU
    parents: list[int] | None = None  # tree rows' parents (0 = the anchor); None = a causal chain

    def verify_input(self, anchor: int, device) -> torch.Tensor:
        """[N + 1] ids for the target's verify pass: the anchor, then the drafts."""
        return torch.cat([torch.tensor([anchor]), self.tokens]).to(device)

    def accepted(self, rows: list[int]) -> list[int]:
        """The draft tokens of the committed rows after the anchor's."""
        return self.tokens[[r - 1 for r in rows[1:]]].tolist()

    @property
    def depth(self) -> int:
        """Longest branch (a chain: its length); per-position statistics count depths."""
        return self.tokens.shape[0]

    @property
    def priced_k(self) -> int:
        """The K the adaptive draft length is charged with for this round."""
        return self.tokens.shape[0]


@dataclass
class ChainDraft(Draft):
    # [K, V] the distributions the drafts were sampled from; None for greedy or deterministic drafts
    q: torch.Tensor | None = None

    def verify(self, logits: torch.Tensor, params: SamplingParams, rng) -> tuple[list[int], int]:
        """(committed rows 0..a, bonus token): greedy prefix match or lossless rejection sampling."""
        a, bonus = verify_chain(self.tokens, self.q, logits, params, rng)
        return list(range(a + 1)), bonus

    def commit(self, session, pos: int, rows: list[int]) -> None:
        session.rollback(pos + len(rows))


def empty_draft() -> ChainDraft:
    """No drafts: verifying [anchor] alone is one plain decoding step."""
    return ChainDraft(_EMPTY)
