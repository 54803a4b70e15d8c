"""The ITL miss budget (the share of streamed gaps that may be stretched to cut the TTFT tail)
and the first-token tail it is spent on."""

from __future__ import annotations

import math

import pytest

from services.router.itl_budget import FirstTokenTail, ItlMissBudget
from tests.router.fakes import FakeClock


def test_stretched_gaps_stay_within_their_share_of_streamed_gaps() -> None:
    clock = FakeClock()
    budget = ItlMissBudget(0.01, half_life_s=10.0, clock=clock)
    assert not budget.room(1)  # nothing admitted: nothing to spend
    for _ in range(10):
        assert budget.admitted(101) == 100  # under the prior's 256: its max_tokens
    assert budget.room(10) and not budget.room(11)
    budget.spend(8)
    assert budget.room(1.9) and not budget.room(2.1)
    clock.advance(10.0)  # one half-life: both halve, the share is what it was
    assert budget.room(0.9) and not budget.room(1.1)
    assert budget.stretched == pytest.approx(4.0) and budget.streamed == pytest.approx(500.0)
    for _ in range(5):
        budget.admitted(101)  # more requests: room again
    assert budget.room(5.9) and not budget.room(6.1)


def test_gaps_count_from_admission_and_are_set_right_at_the_end() -> None:
    """A request counts the gaps it is expected to stream when it is placed (so a router that
    has just started can spend), and its real ones once it ends; the finished lengths teach
    what a request without a useful max_tokens is expected to stream."""
    budget = ItlMissBudget(0.01)
    counted = budget.admitted(100_000)  # a chat request's default: the room left in context
    assert counted == ItlMissBudget.PRIOR_OUTPUT_TOKENS - 1
    budget.finished(counted, 41)  # it stopped at EOS after 41 tokens: 40 gaps
    assert budget.streamed == pytest.approx(40.0)
    assert budget.mean_output == 41.0
    assert budget.admitted(100_000) == 40  # the learnt mean now
    assert budget.admitted(10) == 9  # a smaller max_tokens bounds it
    budget.finished(9, 0)  # cancelled before its first token: none of its gaps happened
    assert budget.streamed == pytest.approx(80.0)


def test_a_zero_budget_never_has_room() -> None:
    budget = ItlMissBudget(0.0)
    budget.admitted(10**6)
    assert not budget.room(0.5)
    with pytest.raises(ValueError, match="budget"):
        ItlMissBudget(1.0)


def test_the_first_token_tail_is_the_recent_quantile() -> None:
    tail = FirstTokenTail(0.9, window=100)
    for ms in range(FirstTokenTail.MIN_SAMPLES - 1):
        tail.observe(float(ms))
    assert tail.bound_ms() == math.inf  # no tail known yet
    for ms in range(FirstTokenTail.MIN_SAMPLES - 1, 100):
        tail.observe(float(ms))  # 0..99 ms
    assert tail.bound_ms() == 90.0
    for _ in range(100):  # the window forgets: a slower fleet moves the bound
        tail.observe(500.0)
    assert tail.bound_ms() == 500.0
    with pytest.raises(ValueError, match="quantile"):
        FirstTokenTail(1.0)
