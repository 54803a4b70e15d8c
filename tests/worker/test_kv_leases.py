"""Leases on a finished prefill's KV: released by the decode side, or expired (fake clock), a
pause of their holder not counted."""

from __future__ import annotations

from services.worker.kv_leases import KvLeases
from tests.router.fakes import FakeClock


def test_a_release_ends_a_lease_once() -> None:
    leases = KvLeases(FakeClock())
    leases.hold("r1", 5.0)
    assert "r1" in leases and len(leases) == 1
    assert leases.release("r1") and not leases.release("r1")
    assert len(leases) == 0 and not leases.release("unknown")


def test_leases_expire_on_time_and_only_then() -> None:
    clock = FakeClock()
    leases = KvLeases(clock)
    leases.hold("r1", 1.0)
    leases.hold("r2", 3.0)
    clock.advance(0.999)
    assert leases.expired() == []
    clock.advance(0.001)
    assert leases.expired() == ["r1"]
    assert not leases.release("r1")  # an expired lease is gone: a late release finds nothing
    clock.advance(5)
    assert leases.expired() == ["r2"] and len(leases) == 0


def test_a_pause_of_the_holder_does_not_count_against_its_leases() -> None:
    clock = FakeClock()
    leases = KvLeases(clock)
    leases.hold("r1", 1.0)
    clock.advance(6.0)  # the process did not run: no decode side could have pulled meanwhile
    leases.extend(6.0)
    assert leases.expired() == []
    clock.advance(0.999)
    assert leases.expired() == []
    clock.advance(0.001)
    assert leases.expired() == ["r1"]


def test_leases_are_judged_as_of_the_check_not_of_a_pause_within_it() -> None:
    """The heartbeat tick reads the clock once: a pause that lands after it (SIGSTOP strikes
    anywhere) is the next tick's to forgive, not an expiry now."""
    clock = FakeClock()
    leases = KvLeases(clock)
    leases.hold("r1", 1.0)
    clock.advance(0.5)
    tick = clock()
    clock.advance(6.0)
    assert leases.expired(tick) == []
    assert leases.expired() == ["r1"]
