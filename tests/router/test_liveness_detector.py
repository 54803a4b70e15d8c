"""Hang verdicts from the phi-accrual detector, wired into liveness and the router (fakes, fake
clock): a frozen worker on a quiet host is still caught fast, a starved one that says so is not
convicted, and long prefills move only on conviction."""

from __future__ import annotations

import random

import pytest

from common.messages import (
    KIND_CANCEL,
    KIND_GENERATE,
    TOPIC_HEARTBEAT,
    Heartbeat,
    cancel_decoder,
    generate_decoder,
)
from services.router.accounting import RoutedRequest
from services.router.liveness import CAUSE_HANG, SUSPECT, Liveness, state_of
from services.router.worker_pool import WorkerHandle
from tests.router.fakes import FakeClock, counter, request, worker
from tests.router.test_router import Harness, scenario, sock

PERIOD = 0.1


def beat(live: Liveness, w: WorkerHandle, steps: int, lag: float = 0.0) -> bool:
    return live.on_heartbeat(w, Heartbeat(w.id, steps, 0, loop_lag_s=lag))


def heartbeats(clock: FakeClock, live: Liveness, w: WorkerHandle, intervals: list[float],
               checked: bool = True) -> None:
    """One heartbeat after each interval, the liveness check running every half period in
    between; with `checked`, assert no verdict came."""
    for interval in intervals:
        waited = 0.0
        while waited + PERIOD / 2 < interval:
            clock.advance(PERIOD / 2)
            waited += PERIOD / 2
            if checked:
                assert live.verdicts([w]) == [], (interval, waited)
        clock.advance(interval - waited)
        beat(live, w, 1)


def hang_after(clock: FakeClock, live: Liveness, w: WorkerHandle) -> float:
    """Silence until the check (every half period) finds a hang."""
    t0 = clock.now
    while not live.verdicts([w]):
        clock.advance(PERIOD / 2)
        assert clock.now - t0 < 30
    return clock.now - t0


