"""Numbers the tabs show, computed from `Result`s (pure functions, unit-tested).

Decode speed is tokens over decode time (total minus queue and prefill), so a prefix-cache hit or a
wait in the queue does not make a method look faster or slower than its decoding is. Speedups are
against `ar` (plain decoding) as measured on this server: the median decode speed of its recent
`ar` requests, since the baseline depends on the machine and model, not on anything we can assume.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from app.backend import Result
from app.metrics import Finished

from .jobs import RACE_SHARED

MIN_BASELINE_TOKENS = 8  # shorter ar runs are mostly per-request overhead, not decode speed


def decode_seconds(r: Result) -> float:
    return max(r.total_ms - r.queue_ms - r.prefill_ms, 0.0) / 1000


def decode_rate(r: Result) -> float | None:
    """Generated tokens per second of decoding; None when nothing was decoded."""
    s = decode_seconds(r)
    return r.completion_tokens / s if r.completion_tokens and s > 0 else None


def method_of(r: Result) -> str:
    return (r.spec or {}).get("method") or "remote"


def tau(r: Result) -> float | None:
    t = (r.spec or {}).get("tau")
    return t if t else None


def ar_baseline(recent: Iterable[Finished]) -> float | None:
    """Median decode speed of recent finished `ar` requests long enough to measure, else None.
    Race runs that shared the engine do not count (their speed is over shared time)."""
    rates = [decode_rate(f.result) for f in recent
             if method_of(f.result) == "ar" and f.result.completion_tokens >= MIN_BASELINE_TOKENS
             and f.result.finish_reason in ("stop", "length") and f.kind != RACE_SHARED]
    rates = [x for x in rates if x]
    return statistics.median(rates) if rates else None


def speedup(r: Result, baseline: float | None) -> float | None:
    rate = decode_rate(r)
    return rate / baseline if rate and baseline else None


FINISH_NOTES = {"length": "max tokens reached", "cancelled": "stopped", "deadline": "deadline passed"}


def reply_footer(r: Result, baseline: float | None) -> str:
    """One line under a reply: τ · tok/s · speedup vs ar · method · tokens and time."""
    parts = []
    t = tau(r)
    if t:
        parts.append(f"τ {t:.2f}")
    rate = decode_rate(r)
    if rate:
        parts.append(f"{rate:.1f} tok/s")
    m = method_of(r)
    if m == "ar":
        parts.append("the ar baseline")
    else:
        x = speedup(r, baseline)
        parts.append(f"≈{x:.2f}× vs ar" if x else "speedup vs ar: not measured yet (an ar chat or a Race measures it)")
    parts.append(m)
    parts.append(f"{r.completion_tokens} tokens in {r.total_ms / 1000:.1f} s")
    if r.finish_reason in FINISH_NOTES:
        parts.append(FINISH_NOTES[r.finish_reason])
    return " · ".join(parts)


def first_difference(a: str, b: str) -> int | None:
    """Index of the first character where a and b differ (the shorter one's length if one is a prefix
    of the other); None when they are identical."""
    if a == b:
        return None
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def identical_verdict(a: Result, b: Result) -> tuple[bool, str]:
    """(identical, sentence) for the Race tab's losslessness check of two finished runs."""
    if a.finish_reason not in ("stop", "length") or b.finish_reason not in ("stop", "length"):
        return False, "not compared: a run did not finish"
    i = first_difference(a.text, b.text)
    if i is None:
        return True, f"identical output: yes ({a.completion_tokens} tokens, {len(a.text)} characters)"
    return False, f"identical output: no (first difference at character {i})"
