"""Prompt lookup (the `ngram` drafts, and the lookup half of `domino+ngram`)."""

from domino_backend.drafters import NgramProposer
from domino_backend.settings import NgramConfig


def proposer(history: list[int]) -> NgramProposer:
    p = NgramProposer(NgramConfig(max_ngram=3, num_draft=16))
    p.commit(history, None)
    return p


def test_the_occurrence_matching_furthest_back_wins_over_the_most_recent():
    # "7 8 9" occurs twice before; only the first also matches the token before it (1), like a
    # line of code copied from further up rather than a common phrase repeated nearby.
    p = proposer([1, 7, 8, 9, 20, 21, 22, 5, 7, 8, 9, 30, 31, 1, 7, 8])
    cont, match = p.lookup(9, 4)
    assert cont == [20, 21, 22, 5]
    assert match == 4  # "1 7 8 9"


def test_equal_matches_take_the_most_recent_occurrence_and_cut_the_draft_to_k():
    p = proposer([7, 8, 9, 20, 21, 7, 8, 9, 30, 31, 32, 7, 8])
    assert p.lookup(9, 2) == ([30, 31], 3)
    assert p.lookup(9, 16) == ([30, 31, 32, 7, 8, 9], 3)  # runs up to the anchor itself


def test_shorter_suffixes_are_tried_when_longer_ones_never_occurred():
    p = proposer([4, 5, 6, 2, 5, 9])
    assert p.lookup(6, 3) == ([2, 5, 9], 1)  # "9 6" never occurred; "6" did, followed by 2 5 9
    assert p.lookup(77, 3) == ([], 0)  # nothing to copy
    assert p.lookup(6, 0) == ([], 0)  # an adaptive round that drafts nothing


def test_history_grows_past_its_first_buffer_across_commits():
    p = NgramProposer(NgramConfig(num_draft=8))
    pattern = list(range(100, 130))
    for _ in range(50):  # 1,500 tokens in 30-token commits
        p.commit(pattern, None)
    # Every period matches back to the start: the back-match stops at its cap, the latest wins.
    assert p.lookup(100, 8) == (list(range(101, 109)), 3 + 64)