def regular(n: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [PERIOD + rng.uniform(-0.003, 0.003) for _ in range(n)]


def test_a_frozen_worker_on_a_quiet_host_is_hung_within_half_a_second() -> None:
    clock = FakeClock()
    live = Liveness(PERIOD, 3, 0.0, clock)
    w = worker("a")
    live.watch(w)
    heartbeats(clock, live, w, regular(50))
    clock.advance(0.04)  # frozen 40 ms after its last heartbeat
    detected = hang_after(clock, live, w) + 0.04
    assert 0.3 < detected <= 0.5
    assert live.verdicts([w]) == [(w, CAUSE_HANG)]


def paused_with(clock: FakeClock, live: Liveness, workers: list[WorkerHandle],
                paused: float) -> None:
    """Regular heartbeats from `workers`, checks on time; then the router does not run for
    `paused` s and its next check, late, forgives the pause."""
    for w in workers:
        live.watch(w)
    for _ in range(50):
        clock.advance(PERIOD / 2)
        assert live.check_on_time()
        clock.advance(PERIOD / 2)
        for w in workers:
            beat(live, w, 1)
        assert live.check_on_time()
    clock.advance(paused)
    assert not live.check_on_time()
    live.forgive_pause(workers)


def test_after_its_own_pause_the_router_takes_no_worker_for_hung_for_as_long_again() -> None:
    """A whole host paused 5 s and the router runs again first, its workers some moments
    later: none is hung for 5 s, not even one whose heartbeat was read just after the pause
    (it may have been sent before it); then silence is a verdict as ever."""
    clock = FakeClock()
    live = Liveness(PERIOD, 3, 0.0, clock)
    queued, dead = worker("queued"), worker("dead")
    paused_with(clock, live, [queued, dead], 5.0)
    woke = clock.now
    beat(live, queued, 1)
    clock.advance(4.95)
    assert live.verdicts([queued, dead]) == []
    hang_after(clock, live, dead)
    assert 5.0 < clock.now - woke <= 5.0 + PERIOD
    assert live.verdicts([queued]) == [(queued, CAUSE_HANG)]


def test_a_router_that_ran_a_little_late_still_finds_a_hung_worker_fast() -> None:
    """A busy host's lag (one check 0.25 s late) is no pause to wait out."""
    clock = FakeClock()
    live = Liveness(PERIOD, 3, 0.0, clock)
    w = worker("a")
    paused_with(clock, live, [w], 0.25)
    assert 0.3 < hang_after(clock, live, w) <= 0.5


def test_never_hung_before_the_missed_heartbeats() -> None:
    clock = FakeClock()
    live = Liveness(PERIOD, 6, 0.0, clock)  # the floor: 0.6 s
    w = worker("a")
    live.watch(w)
    heartbeats(clock, live, w, [PERIOD] * 50)
    assert 0.6 <= hang_after(clock, live, w) <= 0.65


def test_pauses_within_a_busy_hosts_jitter_are_not_hangs() -> None:
    clock = FakeClock()
    live = Liveness(PERIOD, 3, 0.0, clock)
    w = worker("a")
    live.watch(w)
    rng = random.Random(2)
    busy = [rng.uniform(0.2, 0.45) if rng.random() < 0.15 else rng.uniform(0.08, 0.13)
            for _ in range(400)]
    heartbeats(clock, live, w, busy[:60], checked=False)  # learning the host
    heartbeats(clock, live, w, busy[60:])  # no verdict for any of those pauses
    # ... and the same worker frozen for good is still found, within about a second.
    assert hang_after(clock, live, w) < 1.2


def test_a_worker_that_said_it_was_starved_is_not_hung_for_it_again() -> None:
    clock = FakeClock()
    live = Liveness(PERIOD, 3, 0.0, clock)
    w = worker("a")
    live.watch(w)
    heartbeats(clock, live, w, regular(50))
    clock.advance(0.45)
    assert live.verdicts([w]) == [(w, CAUSE_HANG)]  # a first starvation looks like a freeze
    live.declare_lost(w, CAUSE_HANG)
    assert beat(live, w, 2, lag=0.35)  # "my loop ran 350 ms late": back, and believed
    heartbeats(clock, live, w, regular(20, seed=3))
    heartbeats(clock, live, w, [0.5, *regular(10, seed=4), 0.55])  # starved again: no verdict


def test_which_requests_wait_for_conviction() -> None:
    live = Liveness(PERIOD, 3, 0.0, FakeClock(), long_prefill_tokens=64)
    w = worker("a", block_size=4)

    def entry(prefill_blocks: int, on: WorkerHandle | None = w) -> RoutedRequest:
        e = RoutedRequest(request(), b"fe")
        e.worker, e.prefill_blocks = on, prefill_blocks
        return e

    assert live.holds(entry(16)) and live.holds(entry(40))
    assert not live.holds(entry(15))  # 60 tokens: cheap to redo
    assert not live.holds(entry(0))  # its first token came: decoding
    assert not live.holds(entry(40, on=None))  # stranded: nowhere to hold it
    every = Liveness(PERIOD, 3, 0.0, FakeClock(), long_prefill_tokens=0)
    assert every.holds(entry(1)) and not every.holds(entry(0))
    with pytest.raises(ValueError, match="long_prefill_tokens"):
        Liveness(PERIOD, 3, 0.0, FakeClock(), long_prefill_tokens=-1)
    with pytest.raises(ValueError, match="phi"):
        Liveness(PERIOD, 3, 0.0, FakeClock(), suspect_phi=9.0, convict_phi=8.0)


def quiet(h: Harness, *workers: WorkerHandle, seconds: float = 3.0) -> None:
    """Regular heartbeats from every worker for `seconds`, checks in between."""
    steps = 1
    for _ in range(round(seconds / PERIOD)):
        for half in range(2):
            h.clock.advance(PERIOD / 2)
            if half:
                steps += 1
                for w in workers:
                    h.event(w.id, TOPIC_HEARTBEAT, Heartbeat(w.id, steps, w.inflight))
            h.router.check_liveness()


def generated_ids(w: WorkerHandle) -> list[str]:
    return [generate_decoder.decode(f[1]).request_id for f in sock(w).sent
            if f[0] == KIND_GENERATE]


def cancelled_ids(w: WorkerHandle) -> list[str]:
    return [cancel_decoder.decode(f[1]).request_id for f in sock(w).sent if f[0] == KIND_CANCEL]


def silent(h: Harness, others: list[WorkerHandle], seconds: float) -> None:
    """`seconds` in which only `others` heartbeat (every period), checks every half period."""
    for k in range(round(seconds / (PERIOD / 2))):
        h.clock.advance(PERIOD / 2)
        if k % 2:
            for w in others:
                h.event(w.id, TOPIC_HEARTBEAT, Heartbeat(w.id, 100 + k, w.inflight))
        h.router.check_liveness()


@scenario(router_mode="round-robin", long_prefill_tokens=64)
async def test_a_hung_worker_keeps_its_long_prefills_until_convicted(h: Harness) -> None:
    a, b = h.admit("a"), h.admit("b")
    b.routable = False
    h.generate("long", tokens=400)  # 100 blocks to prefill on a
    h.generate("short", tokens=8)
    b.routable = True
    quiet(h, a, b)
    silent(h, [b], 0.45)
    assert state_of(a) == SUSPECT and counter(h.router.metrics.worker_deaths, "hang") == 1
    assert generated_ids(b) == ["short"] and cancelled_ids(a) == ["short"]
    assert h.router.accounting.requests["long"].worker is a  # held
    silent(h, [b], 0.4)
    assert generated_ids(b) == ["short"]  # hung, not yet convicted
    silent(h, [b], 0.2)
    assert generated_ids(b) == ["short", "long"] and cancelled_ids(a) == ["short", "long"]
    assert h.router.accounting.requests["long"].worker is b and a.inflight == 0
    assert counter(h.router.metrics.migrations, "hang") == 2
    assert counter(h.router.metrics.worker_deaths, "hang") == 1  # one verdict, two levels


@scenario(router_mode="round-robin", long_prefill_tokens=64)
async def test_a_starved_worker_back_before_conviction_keeps_its_long_prefill(
        h: Harness) -> None:
    a, b = h.admit("a"), h.admit("b")
    b.routable = False
    h.generate("long", tokens=400)
    b.routable = True
    quiet(h, a, b)
    silent(h, [b], 0.45)
    assert state_of(a) == SUSPECT and a.inflight == 1
    # Its loop was starved for 400 ms, and its engine moved on meanwhile.
    h.event("a", TOPIC_HEARTBEAT, Heartbeat("a", 999, 1, loop_lag_s=0.4))
    assert a.alive and counter(h.router.metrics.worker_recoveries) == 1
    quiet(h, a, b, seconds=2.0)
    assert h.router.accounting.requests["long"].worker is a
    assert cancelled_ids(a) == [] and generated_ids(b) == []
    assert counter(h.router.metrics.migrations, "hang") == 0


@scenario(router_mode="round-robin", long_prefill_tokens=64)
async def test_a_new_incarnation_hands_the_held_requests_on(h: Harness) -> None:
    a = h.admit("a")
    h.generate("long", tokens=400)
    quiet(h, a, seconds=1.0)
    silent(h, [], 0.45)
    assert state_of(a) == SUSPECT and a.inflight == 1
    # It froze past a second and came back as a new process: it dropped what it ran.
    new = h.admit("a", started=2.0)
    h.router.streams.retry()
    assert h.router.accounting.requests["long"].worker is new
    assert generated_ids(new) == ["long"]
    assert counter(h.router.metrics.migrations, "hang") == 1
