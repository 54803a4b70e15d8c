"""The ITL miss budget (the share of streamed gaps that may be stretched to cut the TTFT tail)
and the TTFT tail it is spent on."""

from __future__ import annotations

import math

import pytest

from services.router.itl_budget import ItlMissBudget, TtftTail
from tests.router.fakes import FakeClock


def test_stretched_gaps_stay_within_their_share_of_streamed_gaps() -> None:
    clock = FakeClock()
    budget = ItlMissBudget(0.01, half_life_s=10.0, clock=clock)
    assert not budget.room()  # nothing admitted: nothing to spend
    for _ in range(10):
        assert budget.admitted(101) == 100  # under the prior's 256: its max_tokens
    assert budget.allowance() == pytest.approx(10.0)
    budget.spend(8)
    assert budget.room() and budget.fill() == pytest.approx(0.8)
    budget.spend(2)
    assert not budget.room()  # spent to the gap
    clock.advance(10.0)  # one half-life: both halve, the share is what it was
    assert not budget.room()
    assert budget.stretched == pytest.approx(5.0) and budget.streamed == pytest.approx(500.0)
    budget.admitted(101)  # more requests: room again
    assert budget.room()


def test_one_decision_may_draw_ahead_of_the_budget() -> None:
    """A local prefill stretches every stream on its decode worker at once: right after a
    start the share of the few gaps admitted is less than that, and a budget that waited for
    it could never pay for the first burst. One decision may overdraw it; the next waits until
    the window has earned that back."""
    clock = FakeClock()
    budget = ItlMissBudget(0.01, half_life_s=30.0, clock=clock)
    budget.admitted(301)  # 300 gaps: 3 may stretch
    assert budget.room()
    budget.spend(10)  # a local prefill beside ten streams
    assert not budget.room()
    for _ in range(6):
        budget.admitted(101)  # 600 more: 9 in all, still overdrawn
    assert not budget.room()
    budget.admitted(201)
    assert budget.room()


def test_gaps_count_from_admission_and_are_set_right_at_the_end() -> None:
    """A request counts the gaps it is expected to stream when it is placed (so a router that
    has just started can spend), and its real ones once it ends; the finished lengths teach
    what a request without a useful max_tokens is expected to stream."""
    budget = ItlMissBudget(0.01, clock=FakeClock())  # no decay between the steps
    counted = budget.admitted(100_000)  # a chat request's default: the room left in context
    assert counted == ItlMissBudget.PRIOR_OUTPUT_TOKENS - 1
    budget.finished(counted, 41)  # it stopped at EOS after 41 tokens: 40 gaps
    assert budget.streamed == pytest.approx(40.0)
    assert budget.mean_output == 41.0
    assert budget.admitted(100_000) == 40  # the learnt mean now
    assert budget.admitted(10) == 9  # a smaller max_tokens bounds it
    budget.finished(9, 0)  # cancelled before its first token: none of its gaps happened
    assert budget.streamed == pytest.approx(80.0)
    assert budget.mean_output == pytest.approx(20.5)  # the first ones: their plain mean


def test_one_short_request_does_not_stand_for_the_next_ones() -> None:
    """A health probe of two tokens finishes first: the requests after it stream 150 each,
    and the expected output follows them at once (a plain mean of the first 32), then decays
    with each one's weight 1/32."""
    budget = ItlMissBudget(0.01, clock=FakeClock())
    budget.finished(budget.admitted(2), 2)
    for _ in range(4):
        budget.finished(budget.admitted(150), 150)
    assert budget.mean_output == pytest.approx((2 + 4 * 150) / 5)
    for _ in range(100):
        budget.finished(budget.admitted(150), 150)
    assert budget.mean_output == pytest.approx(150.0, abs=1.0)
    budget.finished(budget.admitted(1000), 1000)
    assert budget.mean_output == pytest.approx(150.0 + 850 / 32, abs=1.0)


def test_a_zero_budget_never_has_room() -> None:
    budget = ItlMissBudget(0.0)
    budget.admitted(10**6)
    assert not budget.room()
    with pytest.raises(ValueError, match="budget"):
        ItlMissBudget(1.0)


def test_the_ttft_tail_is_the_recent_quantile() -> None:
    tail = TtftTail(0.9, window=100)
    for ms in range(tail.min_samples - 1):
        tail.observe(float(ms))
    assert tail.bound_ms() == math.inf  # no tail known yet: nothing is in it
    assert tail.bound_ms(unknown=0.0) == 0.0  # ... or anything may be
    for ms in range(tail.min_samples - 1, 100):
        tail.observe(float(ms))  # 0..99 ms
    assert tail.bound_ms() == 90.0
    # A budget half spent keeps what is left for the slowest: the quantile moves halfway to 1.
    assert tail.bound_ms(fill=0.5) == 95.0 and tail.bound_ms(fill=1.0) == 99.0
    for _ in range(100):  # the window forgets: a slower fleet moves the bound
        tail.observe(500.0)
    assert tail.bound_ms() == 500.0
    with pytest.raises(ValueError, match="quantile"):
        TtftTail(1.0)
