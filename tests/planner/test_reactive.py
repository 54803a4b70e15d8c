"""The reactive rule on the mocker's step-time model: add when every worker is over target,
remove only when the rest would stay well under."""

from __future__ import annotations

import pytest

from services.planner.reactive import (
    Corrections,
    WorkerLoad,
    predicted_latency,
    pressure,
    reactive_step,
)
from services.planner.replica_planner import EngineLimits, Slo
from tests.planner.test_replica_planner import mocker_model

SLO = Slo(ttft_ms=500.0, itl_ms=50.0)
LIMITS = EngineLimits(max_step_tokens=8192, kv_total_blocks=16384)
NONE = Corrections()


def load(prefill: float = 0, running: float = 0, kv: float = 0) -> WorkerLoad:
    return WorkerLoad(prefill, running, kv, LIMITS.kv_total_blocks)


def test_latency_grows_with_queued_prompts_and_running_sequences() -> None:
    model = mocker_model()
    idle_ttft, idle_itl = predicted_latency(model, load(), 1000, LIMITS, NONE)
    busy_ttft, _ = predicted_latency(model, load(prefill=30000), 1000, LIMITS, NONE)
    _, busy_itl = predicted_latency(model, load(running=200, kv=12000), 1000, LIMITS, NONE)
    assert idle_ttft < busy_ttft and idle_itl < busy_itl
    # 31,000 tokens at 8,192 per step: four steps before the first token.
    assert busy_ttft == pytest.approx(3 * model.step_ms(8192, 0, 0) + model.step_ms(
        31000 - 3 * 8192, 0, 0))
    slow_ttft, slow_itl = predicted_latency(model, load(), 1000, LIMITS, Corrections(2.0, 3.0))
    assert slow_ttft == pytest.approx(2 * idle_ttft) and slow_itl == pytest.approx(3 * idle_itl)


def test_add_only_when_every_worker_is_over_target() -> None:
    model = mocker_model()
    hot = load(prefill=60000, running=200, kv=14000)
    assert pressure(model, hot, 1000, LIMITS, SLO, NONE) > 1
    step, least = reactive_step(model, [hot, hot], 1000, LIMITS, SLO, NONE, margin=0.5)
    assert step == 1 and least > 1
    step, least = reactive_step(model, [hot, load(running=4, kv=100)], 1000, LIMITS, SLO, NONE,
                                margin=0.5)
    assert step == 0 and least < 1, "one worker still has room: the router can use it"


def test_remove_only_when_the_rest_stay_well_under() -> None:
    model = mocker_model()
    quiet = load(running=2, kv=50)
    assert reactive_step(model, [quiet] * 3, 1000, LIMITS, SLO, NONE, margin=0.5)[0] == -1
    # Moderately loaded: under target now, but not by the margin once shared by one fewer.
    busy = load(running=100, kv=8000)
    assert pressure(model, busy, 1000, LIMITS, SLO, NONE) < 1
    assert reactive_step(model, [busy] * 3, 1000, LIMITS, SLO, NONE, margin=0.5)[0] == 0
    assert reactive_step(model, [quiet], 1000, LIMITS, SLO, NONE, margin=0.5)[0] == 0, \
        "the last worker is never removed by the reactive rule"
    assert reactive_step(model, [], 1000, LIMITS, SLO, NONE, margin=0.5)[0] == 0



def test_prefill_workers_are_judged_by_ttft_and_decode_workers_by_itl() -> None:
    model = mocker_model()
    tight = Slo(ttft_ms=500.0, itl_ms=20.0)
    decoding = load(running=250, kv=15000)  # a full batch, nothing queued to prefill
    ttft, itl = predicted_latency(model, decoding, 1000, LIMITS, NONE)
    assert itl > tight.itl_ms and ttft < tight.ttft_ms
    assert pressure(model, decoding, 1000, LIMITS, tight, NONE, "decode") == itl / tight.itl_ms
    assert pressure(model, decoding, 1000, LIMITS, tight, NONE, "prefill") == ttft / tight.ttft_ms
    assert pressure(model, decoding, 1000, LIMITS, tight, NONE, "aggregated") == itl / tight.itl_ms
    # Busy decoding says nothing about prefill capacity: only the decode pool grows.
    assert reactive_step(model, [decoding] * 2, 1000, LIMITS, tight, NONE, 0.5, "decode")[0] == 1
    assert reactive_step(model, [decoding] * 2, 1000, LIMITS, tight, NONE, 0.5, "prefill")[0] != 1
