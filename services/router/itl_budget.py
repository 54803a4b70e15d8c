"""The ITL miss budget of conditional disaggregation: how many inter-token gaps local prefills may
stretch to cut the TTFT tail.

A latency target is a percentile, but TTFT is one figure per request while ITL is one per token:
a request streams a hundred gaps or more. A local prefill on a busy decode worker stretches the
step every stream there decodes in; when the prefill pool is far slower than that local prefill,
the router may still take it, as long as the gaps such prefills stretched stay within
`--disagg-itl-miss-budget` (a share) of the gaps streamed, both counted over a decaying window.
A request's gaps count from its admission, as many as it is expected to stream (its
`max_tokens`, or the recent mean output when smaller), and are set right when it ends: the
streams a local prefill stretches are in flight, and their gaps are part of the same percentile,
so a router that has just started (or a burst's first requests) has a budget too instead of none
until enough has streamed. The same budget pays for first tokens not held
(`--disagg-hold-first-token`) because their request is already in the TTFT tail
(`FirstTokenTail`: past the 0.9 quantile of recent first-token times, counting the expected
hand-off): each is one gap stretched by its hand-off, where holding it would add that hand-off
to one of the slowest first tokens. Owns that bookkeeping; the decisions are
`disaggregation.py`'s.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class FirstTokenTail:
    """Recent times from placement to the first token of remotely prefilled requests, and
    their quantile: a held first token past it would only deepen the TTFT tail."""

    MIN_SAMPLES = 20  # before this many, no tail is known

    def __init__(self, quantile: float = 0.9, window: int = 256) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"the tail quantile must be in (0, 1), got {quantile}")
        self.quantile = quantile
        self._recent: deque[float] = deque(maxlen=window)

    def observe(self, elapsed_ms: float) -> None:
        self._recent.append(elapsed_ms)

    def bound_ms(self) -> float:
        """The quantile of recent first-token times (inf until enough were seen). Sorted on
        demand: it is asked once per held first token, of a few hundred values."""
        n = len(self._recent)
        if n < self.MIN_SAMPLES:
            return math.inf
        return sorted(self._recent)[min(n - 1, int(self.quantile * n))]


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
        if self.mean_output is None:
            self.mean_output = float(tokens)
        else:
            self.mean_output += self.OUTPUT_MEAN_WEIGHT * (tokens - self.mean_output)

    def room(self, gaps: float) -> bool:
        """Stretching `gaps` more gaps keeps the stretched share within the budget."""
        if self.share <= 0.0:
            return False
        self._decay()
        return self.stretched + gaps <= self.share * self.streamed

    def spend(self, gaps: float) -> None:
        self._decay()
        self.stretched += gaps
