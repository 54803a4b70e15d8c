"""Worker liveness: the verdicts that take a worker out of routing, and the one that brings it
back, as a state machine per worker driven by an injectable clock.

    ALIVE ──connection dropped──▶ DEAD          (cause crash, or drain if it said it drains)
    ALIVE ──its silence is suspicious (phi-accrual detector)──▶ SUSPECT   (cause hang)
    ALIVE ──work in flight, heartbeats without engine progress for stall_timeout──▶ SUSPECT
                                                                     (cause stall)
    SUSPECT ──heartbeat showing progress (or no work)──▶ ALIVE   (re-admitted after a resync)
    SUSPECT ──connection dropped──▶ DEAD

Silence is judged by a `PhiAccrualDetector` per worker (`common/failure_detector.py`): it learns
how irregular the worker's heartbeats are and hears the worker's own word on how late its event
loop ran, so a worker starved on a busy host is not taken for a hung one, while a frozen worker
on a quiet host is still suspected within half a second. Never before `missed_heartbeats`
periods of silence: the old fixed rule is the floor. A hang suspect's requests whose prefill is
long (`long_prefill_tokens` still to compute) are held on it until the detector convicts: moving
them redoes the whole prefill elsewhere, which a false suspicion must not cost.

A suspect's connection is still open: it may be a false alarm (a starved host), so it is not
closed, only told to drop the requests moved away meanwhile. A check that itself ran late
(the event loop was starved, or the router stopped: SIGSTOP, a paused VM) judges nobody:
heartbeats may be sitting unread. After such a pause the workers most likely stopped too and
may run again a while after the router does, so each worker's silence counts from the end of
the pause, and no silence is a verdict for as long again as the pause lasted (at most the
detector's ceiling; a heartbeat read just after the pause may have been sent before it).
Owns the verdicts and the handle's liveness fields; what happens to a lost worker's requests
belongs to the router (`main.py`) and `migration.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common.failure_detector import DetectorSettings, PhiAccrualDetector
from common.messages import Heartbeat
from common.pause_grace import PauseGrace
from services.router.accounting import RoutedRequest
from services.router.worker_pool import WorkerHandle

CAUSE_CRASH = "crash"
CAUSE_HANG = "hang"
CAUSE_STALL = "stall"
CAUSE_DRAIN = "drain"

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"


def state_of(worker: WorkerHandle) -> str:
    if worker.alive:
        return ALIVE
    return SUSPECT if worker.suspect is not None else DEAD


class Loss:
    """A verdict that takes a worker out of routing."""

    __slots__ = ("cause", "crashed", "first", "silent_s", "worker")

    def __init__(self, worker: WorkerHandle, cause: str, crashed: bool, first: bool,
                 silent_s: float) -> None:
        self.worker = worker
        self.cause = cause
        self.crashed = crashed  # connection gone: closed for good (else: a suspect)
        self.first = first  # it was alive until now (not a suspect whose connection dropped)
        self.silent_s = silent_s  # since its last heartbeat


class Liveness:
    def __init__(self, heartbeat_period_s: float, missed_heartbeats: int, stall_s: float,
                 clock: Callable[[], float] = time.monotonic, suspect_phi: float = 8.0,
                 convict_phi: float = 12.0, long_prefill_tokens: int = 4096) -> None:
        self.period = heartbeat_period_s
        self.detector = DetectorSettings.for_heartbeats(
            heartbeat_period_s, missed_heartbeats, suspect_phi=suspect_phi,
            convict_phi=convict_phi)
        if long_prefill_tokens < 0:
            raise ValueError(f"long_prefill_tokens must be >= 0, got {long_prefill_tokens}")
        self.long_prefill_tokens = long_prefill_tokens  # 0: every prefill waits
        self.stall = stall_s  # 0: off
        self.clock = clock
        self._last_check: float | None = None
        self.paused_s = 0.0  # how late the last check ran (0: on time)
        self.grace = PauseGrace(self.detector.ceiling_s)  # after a pause of the router's own

    def watch(self, worker: WorkerHandle) -> None:
        """A worker was admitted: its silence counts from now."""
        now = self.clock()
        worker.last_heartbeat = worker.last_progress = now
        worker.detector = PhiAccrualDetector(self.detector, now)

    def on_heartbeat(self, worker: WorkerHandle, hb: Heartbeat) -> bool:
        """Note a heartbeat; True when it brings a suspect back (SUSPECT → ALIVE)."""
        now = worker.last_heartbeat = self.clock()
        if worker.detector is not None:
            worker.detector.heartbeat(now, hb.loop_lag_s)
        if hb.steps != worker.last_steps or not worker.inflight:
            worker.last_progress = now
        worker.last_steps = hb.steps
        worker.replica_peers = hb.replica_peers
        recovered = worker.suspect is not None and (
            hb.steps != worker.suspect or not hb.active_requests)
        if recovered:
            worker.alive = True
            worker.routable = not worker.draining
            worker.suspect = None
            worker.last_progress = worker.last_heartbeat
        if hb.draining:
            worker.routable = False
            worker.draining = True
        return recovered

    def on_disconnect(self, worker: WorkerHandle) -> str:
        """The cause a dropped connection means."""
        return CAUSE_DRAIN if worker.draining else CAUSE_CRASH

    def check_on_time(self) -> bool:
        """Called every half period: False when this check itself ran late (skip judging)."""
        now = self.clock()
        late = self._last_check is not None and now - self._last_check > self.period
        self.paused_s = now - self._last_check if late and self._last_check is not None else 0.0
        self._last_check = now
        return not late

    @property
    def checked_at(self) -> float:
        """When the latest check read the clock: its verdicts are as of then."""
        return self._last_check or 0.0

    def forgive_pause(self, workers: list[WorkerHandle]) -> None:
        """The last check ran `paused_s` late: no silence meanwhile counts (nor is it learnt as
        the workers' rhythm), and none is a hang for as long again."""
        now = self.clock()
        self.grace.paused(now, self.paused_s)
        for worker in workers:
            worker.last_heartbeat = worker.last_progress = now
            worker.detector = PhiAccrualDetector(self.detector, now)

    def silent_too_long(self, worker: WorkerHandle, now: float) -> bool:
        """Whether `worker`'s silence is suspicious (a hang verdict)."""
        if worker.detector is None:  # never watched: judged from its handle's creation
            worker.detector = PhiAccrualDetector(self.detector, worker.last_heartbeat)
        if not self.grace.judging(now):
            return False  # just back from a pause of this router's own
        return worker.detector.suspicious(now)

    def holds(self, entry: RoutedRequest) -> bool:
        """Whether a hang suspect keeps `entry` until it is convicted: its prefill is long (the
        tokens still to compute before its first token)."""
        worker = entry.worker
        return worker is not None and bool(entry.prefill_blocks) and (
            entry.prefill_blocks * worker.block_size >= self.long_prefill_tokens)

    def convictions(self, workers: list[WorkerHandle], now: float | None = None,
                    ) -> list[WorkerHandle]:
        """Hang suspects still holding requests whose silence is certain enough at `now` (the
        clock, unless given) to move those too."""
        now = self.clock() if now is None else now
        return [w for w in workers if w.suspect is not None and not w.alive and w.inflight
                and w.detector is not None and w.detector.convicted(now)]

    def stalled(self, worker: WorkerHandle, now: float) -> bool:
        """Heartbeats come, but with work in flight its engine has not stepped for `stall`."""
        return bool(self.stall and worker.inflight and now - worker.last_progress > self.stall)

    def verdicts(self, workers: list[WorkerHandle], now: float | None = None,
                 ) -> list[tuple[WorkerHandle, str]]:
        """Live workers to declare lost as of `now` (the clock, unless given), with the cause."""
        now = self.clock() if now is None else now
        out = []
        for worker in workers:
            if not worker.alive:
                continue
            if self.silent_too_long(worker, now):
                out.append((worker, CAUSE_HANG))
            elif self.stalled(worker, now):
                out.append((worker, CAUSE_STALL))
        return out

    def declare_lost(self, worker: WorkerHandle, cause: str) -> Loss | None:
        """ALIVE → SUSPECT (hang, stall) or ALIVE/SUSPECT → DEAD (crash, drain); None when the
        verdict changes nothing (already dead, or a suspect judged silent again)."""
        crashed = cause in (CAUSE_CRASH, CAUSE_DRAIN)
        if not worker.alive and not (crashed and worker.suspect is not None):
            return None
        loss = Loss(worker, cause, crashed, worker.alive, self.clock() - worker.last_heartbeat)
        worker.alive = False
        worker.routable = False
        if crashed:
            worker.suspect = None
        else:
            worker.synced = False  # re-admission starts with a full KV resync
            worker.suspect = worker.last_steps  # a stalled one must get past this step count
        return loss
