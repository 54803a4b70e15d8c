"""The liveness state machine on a fake clock: crash → dead, hang and stall → suspect,
suspect → alive on progress, late checks skipped, drain."""

from __future__ import annotations

from common.messages import Heartbeat
from services.router.liveness import (
    ALIVE,
    CAUSE_CRASH,
    CAUSE_DRAIN,
    CAUSE_HANG,
    CAUSE_STALL,
    DEAD,
    SUSPECT,
    Liveness,
    state_of,
)
from services.router.worker_pool import WorkerHandle
from tests.router.fakes import FakeClock, worker

PERIOD = 0.1  # heartbeat period; 3 missed → 0.3 s silence; stall after 1 s


def setup() -> tuple[FakeClock, Liveness, WorkerHandle]:
    clock = FakeClock()
    live = Liveness(PERIOD, 3, 1.0, clock)
    w = worker("a")
    live.watch(w)
    return clock, live, w


def beat(live: Liveness, w: WorkerHandle, steps: int, active: int = 0,
         draining: bool = False, peers: list[str] | None = None) -> bool:
    return live.on_heartbeat(w, Heartbeat(w.id, steps, active, draining, peers or []))


def test_watch_starts_the_silence_now() -> None:
    clock, _live, w = setup()
    assert w.last_heartbeat == w.last_progress == clock.now and state_of(w) == ALIVE


def test_missed_heartbeats_make_a_suspect() -> None:
    clock, live, w = setup()
    beat(live, w, 1, peers=["b"])
    assert w.replica_peers == ["b"]
    clock.advance(0.3)
    assert live.verdicts([w]) == []  # the floor (3 missed periods): not yet
    assert w.detector is not None
    silence = w.detector.suspect_at - clock.now + 0.3  # the detector's call: 0.38 s here
    assert 0.3 < silence < 0.5
    clock.advance(silence - 0.3)
    assert live.verdicts([w]) == []  # exactly there: not yet
    clock.advance(0.01)
    silence += 0.01
    assert live.verdicts([w]) == [(w, CAUSE_HANG)]
    loss = live.declare_lost(w, CAUSE_HANG)
    assert loss is not None and loss.first and not loss.crashed
    assert abs(loss.silent_s - silence) < 1e-9
    assert state_of(w) == SUSPECT and w.suspect == 1 and not w.routable and not w.synced
    assert live.verdicts([w]) == []  # a suspect is not judged again
    assert live.declare_lost(w, CAUSE_HANG) is None


def test_no_progress_with_work_in_flight_is_a_stall() -> None:
    clock, live, w = setup()
    w.usage.requests.add("r1")
    beat(live, w, 5)
    for _ in range(12):  # heartbeats keep coming, the step count does not move
        clock.advance(0.09)
        beat(live, w, 5, active=1)
    assert live.verdicts([w]) == [(w, CAUSE_STALL)]
    assert live.declare_lost(w, CAUSE_STALL) is not None
    assert state_of(w) == SUSPECT and w.suspect == 5


def test_an_idle_worker_or_one_making_progress_never_stalls() -> None:
    clock, live, w = setup()
    for _ in range(12):
        clock.advance(0.09)
        beat(live, w, 5)  # idle: no work, no steps
    w.usage.requests.add("r1")
    for step in range(12):
        clock.advance(0.09)
        beat(live, w, 6 + step, active=1)
    assert live.verdicts([w]) == []


def test_stall_detection_off() -> None:
    clock = FakeClock()
    live = Liveness(PERIOD, 3, 0.0, clock)
    w = worker("a")
    live.watch(w)
    w.usage.requests.add("r1")
    for _ in range(30):
        clock.advance(0.09)
        beat(live, w, 5, active=1)
    assert live.verdicts([w]) == []


def test_a_suspect_recovers_on_progress_and_is_routable_again() -> None:
    clock, live, w = setup()
    w.usage.requests.add("r1")
    beat(live, w, 5, active=1)
    clock.advance(0.5)
    live.declare_lost(w, CAUSE_HANG)
    assert not beat(live, w, 5, active=1)  # alive, but still stuck on the same step
    assert state_of(w) == SUSPECT
    clock.advance(0.1)
    assert beat(live, w, 6, active=1)
    assert state_of(w) == ALIVE and w.routable and w.suspect is None
    assert w.last_progress == clock.now
    assert live.verdicts([w]) == []


