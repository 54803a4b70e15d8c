"""Replica math: load and SLOs in, clamped and damped replica counts out."""

from __future__ import annotations

import math

import pytest

from services.planner.performance_model import PerformanceModel
from services.planner.replica_planner import (
    ROLE_AGGREGATED,
    ROLE_DECODE,
    ROLE_PREFILL,
    EngineLimits,
    LoadForecast,
    ReplicaPlanner,
    Slo,
    aggregated_rate,
    decode_capacity,
    prefill_capacity,
    queued_ttft,
)
from services.worker.engines.mocker import timing

SLO = Slo(ttft_ms=500.0, itl_ms=50.0)


def mocker_model() -> PerformanceModel:
    model = PerformanceModel()
    model.profile_prefill = (4.209989e-7, 0.01518344, 16.50142)
    model.profile_decode = (5.74, 0.0, 54.01, -25.74)
    model.fit()
    assert model.ready
    return model


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def planner(clock: Clock | None = None, **kw: object) -> ReplicaPlanner:
    args: dict[str, object] = {"min_replicas": 1, "max_replicas": 64,
                               "scale_down_cooldown_s": 60.0}
    args.update(kw)
    return ReplicaPlanner(SLO, EngineLimits(), clock=clock or Clock(), **args)  # type: ignore[arg-type]


def test_capacities_follow_the_model_and_the_slos() -> None:
    model = mocker_model()
    limits = EngineLimits()
    cap = prefill_capacity(model, 2000, SLO.ttft_ms, 1.0, limits)
    # Every step up to the 8192-token budget fits 500 ms; throughput t / (a·t² + b·t + c)
    # peaks at t = sqrt(c / a) ≈ 6261 tokens per step.
    peak = math.sqrt(16.50142 / 4.209989e-7)
    assert cap.attainable and cap.operating_point == pytest.approx(peak, rel=0.05)
    assert cap.tokens_per_s >= 8192 / timing.prefill_ms(8192) * 1000
    assert cap.tokens_per_s == pytest.approx(peak / timing.prefill_ms(peak) * 1000, rel=1e-3)
    tight = prefill_capacity(model, 2000, 100.0, 1.0, limits)
    assert tight.attainable and timing.prefill_ms(tight.operating_point) <= 100.0
    assert tight.tokens_per_s < cap.tokens_per_s
    dec = decode_capacity(model, 2000, 200, SLO.itl_ms, 1.0, limits)
    assert dec.attainable and dec.operating_point == 256  # batch-limited, not ITL-limited
    ctx = math.ceil(2100 / 64)
    assert dec.step_ms == pytest.approx(timing.decode_ms(256 * ctx / 16384))
    # Long sequences: the KV pool, not the batch limit, bounds the batch.
    kv_bound = decode_capacity(model, 30000, 2000, SLO.itl_ms, 1.0, limits)
    assert kv_bound.operating_point == int(0.9 * 16384 // math.ceil(31000 / 64))


def test_unattainable_slo_is_reported() -> None:
    model = mocker_model()
    dec = decode_capacity(model, 100, 100, 1.0, 1.0, EngineLimits())  # < 5.74 ms minimum
    assert not dec.attainable and dec.operating_point == 1
    pre = prefill_capacity(model, 4000, 10.0, 1.0, EngineLimits())
    assert not pre.attainable and pre.operating_point == pytest.approx(4000)


def test_more_load_needs_more_replicas() -> None:
    model = mocker_model()
    p = planner()
    counts = [math.ceil(p.needs(LoadForecast(rate, 2000, 200), model).needs[ROLE_AGGREGATED])
              for rate in (0.5, 5, 20, 50, 100, 200)]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] > 10, counts
    longer = p.needs(LoadForecast(20, 2000, 2000), model).needs[ROLE_AGGREGATED]
    assert longer > p.needs(LoadForecast(20, 2000, 200), model).needs[ROLE_AGGREGATED]


