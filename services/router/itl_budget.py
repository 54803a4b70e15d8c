"""The ITL miss budget of conditional disaggregation: how many inter-token gaps local prefills may
stretch to cut the TTFT tail, and the tail it is spent on.

A latency target is a percentile, but TTFT is one figure per request while ITL is one per token:
a request streams a hundred gaps or more. A local prefill on a busy decode worker stretches the
step every stream there decodes in; when the prefill pool is far slower than that local prefill,
the router may still take it, as long as the gaps such prefills stretched stay within
`--disagg-itl-miss-budget` (a share) of the gaps streamed, both counted over a decaying window.
A request's gaps count from its admission, as many as it is expected to stream (its
`max_tokens`, or the recent mean output when smaller), and are set right when it ends: the
streams a local prefill stretches are in flight, and their gaps are part of the same percentile.
One decision may draw ahead of the budget (a local prefill stretches every stream on its worker
at once, more than the share of a few seconds' gaps), so the first burst after a start or a
lull can be paid for; the next waits until the window has earned the overdraft back.

The budget is spent on the TTFT tail only (`TtftTail`: past `--disagg-tail-quantile` of the
recent first-token times as they would be with the token held, prefill then hand-off), which
is what a TTFT percentile counts: a local prefill for a request the prefill pool would put
there, and a first token sent at once, not held (`--disagg-hold-first-token`), for a request
already there: one gap stretched by its hand-off, where holding it would add that hand-off to
one of the slowest first tokens. Owns that bookkeeping; the decisions are
`disaggregation.py`'s.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class TtftTail:
    """Recent first-token times and their quantile: what the budget is spent on lies past it."""

    def __init__(self, quantile: float = 0.9, window: int = 256, min_samples: int = 20) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"the tail quantile must be in (0, 1), got {quantile}")
        self.quantile = quantile
        self.min_samples = min_samples
        self._recent: deque[float] = deque(maxlen=window)

    def observe(self, ms: float) -> None:
        self._recent.append(ms)

    def bound_ms(self, unknown: float = math.inf, fill: float = 0.0) -> float:
        """The quantile of the recent values; `unknown` until `min_samples` were seen (inf:
        nothing is in the tail yet; 0: anything may be). `fill`: how much of the budget is
        spent (0-1); the quantile moves that far towards 1, so a budget running low is kept
        for the slowest. Sorted on demand: a few hundred values, once per decision that may
        spend the budget."""
        n = len(self._recent)
        if n < self.min_samples:
            return unknown
        q = self.quantile + (1.0 - self.quantile) * min(1.0, max(0.0, fill))
        return sorted(self._recent)[min(n - 1, int(q * n))]


class ItlMissBudget:
    """Gaps of admitted requests and gaps stretched by budgeted local prefills, both decaying
    with `half_life_s`."""

    # A request's expected output before any request has finished (a chat answer's order of
    # magnitude); replaced by the decaying mean of finished outputs after the first.
    PRIOR_OUTPUT_TOKENS = 256.0
    OUTPUT_MEAN_WEIGHT = 1.0 / 32.0  # each finished request's weight in that mean

    def __init__(self, share: float, half_life_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 <= share < 1.0:
            raise ValueError(f"the ITL miss budget must be in [0, 1), got {share}")
        if half_life_s <= 0:
            raise ValueError("the budget's half-life must be > 0")
        self.share = share
        self._rate = math.log(2.0) / half_life_s
        self._clock = clock
        self._at = clock()
        self.streamed = 0.0  # gaps of admitted requests (expected until they end)
        self.stretched = 0.0
        self.mean_output: float | None = None  # tokens of recently finished requests
        self._finished_count = 0

    def _decay(self) -> None:
        now = self._clock()
        if now > self._at:
            f = math.exp(-self._rate * (now - self._at))
            self.streamed *= f
            self.stretched *= f
            self._at = now

    def admitted(self, max_new_tokens: int) -> int:
        """A request that may stream `max_new_tokens` more tokens was placed: count the gaps
        it is expected to stream, and return that count for `finished`."""
        expected = self.PRIOR_OUTPUT_TOKENS if self.mean_output is None else self.mean_output
        gaps = max(0, min(max_new_tokens, math.ceil(expected)) - 1)
        if gaps:
            self._decay()
            self.streamed += gaps
        return gaps

    def finished(self, counted_gaps: int, tokens: int) -> None:
        """A request admitted with `counted_gaps` ended after streaming `tokens`: its real
        gaps replace the expected ones, and its length teaches the expected output."""
        self._decay()
        self.streamed = max(0.0, self.streamed + max(0, tokens - 1) - counted_gaps)
        # A plain mean of the first ones, then decaying: one short request (a health probe)
        # must not stand for the next dozens.
        self._finished_count += 1
        mean = 0.0 if self.mean_output is None else self.mean_output
        weight = max(self.OUTPUT_MEAN_WEIGHT, 1.0 / self._finished_count)  # the first: 1
        self.mean_output = mean + weight * (tokens - mean)

    def allowance(self) -> float:
        """Gaps the window lets stretch: the share of its gaps."""
        self._decay()
        return self.share * self.streamed

    def fill(self) -> float:
        """How much of the allowance is spent: 0 (none) to 1 (all, or more)."""
        allowance = self.allowance()
        return min(1.0, self.stretched / allowance) if allowance > 0 else 1.0

    def room(self) -> bool:
        """The budget is not overdrawn: the gaps stretched so far are under the share of the
        window's. The decision that spends it may draw ahead by its own gaps, so the first
        burst after a start or a lull is paid for too; that overdraft (one decision's streams)
        is paid back before the next."""
        if self.share <= 0.0:
            return False
        allowance = self.allowance()  # decays `stretched` too: read it after
        return self.stretched < allowance

    def spend(self, gaps: float) -> None:
        self._decay()
        self.stretched += gaps