def test_a_suspect_with_no_work_left_recovers_without_progress() -> None:
    clock, live, w = setup()
    beat(live, w, 5)
    clock.advance(0.5)
    live.declare_lost(w, CAUSE_HANG)
    assert beat(live, w, 5, active=0)
    assert state_of(w) == ALIVE


def test_a_dropped_connection_is_death_for_alive_and_suspect_alike() -> None:
    _clock, live, w = setup()
    assert live.on_disconnect(w) == CAUSE_CRASH
    loss = live.declare_lost(w, CAUSE_CRASH)
    assert loss is not None and loss.crashed and loss.first
    assert state_of(w) == DEAD
    assert live.declare_lost(w, CAUSE_CRASH) is None  # dead stays dead
    assert not beat(live, w, 9)  # nor does a heartbeat revive it
    assert state_of(w) == DEAD
    _, live, s = setup()
    live.declare_lost(s, CAUSE_STALL)
    loss = live.declare_lost(s, CAUSE_CRASH)
    assert loss is not None and loss.crashed and not loss.first
    assert state_of(s) == DEAD


def test_drain_stops_routing_and_a_drop_then_is_a_drain() -> None:
    _clock, live, w = setup()
    assert not beat(live, w, 1, draining=True)
    assert w.draining and not w.routable and state_of(w) == ALIVE
    assert live.on_disconnect(w) == CAUSE_DRAIN
    loss = live.declare_lost(w, CAUSE_DRAIN)
    assert loss is not None and loss.crashed and state_of(w) == DEAD


def test_a_draining_suspect_recovers_but_stays_out_of_routing() -> None:
    clock, live, w = setup()
    beat(live, w, 1, draining=True)
    clock.advance(0.5)
    live.declare_lost(w, CAUSE_HANG)
    assert beat(live, w, 2)
    assert state_of(w) == ALIVE and not w.routable


def test_a_check_that_itself_ran_late_is_skipped() -> None:
    clock, live, _w = setup()
    assert live.check_on_time()  # the first check
    clock.advance(PERIOD / 2)
    assert live.check_on_time()
    clock.advance(PERIOD * 3)  # the loop was starved: heartbeats may sit unread
    assert not live.check_on_time()
    clock.advance(PERIOD / 2)
    assert live.check_on_time()


def test_verdicts_judge_only_live_workers_each_with_its_own_cause() -> None:
    clock = FakeClock()
    live = Liveness(PERIOD, 3, 1.0, clock)
    hung, stalled, fine, dead = worker("h"), worker("s"), worker("f"), worker("d")
    for w in (hung, stalled, fine, dead):
        live.watch(w)
    stalled.usage.requests.add("r")
    dead.alive = False
    for _ in range(6):
        for w in (stalled, fine):
            beat(live, w, 3, active=len(w.usage.requests))
        clock.advance(0.2)
    assert live.silent_too_long(hung, clock.now) and not live.silent_too_long(fine, clock.now)
    assert live.verdicts([hung, stalled, fine, dead]) == [(hung, CAUSE_HANG),
                                                          (stalled, CAUSE_STALL)]


def test_silence_exactly_at_the_limit_is_not_yet_a_verdict() -> None:
    clock = FakeClock(1000.0)
    live = Liveness(0.25, 4, 0.0, clock)  # limit 1.0 s, exact in binary
    w = worker("a")
    live.watch(w)
    clock.advance(1.0)
    assert not live.silent_too_long(w, clock.now) and live.verdicts([w]) == []
    clock.advance(0.25)
    assert live.silent_too_long(w, clock.now)


def test_a_worker_with_no_work_is_never_stalled() -> None:
    clock, live, w = setup()
    w.usage.requests.add("r1")
    beat(live, w, 5, active=1)
    for _ in range(15):  # no progress while it has work...
        clock.advance(0.09)
        beat(live, w, 5, active=1)
    assert live.stalled(w, clock.now)
    w.usage.requests.clear()  # ...then the work left (its heartbeat has not said so yet)
    assert not live.stalled(w, clock.now) and live.verdicts([w]) == []
