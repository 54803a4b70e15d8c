"""Liveness between the router and its neighbours on the request plane.

Frontends ping the router every heartbeat period; the router answers each ping with a pong (so a
frontend can tell a hung router from a quiet one) and notes when it last heard each frontend. A
ROUTER socket does not say which peer's connection dropped, so a frontend that pinged and has
been silent `timeout_s` is gone (SIGKILL, a lost host, a hang): its clients' streams ended with
it, and its requests are cancelled on the workers rather than left to run to completion. "Has
been silent" is judged as for workers, by a phi-accrual detector per frontend
(`common/failure_detector.py`): pings that came regularly make a short silence damning (~0.4
s), a frontend whose pings have been irregular (a busy host) gets the slack it has shown, and
`timeout_s` of silence is a verdict whatever the history.

After a pause of the router's own (a late check: SIGSTOP, a paused VM, a starved host) the
frontends most likely stopped with it, and on a busy host they may run again a while later: for
as long again as the pause lasted (at most `timeout_s`) no silence is a verdict. (A ping read
just after the pause may have been sent before it: it says nothing of the frontend now.) A
verdict on a frontend that was only slow cancels every stream it carries.

The router pings its workers the same way, so a worker can tell when the router that sent it
work is gone (`services/worker/router_watch.py`).

Owns the per-frontend clocks and the pings. Does not own what a cancel does (`streams.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from common.failure_detector import DetectorSettings, PhiAccrualDetector
from common.messages import KIND_PING, KIND_PONG
from common.pause_grace import PauseGrace
from services.router.accounting import Accounting
from services.router.parking import ParkingLot
from services.router.streams import FrameSender


class FrontendLiveness:
    def __init__(self, frontends: FrameSender, period_s: float, missed: int, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.frontends = frontends  # the ROUTER socket frontends connect to
        self.settings = DetectorSettings.for_heartbeats(period_s, missed, ceiling_s=timeout_s)
        self.clock = clock
        self.heard: dict[bytes, float] = {}  # frontend identity → when it last sent anything
        self.pings: dict[bytes, PhiAccrualDetector] = {}  # ... and its pings' regularity
        self.grace = PauseGrace(self.settings.ceiling_s)  # after a pause of this router's own

    def on_ping(self, frontend: bytes, pong: bytes = b"") -> None:
        """Answer with a pong carrying `pong` (`Placements`, or nothing)."""
        now = self.heard[frontend] = self.clock()
        detector = self.pings.get(frontend)
        if detector is None:
            self.pings[frontend] = PhiAccrualDetector(self.settings, now)
        else:
            detector.heartbeat(now)
        self.frontends.send_multipart([frontend, KIND_PONG, pong])

    def on_frame(self, frontend: bytes) -> None:
        """Any other frame from a frontend that pings is a sign of life too."""
        if frontend in self.heard:
            self.heard[frontend] = self.clock()

    def lost(self, now: float | None = None) -> list[bytes]:
        """Frontends whose silence is a verdict at `now` (the clock, unless given), forgotten as
        they are returned (call it only on checks that ran on time: a router that did not run
        heard nobody)."""
        now = self.clock() if now is None else now
        if not self.grace.judging(now):
            return []
        gone = [f for f, d in self.pings.items()
                if d.suspicious(now) and now - self.heard[f] > self.settings.floor_s]
        for frontend in gone:
            del self.heard[frontend]
            del self.pings[frontend]
        return gone

    def orphans(self, frontend: bytes, accounting: Accounting, parking: ParkingLot,
                ) -> list[str]:
        """Ids of the requests `frontend` had here (placed, stranded or parked)."""
        ids = [rid for rid, e in accounting.requests.items() if e.frontend == frontend]
        return ids + [rid for rid, p in parking.requests.items() if p.frontend == frontend]

    def pause(self, paused_s: float) -> None:
        """This router did not run for `paused_s` (a late check): nobody's silence counts (the
        pings queued meanwhile arrive at once, and are not learnt as the frontends' rhythm), and
        none is judged for as long again as the pause lasted."""
        now = self.clock()
        self.grace.paused(now, paused_s)
        for frontend in self.heard:
            self.heard[frontend] = now
            self.pings[frontend] = PhiAccrualDetector(self.settings, now)


def ping_workers(sockets: Iterable[FrameSender]) -> None:
    for socket in sockets:
        socket.send_multipart([KIND_PING, b""])
