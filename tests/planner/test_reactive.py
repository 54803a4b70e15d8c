"""The reactive rule on the mocker's step-time model: add when every worker is over target,
remove only when the rest would stay well under."""

from __future__ import annotations

import pytest

from services.planner.reactive import (
    Corrections,
    Outlook,
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


def outlook(slo: Slo = SLO, corrections: Corrections = NONE, prompt: float = 1000,
            answer: float = 200, limits: EngineLimits = LIMITS) -> Outlook:
    return Outlook(prompt, answer, limits, slo, corrections)


def load(prefill: float = 0, running: float = 0, kv: float = 0) -> WorkerLoad:
    return WorkerLoad(prefill, running, kv, LIMITS.kv_total_blocks)


def test_latency_grows_with_queued_prompts_and_running_sequences() -> None:
    model = mocker_model()
    idle_ttft, idle_itl = predicted_latency(model, load(), outlook())
    busy_ttft, _ = predicted_latency(model, load(prefill=30000), outlook())
    _, busy_itl = predicted_latency(model, load(running=200, kv=12000), outlook())
    assert idle_ttft < busy_ttft and idle_itl < busy_itl
    # 31,000 tokens at 8,192 per step: four steps before the first token.
    assert busy_ttft == pytest.approx(3 * model.step_ms(8192, 0, 0) + model.step_ms(
        31000 - 3 * 8192, 0, 0))
    slow_ttft, slow_itl = predicted_latency(model, load(),
                                            outlook(corrections=Corrections(2.0, 3.0)))
    assert slow_ttft == pytest.approx(2 * idle_ttft) and slow_itl == pytest.approx(3 * idle_itl)


def test_add_only_when_every_worker_is_over_target() -> None:
    model = mocker_model()
    hot = load(prefill=60000, running=200, kv=14000)
    assert pressure(model, hot, outlook()) > 1
    step, least = reactive_step(model, [hot, hot], outlook(), margin=0.5)
    assert step == 1 and least > 1
    step, least = reactive_step(model, [hot, load(running=4, kv=100)], outlook(),
                                margin=0.5)
    assert step == 0 and least < 1, "one worker still has room: the router can use it"


def test_remove_only_when_the_rest_stay_well_under() -> None:
    model = mocker_model()
    quiet = load(running=2, kv=50)
    assert reactive_step(model, [quiet] * 3, outlook(), margin=0.5)[0] == -1
    # Moderately loaded: under target now, but not by the margin once shared by one fewer.
    busy = load(running=100, kv=8000)
    assert pressure(model, busy, outlook()) < 1
    assert reactive_step(model, [busy] * 3, outlook(), margin=0.5)[0] == 0
    assert reactive_step(model, [quiet], outlook(), margin=0.5)[0] == 0, \
        "the last worker is never removed by the reactive rule"
    assert reactive_step(model, [], outlook(), margin=0.5)[0] == 0



def test_prefill_workers_are_judged_by_ttft_and_decode_workers_by_itl() -> None:
    model = mocker_model()
    tight = Slo(ttft_ms=500.0, itl_ms=20.0)
    decoding = load(running=250, kv=15000)  # a full batch, nothing queued to prefill
    ttft, itl = predicted_latency(model, decoding, outlook(), "decode")
    assert itl > tight.itl_ms and ttft < tight.ttft_ms
    assert pressure(model, decoding, outlook(tight), "decode") == itl / tight.itl_ms
    assert pressure(model, decoding, outlook(tight), "prefill") == ttft / tight.ttft_ms
    # An aggregated worker also prefilled those 250 streams' prompts: more ITL still.
    _, aggregated_itl = predicted_latency(model, decoding, outlook())
    assert aggregated_itl > itl
    assert pressure(model, decoding, outlook(tight), "aggregated") == aggregated_itl / 20.0
    # Busy decoding says nothing about prefill capacity: only the decode pool grows.
    assert reactive_step(model, [decoding] * 2, outlook(tight), 0.5, "decode")[0] == 1
    assert reactive_step(model, [decoding] * 2, outlook(tight), 0.5, "prefill")[0] != 1


# The bench's slowed-down mockers: model time is a tenth of wall time, so corrections near 10.
SLOW = Corrections(ttft=10.0, itl=11.0)
BENCH_SLO = Slo(ttft_ms=1500.0, itl_ms=150.0)
BENCH = EngineLimits(max_step_tokens=1024, max_batch=16, kv_total_blocks=2048)


def test_a_kv_hand_off_on_a_decode_worker_is_one_gap_not_every_gap() -> None:
    """A decode worker with a pulled prompt waiting (its one token still to compute): the next
    step pays a prefill step's fixed cost, over the ITL target on its own, but a stream of 20
    tokens pays it in one gap of 19. The lone decode worker is not over target."""
    model = mocker_model()
    handing_off = WorkerLoad(1, 2, 32, BENCH.kv_total_blocks)
    next_step = outlook(BENCH_SLO, SLOW, answer=2, limits=BENCH)
    assert pressure(model, handing_off, next_step, "decode") > 1
    stream = outlook(BENCH_SLO, SLOW, answer=20, limits=BENCH)
    assert pressure(model, handing_off, stream, "decode") < 0.7
    assert reactive_step(model, [handing_off], stream, 0.5, "decode") == (
        0, pressure(model, handing_off, stream, "decode"))


def test_an_aggregated_workers_prefill_is_spread_over_a_streams_gaps() -> None:
    """One queued prompt and the two running streams' own prompts (by Little's law, as many
    arrive during one stream's life as are running) land between a stream's 20 tokens: one
    chunk in each of three gaps out of 19, not one in every gap."""
    model = mocker_model()
    queued = WorkerLoad(1000, 2, 32, BENCH.kv_total_blocks)
    stream = outlook(BENCH_SLO, SLOW, answer=20, limits=BENCH)
    _, itl = predicted_latency(model, queued, stream)
    assert itl == pytest.approx(11.0 * (model.decode_ms(3, 32 / 2048)
                                        + 3 * model.prefill_ms(1000) / 19))
    assert reactive_step(model, [queued], stream, 0.5)[0] == 0
    # Eight streams running: their prompts' chunks stretch every stream past 150 ms.
    busy = WorkerLoad(0, 8, 128, BENCH.kv_total_blocks)
    assert pressure(model, busy, stream) > 1
    assert pressure(model, busy, stream, "decode") < 0.7, "prompts prefilled elsewhere"
    # So many queued chunks that every gap of the stream carries a full one.
    flooded = WorkerLoad(40 * 1024, 3, 48, BENCH.kv_total_blocks)
    _, itl = predicted_latency(model, flooded, stream)
    assert itl == pytest.approx(11.0 * (model.decode_ms(4, 48 / 2048) + model.prefill_ms(1024)))
    assert reactive_step(model, [flooded], stream, 0.5)[0] == 1
