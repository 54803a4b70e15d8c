"""The ITL miss budget of conditional disaggregation: how many inter-token gaps local prefills
may stretch to cut the TTFT tail.

A latency target is a percentile, but TTFT is one figure per request while ITL is one per
token: a request streams a hundred gaps or more. A local prefill on a busy decode worker
stretches the step every stream there decodes in; when the prefill pool is far slower than
that local prefill, the router may still take it, as long as the gaps such prefills stretched
stay within `--disagg-itl-miss-budget` (a share) of the gaps streamed, both counted over a
decaying window. Owns that bookkeeping; the decision is `disaggregation.py`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class ItlMissBudget:
    """Gaps streamed and gaps stretched by budgeted local prefills, both decaying with
    `half_life_s`."""

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
        self.streamed = 0.0
        self.stretched = 0.0

    def _decay(self) -> None:
        now = self._clock()
        if now > self._at:
            f = math.exp(-self._rate * (now - self._at))
            self.streamed *= f
            self.stretched *= f
            self._at = now

    def on_streamed(self, gaps: int) -> None:
        if gaps > 0:
            self._decay()
            self.streamed += gaps

    def room(self, gaps: float) -> bool:
        """Stretching `gaps` more gaps keeps the stretched share within the budget."""
        if self.share <= 0.0:
            return False
        self._decay()
        return self.stretched + gaps <= self.share * self.streamed

    def spend(self, gaps: float) -> None:
        self._decay()
        self.stretched += gaps