def test_disaggregated_splits_prefill_from_decode() -> None:
    model = mocker_model()
    p = planner(disaggregated=True)
    assert p.roles == [ROLE_PREFILL, ROLE_DECODE]
    prompt_heavy = p.needs(LoadForecast(50, 8000, 50), model).needs
    output_heavy = p.needs(LoadForecast(50, 200, 2000), model).needs
    assert prompt_heavy[ROLE_PREFILL] > prompt_heavy[ROLE_DECODE]
    assert output_heavy[ROLE_DECODE] > output_heavy[ROLE_PREFILL]
    assert output_heavy[ROLE_DECODE] == pytest.approx(
        50 * 2000 / decode_capacity(model, 200, 2000, 50.0, 1.0, EngineLimits()).tokens_per_s)


def test_slo_violations_add_replicas() -> None:
    model = mocker_model()
    load = LoadForecast(50, 2000, 500)
    base = planner().needs(load, model).needs[ROLE_AGGREGATED]
    slow_itl = planner()
    slow_itl.correct(None, None, observed_itl_ms=60.0, model_itl_ms=20.0)  # 3x the model
    assert slow_itl.itl_correction.factor == pytest.approx(3.0)
    assert slow_itl.needs(load, model).needs[ROLE_AGGREGATED] > base * 1.5
    slow_ttft = planner()
    slow_ttft.correct(observed_ttft_ms=400.0, model_ttft_ms=100.0, observed_itl_ms=None,
                      model_itl_ms=None)
    assert slow_ttft.needs(load, model).needs[ROLE_AGGREGATED] > base * 1.5
    # Faster than the model (e.g. a speed-up ratio): fewer.
    fast = planner()
    fast.correct(10.0, 100.0, 2.0, 20.0)
    assert fast.needs(load, model).needs[ROLE_AGGREGATED] < base / 5


def test_correction_is_smoothed() -> None:
    p = planner()
    p.correct(None, None, 20.0, 20.0)
    p.correct(None, None, 60.0, 20.0)
    assert 1.0 < p.itl_correction.factor < 3.0


def test_targets_are_clamped() -> None:
    p = planner(min_replicas=2, max_replicas=5)
    assert p.decide(ROLE_AGGREGATED, 100.0, current=2) == 5
    assert p.decide(ROLE_AGGREGATED, None, current=1) == 2, "no estimate still honours the floor"
    assert p.decide(ROLE_AGGREGATED, 3.2, current=5) == 5, "down waits for the cooldown"
    assert planner(max_replicas=3).decide(ROLE_AGGREGATED, None, current=6) == 3


def test_scale_up_is_immediate_and_scale_down_waits_for_the_cooldown() -> None:
    clock = Clock()
    p = planner(clock)
    assert p.decide(ROLE_AGGREGATED, 3.5, current=1) == 4
    clock.now += 10
    assert p.decide(ROLE_AGGREGATED, 1.0, current=4) == 4
    clock.now += 30
    assert p.decide(ROLE_AGGREGATED, 1.0, current=4) == 4
    clock.now += 25  # 65 s after the scale-up, but a 4 was recommended 65 s ago: now it's gone
    assert p.decide(ROLE_AGGREGATED, 1.0, current=4) == 1


def test_cooldown_prevents_flapping() -> None:
    clock = Clock()
    p = planner(clock)
    current = p.decide(ROLE_AGGREGATED, 4.0, current=4)
    targets = []
    for i in range(30):  # load alternating high and low every 10 s for 5 minutes
        clock.now += 10
        current = p.decide(ROLE_AGGREGATED, 4.0 if i % 2 else 1.0, current)
        targets.append(current)
    assert targets == [4] * 30
    for _ in range(7):  # then a sustained lull
        clock.now += 10
        current = p.decide(ROLE_AGGREGATED, 1.5, current)
    assert current == 2


def test_scale_down_goes_to_the_highest_recent_recommendation() -> None:
    clock = Clock()
    p = planner(clock, scale_down_cooldown_s=30.0)
    clock.now -= 5
    for need in (6.0, 3.0, 2.0):  # 5, 15 and 25 s in, within the first cooldown: held
        clock.now += 10
        assert p.decide(ROLE_AGGREGATED, need, current=8) == 8
    clock.now += 11
    # 36 s in: the 6 has left the 30 s window, the 3 has not.
    assert p.decide(ROLE_AGGREGATED, 2.0, current=8) == 3


