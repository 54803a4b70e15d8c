"""Stuck starts: a slow ramp is not stuck, a start that makes no progress is, until it does."""

from __future__ import annotations

import pytest

from services.planner.connectors import PoolState
from services.planner.readiness import StartupWatch


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_start_with_no_progress_gets_stuck_once_and_recovers() -> None:
    clock = Clock()
    w = StartupWatch(timeout_s=30, clock=clock)
    assert not w.update("aggregated", PoolState(3, 1))
    clock.now += 29
    assert not w.update("aggregated", PoolState(3, 1))
    clock.now += 2
    assert w.update("aggregated", PoolState(3, 1)) and w.stuck("aggregated")
    clock.now += 100
    assert w.update("aggregated", PoolState(3, 1))
    assert w.timeouts == {"aggregated": 1}, "counted once per episode"
    assert not w.update("aggregated", PoolState(3, 2)), "one became ready: progress"
    clock.now += 31
    assert w.update("aggregated", PoolState(3, 2)), "and then stuck again"
    assert w.timeouts == {"aggregated": 2}
    assert not w.update("aggregated", PoolState(2, 2)), "the unready one scaled away"
    assert not w.stuck("aggregated")


def test_a_long_ramp_that_keeps_progressing_is_never_stuck() -> None:
    clock = Clock()
    w = StartupWatch(timeout_s=30, clock=clock)
    for ready in range(10):
        assert not w.update("decode", PoolState(12, ready))
        clock.now += 25  # each worker takes 25 s: 250 s with workers pending throughout
    assert not w.timeouts


def test_roles_are_judged_apart_and_the_timeout_must_be_positive() -> None:
    clock = Clock()
    w = StartupWatch(timeout_s=10, clock=clock)
    w.update("prefill", PoolState(2, 1))
    w.update("decode", PoolState(2, 2))
    clock.now += 11
    assert w.update("prefill", PoolState(2, 1)) and not w.update("decode", PoolState(2, 2))
    with pytest.raises(ValueError):
        StartupWatch(timeout_s=0)
