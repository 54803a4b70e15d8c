"""The grace a process gives its peers after a pause of its own.

A process that did not run for a while (SIGSTOP, a paused VM or container, a starved host)
finds every peer silent, though they most likely stopped with it; on a busy host they may run
again a while after it does, and a heartbeat read just after the pause may have been sent
before it. So for as long again as the pause lasted (capped: a peer that really hung meanwhile
is still found) no peer's silence is a verdict. Frontends judging routers, routers judging
workers and frontends, and workers judging routers each keep one.
"""

from __future__ import annotations


class PauseGrace:
    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s
        self.until = 0.0  # no verdict by silence up to this time

    def paused(self, now: float, paused_s: float) -> None:
        """This process did not run for `paused_s` until `now`."""
        self.until = max(self.until, now + min(paused_s, self.cap_s))

    def judging(self, now: float) -> bool:
        """Whether silence may be judged at `now`."""
        return now > self.until