def test_a_scale_down_does_not_restart_the_cooldown() -> None:
    """A falling load steps the fleet down as its recommendations leave the window, not one
    step per cooldown."""
    clock = Clock()
    p = planner(clock, scale_down_cooldown_s=10.0)
    assert p.decide(ROLE_AGGREGATED, 4.0, current=1) == 4
    clock.now += 5
    assert p.decide(ROLE_AGGREGATED, 3.0, current=4) == 4, "within the cooldown"
    clock.now += 6
    assert p.decide(ROLE_AGGREGATED, 1.0, current=4) == 3, "the 3 of 6 s ago is in the window"
    clock.now += 5
    assert p.decide(ROLE_AGGREGATED, 1.0, current=3) == 1, "the 3 has left it"


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        planner(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        planner(min_replicas=0, max_replicas=0)


def test_a_hand_made_or_reactive_change_restarts_the_cooldown() -> None:
    clock = Clock()
    p = planner(clock, scale_down_cooldown_s=30.0)
    clock.now += 100  # long after start: a scale-down would be allowed
    assert p.may_scale_down(ROLE_AGGREGATED, 1)
    p.note_change(ROLE_AGGREGATED, 6)  # someone scaled to 6
    assert not p.may_scale_down(ROLE_AGGREGATED, 5)
    assert p.decide(ROLE_AGGREGATED, 2.0, current=6) == 6, "adopted, not reverted at once"
    clock.now += 31
    assert p.may_scale_down(ROLE_AGGREGATED, 5)
    assert p.decide(ROLE_AGGREGATED, 2.0, current=6) == 2
    assert not planner(min_replicas=2).may_scale_down(ROLE_AGGREGATED, 1), "never below min"


def test_propose_does_not_start_a_cooldown_until_committed() -> None:
    clock = Clock()
    p = planner(clock, scale_down_cooldown_s=30.0)
    clock.now += 100
    assert p.propose(ROLE_AGGREGATED, 5.0, current=2) == 5
    p.commit(ROLE_AGGREGATED, 2, 2)  # something cut the proposal: nothing changed
    clock.now += 31  # the 5 has left the window
    assert p.propose(ROLE_AGGREGATED, 1.0, current=2) == 1


def test_gpu_budget_caps_one_role() -> None:
    p = planner(max_gpus=7, gpus_per_worker={ROLE_AGGREGATED: 2})
    assert p.fit_budget({ROLE_AGGREGATED: 2}) == {ROLE_AGGREGATED: 2}
    assert p.fit_budget({ROLE_AGGREGATED: 9}) == {ROLE_AGGREGATED: 3}  # 6 of 7 GPUs
    assert p.fits_budget({ROLE_AGGREGATED: 3}) and not p.fits_budget({ROLE_AGGREGATED: 4})
    assert planner().fit_budget({ROLE_AGGREGATED: 60}) == {ROLE_AGGREGATED: 60}, "0: no budget"


def test_gpu_budget_shares_out_between_roles_in_proportion() -> None:
    p = planner(disaggregated=True, max_gpus=16,
                gpus_per_worker={ROLE_PREFILL: 2, ROLE_DECODE: 4})
    assert p.fit_budget({ROLE_PREFILL: 2, ROLE_DECODE: 3}) == {ROLE_PREFILL: 2, ROLE_DECODE: 3}
    fitted = p.fit_budget({ROLE_PREFILL: 6, ROLE_DECODE: 6})  # 36 GPUs asked of 16
    assert p.gpus(fitted) <= 16 and p.gpus(fitted) >= 16 - 2
    assert fitted[ROLE_PREFILL] >= 2 and fitted[ROLE_DECODE] >= 2, fitted
    floors = planner(disaggregated=True, max_gpus=3, min_replicas=1)
    fitted = floors.fit_budget({ROLE_PREFILL: 10, ROLE_DECODE: 1})
    assert fitted[ROLE_DECODE] == 1 and floors.gpus(fitted) == 3, fitted


def test_a_budget_that_cannot_hold_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        planner(min_replicas=2, max_gpus=3, gpus_per_worker={ROLE_AGGREGATED: 2})
    with pytest.raises(ValueError, match="budget"):
        planner(min_replicas=0, max_gpus=1, gpus_per_worker={ROLE_AGGREGATED: 2})
    with pytest.raises(ValueError, match="at least 1"):
        planner(gpus_per_worker={ROLE_AGGREGATED: 0})


# Slowed-down mockers as in bench/planner.py: a tenth of model speed, 1,024-token chunks.
BENCH_SLO = Slo(ttft_ms=1500.0, itl_ms=150.0)
BENCH = EngineLimits(max_step_tokens=1024, max_batch=16, kv_total_blocks=2048)


def test_aggregated_workers_leave_their_streams_gaps_room_for_prefill() -> None:
    """Each prompt's prefill stretches the gaps of every stream beside it: an aggregated worker
    is planned at the rate whose mean gap, plus one more chunk than average, still fits the ITL
    target, well below the rate that merely keeps it busy."""
    model = mocker_model()
    rate = aggregated_rate(model, 1000, 20, BENCH_SLO, 10.0, 10.0, BENCH)
    prefill = 10.0 * model.prefill_ms(1000)
    busy = rate * prefill / 1000
    assert 0.3 < busy < 0.6, busy
    gap = 10.0 * model.decode_ms(1, 16 / 2048)
    assert gap / (1 - busy) + prefill / 19 <= BENCH_SLO.itl_ms
    assert aggregated_rate(model, 1000, 20, Slo(1500.0, 120.0), 10.0, 10.0, BENCH) < 0.8 * rate
    p = ReplicaPlanner(BENCH_SLO, BENCH, min_replicas=1, max_replicas=8)
    p.correct(None, None, 10.0, 1.0)
    p.ttft_correction.observe(10.0, 1.0)
    needs = p.needs(LoadForecast(5.0, 1000, 20), model)
    shared = 5.0 * 1000 / needs.prefill.tokens_per_s + 5.0 * 20 / needs.decode.tokens_per_s
    assert needs.needs[ROLE_AGGREGATED] == pytest.approx(5.0 / rate)
    assert needs.needs[ROLE_AGGREGATED] > 1.5 * shared
    # Ten times longer answers keep ten times more streams running: the 16-sequence batch,
    # not the gaps, bounds the rate then.
    long = aggregated_rate(model, 1000, 200, BENCH_SLO, 10.0, 10.0, BENCH)
    assert long * 199 * gap / 1000 < 16 < rate * 10 * 199 * gap / 1000
    assert aggregated_rate(model, 1000, 20, Slo(1500.0, 50.0), 10.0, 10.0, BENCH) == 0.0, \
        "a decode step alone misses 50 ms: no rate meets it"


def test_the_ttft_correction_learns_step_times_not_queueing() -> None:
    """Clients' TTFT at a busy worker includes the wait for the prefill queue. The model's TTFT
    at the same per-worker rate includes it too, so the correction settles at the clock ratio
    (here 10) instead of carrying the queue (which would plan the queue twice)."""
    model = mocker_model()
    p = ReplicaPlanner(BENCH_SLO, BENCH, min_replicas=1, max_replicas=8)
    rate = 1.5
    prefill = model.prefill_ms(1000)
    seen = queued_ttft(10 * prefill, 1, 10 * model.decode_ms(1, 0.0), rate * 10 * prefill / 1000)
    assert seen > 10 * (prefill + model.decode_ms(1, 0.0)) * 1.3, "the queue is a good part"
    for _ in range(8):
        model_ttft = p.model_ttft(model, 1000, rate)
        assert model_ttft is not None
        p.correct(seen, model_ttft, None, None)
    assert p.ttft_correction.factor == pytest.approx(10.0, rel=0.01)
    assert p.model_ttft(model, 1000, 1000.0) is None, "an overloaded interval teaches nothing"
