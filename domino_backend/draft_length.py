"""Cost-aware draft length: choose how many drafts to verify each round, from measurements.

Any K is lossless (verification decides what is kept), so this only trades speed. A round with K
drafts commits E[K] = 1 + sum_{i=1..K} prod_{j<=i} a_j tokens on average, where a_j is the
acceptance of draft j given drafts 1..j-1 were accepted, and costs draft_s (0 when K = 0) plus the
target's verify time for K+1 tokens. On a GPU verifying 17 tokens costs about one decoding step,
so the best K is the block's; on a small CPU it can cost several, so a weak drafter is better
verified a few tokens at a time, or not at all (K = 0 is plain decoding).

The policy keeps exponentially decayed estimates (recent rounds weigh most, so a request that
turns from prose to boilerplate is followed within a few rounds) of a_j, of the draft time and of
the verify time per K (interpolated between measured K's), and picks the K with the most tokens
per second. Verify time is kept per `context`: a round alone in its forward (0) pays the whole
forward, one sharing it with other requests' rows (1) pays its rows' share, which is far less per
row on a CPU. One table for both would carry a burst of batched rounds' cheap verifies into the
next request served alone (and the reverse); acceptance is a property of the drafts, shared.
Probe rounds verify the full cap so the estimates for long drafts stay fresh even while short
ones are chosen: every `probe_every` rounds while drafting pays, and, while plain decoding
(K = 0) keeps winning, at a doubling interval up to `max_probe_every` (each failed probe costs a
full verify). Measurements behind these choices: docs/design.md, "Adaptive draft length".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median


@dataclass
class AdaptiveDraftLength:
    max_k: int
    decay: float = 0.9  # verify-time history weight per round (~10 rounds of memory)
    # Acceptance evidence comes only from rounds that draft, which are sparse once short drafts
    # win, so it keeps a longer memory (~33 drafting rounds): a noisy a_1 would flip the choice.
    accept_decay: float = 0.97
    probe_every: int = 8
    max_probe_every: int = 64
    prior_accept: float = 0.5  # a_1 before any evidence, weight `prior_weight` rounds; a_j's
    prior_weight: float = 1.0  # prior is the estimate of a_(j-1) (acceptance rarely rises with j)
    rounds: int = 0
    tried: list[float] = field(default_factory=list)  # decayed rounds that verified draft j with 1..j-1 accepted
    accepted: list[float] = field(default_factory=list)  # decayed rounds that accepted draft j
    # context -> K -> [decayed weight, decayed sum of seconds]
    verify: dict[int, dict[int, list[float]]] = field(default_factory=dict)
    # Draft time: the median of recent drafting rounds, not a decayed mean. The first draft of a
    # process pays one-off kernel set-up (about 10x a warm draft); a mean remembers it for dozens
    # of rounds, during which drafting looks too dear to try.
    draft_samples: deque = field(default_factory=lambda: deque(maxlen=9))
    interval: int = field(init=False)  # rounds between probes now (probe_every .. max_probe_every)
    next_probe: int = field(init=False)  # round number of the next full-cap probe

    def __post_init__(self):
        self.tried = [0.0] * self.max_k
        self.accepted = [0.0] * self.max_k
        self.interval = self.probe_every
        self.next_probe = self.probe_every

    def acceptance(self) -> list[float]:
        """a_j for j = 1..max_k (conditional on the previous drafts being accepted)."""
        w, prior, out = self.prior_weight, self.prior_accept, []
        for acc, tried in zip(self.accepted, self.tried):
            prior = (acc + w * prior) / (tried + w)
            out.append(prior)
        return out

    @property
    def draft_s(self) -> float | None:
        return median(self.draft_samples) if self.draft_samples else None

    def verify_seconds(self, k: int, context: int = 0) -> float | None:
        """Measured mean verify time at K, else linear interpolation between the measured K's
        around it (extrapolated from the last two beyond them); None before any round. Not one
        global line: CPU verify cost jumps from K = 0 (a matrix-vector product) to K >= 1 and then
        grows slowly, so a line through K = 0 and K = 8 underprices short drafts."""
        pts = sorted((kk, s / w) for kk, (w, s) in self.verify.get(context, {}).items() if w > 1e-3)
        if not pts:
            return None
        below = [p for p in pts if p[0] <= k]
        above = [p for p in pts if p[0] >= k]
        if below and above:
            (k0, t0), (k1, t1) = below[-1], above[0]
            return t0 if k1 == k0 else t0 + (t1 - t0) * (k - k0) / (k1 - k0)
        if not below or len(pts) == 1:
            return pts[0][1]
        (k0, t0), (k1, t1) = pts[-2], pts[-1]
        return t1 + max((t1 - t0) / (k1 - k0), 0.0) * (k - k1)

    def expected_tokens(self, k: int) -> float:
        return self._expected_by_k()[k]

    def _expected_by_k(self) -> list[float]:
        """E[tokens committed] for K = 0..max_k, from one pass over the acceptance estimates."""
        out, run = [1.0], 1.0
        for a in self.acceptance():
            run *= a
            out.append(out[-1] + run)
        return out

    def choose(self, cap: int, context: int = 0) -> int:
        """Drafts to verify this round, at most `cap` (the budget / context window / request
        limit); context: whether the round is expected to share its forward (module docstring)."""
        cap = min(cap, self.max_k)
        self.rounds += 1
        if cap <= 0:
            return 0
        # Measure both ends of the cost curve first (the full cap, then K = 0), then probe the cap
        # so the acceptance of long drafts stays known while short ones are chosen.
        if self.draft_s is None:
            return cap
        if self.rounds >= self.next_probe:
            self.next_probe = self.rounds + self.interval
            self.interval = min(2 * self.interval, self.max_probe_every)  # reset below once drafting pays
            return cap
        measured = self.verify.get(context, {})
        if len(measured) < 2:
            return 0 if 0 not in measured else cap

        expected, draft_s = self._expected_by_k(), self.draft_s

        def rate(k: int) -> float:
            return expected[k] / (self.verify_seconds(k, context) + (draft_s if k else 0.0))

        best = max(range(cap + 1), key=rate)
        if best:
            self.interval = self.probe_every
            self.next_probe = min(self.next_probe, self.rounds + self.probe_every)
        return best

    def update(self, k: int, a: int, draft_s: float, verify_s: float, context: int = 0) -> None:
        """Record a round that verified k drafts, accepted a of them, and took these times (its
        share of the forward, in `context`)."""
        d = self.decay
        if k:  # acceptance evidence only ages when new evidence arrives (K = 0 rounds bring none)
            for j in range(self.max_k):
                self.tried[j] *= self.accept_decay
                self.accepted[j] *= self.accept_decay
        for j in range(min(a + 1, k)):  # draft j+1 was verified with drafts 1..j accepted
            self.tried[j] += 1.0
        for j in range(a):
            self.accepted[j] += 1.0
        table = self.verify.setdefault(context, {})
        for stat in table.values():
            stat[0] *= d
            stat[1] *= d
        w, s = table.setdefault(k, [0.0, 0.0])
        table[k] = [w + 1.0, s + verify_s]
        if k:
            self.draft_samples.append(draft_s)


@dataclass
class DraftGate:
    """Whether the requests that share a forward draft at all, from whole engine steps' measured
    tokens per second, per batch size.

    The per-request policy above prices a round by its rows' share of the forward, which cannot
    see what drafting adds to a shared step (the drafter's passes, its context flush, full-cap
    probes that lengthen everyone's forward), and on a CPU where a batch of decoding rows is
    already compute-bound those costs can outweigh what drafts save. So for steps with two or more
    decoding requests, two arms per batch-size bucket: drafts allowed (each request's policy picks
    its K) or none (plain decoding, lossless like any K). Each arm keeps a decayed sum of the
    tokens its steps committed and of their seconds; the step takes the arm with more tokens per
    second, and every `explore_every` steps of a bucket the other, to keep it measured. Steps that
    carry prefill rows are not measured: a chunk's cost would land on whichever arm ran beside it.
    A request alone is left to its own policy (no gate).
    """

    decay: float = 0.8  # per measured step of an arm (~5 steps of memory)
    explore_every: int = 16
    min_steps: int = 3  # each arm's measured steps before the rates decide
    # bucket -> drafts allowed -> [decayed tokens, decayed seconds, steps measured]
    arms: dict[int, dict[bool, list[float]]] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)  # steps chosen per bucket

    @staticmethod
    def bucket(n: int) -> int:
        """Decoding requests in a step -> bucket: 2, 3-4, 5-8, 9-16, 17+."""
        return min((n - 1).bit_length(), 5)

    def rate(self, n: int, drafts: bool) -> float | None:
        """Measured tokens per second of steps with n decoding requests and this arm (None: unmeasured)."""
        tokens, seconds, _ = self.arms.get(self.bucket(n), {}).get(drafts, (0.0, 0.0, 0))
        return tokens / seconds if seconds > 0 else None

    def choose(self, n: int) -> bool:
        """Whether a step with n decoding requests drafts."""
        if n < 2:
            return True
        b = self.bucket(n)
        arms = self.arms.setdefault(b, {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]})
        for arm in (True, False):  # measure both first, drafting first
            if arms[arm][2] < self.min_steps:
                return arm
        self.steps[b] = self.steps.get(b, 0) + 1
        best = self.rate(n, True) >= self.rate(n, False)
        return best != (self.steps[b] % self.explore_every == 0)

    def update(self, n: int, drafts: bool, tokens: int, seconds: float) -> None:
        """Record a step without prefill rows: n decoding requests, the arm it took, the tokens it
        committed and its seconds (planning, drafting, the forward, verifying, the context flush)."""
        if n < 2:
            return
        arm = self.arms.setdefault(self.bucket(n), {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]})[drafts]
        arm[0] = arm[0] * self.decay + tokens
        arm[1] = arm[1] * self.decay + seconds
        arm[2] += 1
