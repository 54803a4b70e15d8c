"""Telling a slow start from a stuck one, per role.

A role whose asked-for workers are not all ready is *starting*; it is *stuck* once it has had
unready workers for `timeout_s` without one more becoming ready (a pod that cannot be scheduled
for want of a GPU, an image that never pulls, a worker that hangs loading). A ramp where workers
keep becoming ready is never stuck, however long it lasts. While a role is stuck the planner adds
no workers to it (more of the same would not start either) but keeps deciding: it may still
scale the role down (the ReplicaSet removes unready pods first), and the moment a worker becomes
ready, or the unready ones go away, the role is no longer stuck.

Owns the judgement and its count. Does not own reading the pool (`connectors`) or acting on it
(`main`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.planner.connectors import PoolState

log = logging.getLogger("turnout.planner")


@dataclass(slots=True)
class _Starting:
    since: float  # when the role last had no unready worker, or last made progress
    ready: int  # ready workers at that moment
    stuck: bool = False


class StartupWatch:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"ready timeout must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.clock = clock
        self.timeouts: dict[str, int] = {}  # role → times it became stuck
        self._starting: dict[str, _Starting] = {}

    def update(self, role: str, state: PoolState) -> bool:
        """Fold in the role's pool as just observed; True while it is stuck."""
        now = self.clock()
        if state.ready >= state.desired:
            if self._starting.pop(role, None) is not None and state.desired:
                log.debug("workers ready", extra={"fields": {"role": role,
                                                             "ready": state.ready}})
            return False
        starting = self._starting.get(role)
        if starting is None or state.ready > starting.ready:
            if starting is not None and starting.stuck:
                log.info("a worker became ready; scaling up again", extra={"fields": {
                    "role": role, "ready": state.ready, "desired": state.desired}})
            self._starting[role] = _Starting(now, state.ready)
            return False
        starting.ready = state.ready  # fewer ready (one died): progress is measured from here
        if not starting.stuck and now - starting.since >= self.timeout_s:
            starting.stuck = True
            self.timeouts[role] = self.timeouts.get(role, 0) + 1
            log.warning("workers not ready in time; holding scale-ups for this role",
                        extra={"fields": {"role": role, "desired": state.desired,
                                          "ready": state.ready, "waited_s": round(
                                              now - starting.since, 1)}})
        return starting.stuck

    def stuck(self, role: str) -> bool:
        starting = self._starting.get(role)
        return starting is not None and starting.stuck
