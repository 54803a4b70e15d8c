"""The router's cost model: fitted online from forward-pass records, with a prior before data."""

from __future__ import annotations

import math
import random

import pytest

from common.messages import ForwardPass
from services.router.cost_model import (
    DECODE_SAMPLE,
    DEFAULT_PRIOR,
    CostModels,
    RouteCost,
    StepCoefficients,
    StepCostModel,
    WorkerLoad,
)

# An engine unlike the prior: slower prefill with a stronger quadratic, decode growing with the
# batch, and a 4,096-token step budget.
TRUE = StepCoefficients(a=2e-6, b=0.03, c=5.0, e=8.0, f=0.05, g=20.0, h=0.0)
TOTAL_BLOCKS = 1000


def record(prefill: int, decode: int, used: int, coef: StepCoefficients = TRUE,
           noise: float = 0.0, rng: random.Random | None = None) -> ForwardPass:
    ms = coef.prefill_ms(prefill) + coef.decode_ms(decode, used / TOTAL_BLOCKS)
    if noise and rng is not None:
        ms *= 1.0 + rng.gauss(0.0, noise)
    return ForwardPass(step=0, batch_size=1, prefill_tokens=prefill, decode_tokens=decode,
                       duration_ms=ms, kv_used_blocks=used)


def engine_steps(n: int, seed: int = 1, noise: float = 0.0,
                 coef: StepCoefficients = TRUE) -> list[ForwardPass]:
    """Steps of a busy engine: prefill chunks of every size up to its 4,096 budget, decode
    batches, mixed steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        used = rng.randrange(0, TOTAL_BLOCKS)
        if kind < 0.3:
            out.append(record(rng.randrange(1, 4097), 0, used, coef, noise, rng))
        elif kind < 0.6:
            out.append(record(0, rng.randrange(1, 129), used, coef, noise, rng))
        else:
            decode = rng.randrange(1, 65)
            out.append(record(rng.randrange(1, 4097 - decode), decode, used, coef, noise, rng))
    return out


def test_the_prior_answers_before_any_record() -> None:
    m = StepCostModel()
    assert m.coefficients == DEFAULT_PRIOR
    assert m.chunk_tokens == 8192
    assert m.prefill_ms(1000) == pytest.approx(DEFAULT_PRIOR.prefill_ms(1000))
    assert m.ttft_ms(0, 1000) == pytest.approx(DEFAULT_PRIOR.prefill_ms(1000))


def test_fit_recovers_an_engine_unlike_the_prior() -> None:
    m = StepCostModel()
    m.observe_all(engine_steps(2000), TOTAL_BLOCKS)
    assert m.prefill_ms(100) == pytest.approx(TRUE.prefill_ms(100), rel=0.05)
    for t in (1000, 4000):
        assert m.prefill_ms(t) == pytest.approx(TRUE.prefill_ms(t), rel=0.01)
    for n, u in ((1, 0.1), (64, 0.5), (128, 0.9)):
        assert m.decode_ms(n, u) == pytest.approx(TRUE.decode_ms(n, u), rel=0.02)
    assert 4000 < m.chunk_tokens <= 4096  # the largest step seen: about the engine's budget


def test_fit_tolerates_noise() -> None:
    m = StepCostModel()
    m.observe_all(engine_steps(3000, noise=0.1), TOTAL_BLOCKS)
    assert m.prefill_ms(4000) == pytest.approx(TRUE.prefill_ms(4000), rel=0.05)
    assert m.decode_ms(64, 0.5) == pytest.approx(TRUE.decode_ms(64, 0.5), rel=0.05)


def test_where_records_say_nothing_the_prior_answers() -> None:
    decode_only = StepCostModel()
    decode_only.observe_all([record(0, n, n * 5) for n in range(1, 200)], TOTAL_BLOCKS)
    assert decode_only.decode_ms(64, 0.32) == pytest.approx(TRUE.decode_ms(64, 0.32), rel=0.01)
    for t in (100, 8192):
        assert decode_only.prefill_ms(t) == pytest.approx(DEFAULT_PRIOR.prefill_ms(t), rel=1e-6)
    prefill_only = StepCostModel()
    prefill_only.observe_all([record(t, 0, 0) for t in range(100, 4000, 20)], TOTAL_BLOCKS)
    assert prefill_only.prefill_ms(2000) == pytest.approx(TRUE.prefill_ms(2000), rel=0.02)
    assert prefill_only.decode_ms(64, 0.5) == pytest.approx(DEFAULT_PRIOR.decode_ms(64, 0.5),
                                                            rel=1e-6)


def test_a_few_short_steps_teach_short_prefills() -> None:
    m = StepCostModel()
    m.observe_all([record(t, 0, 0) for t in range(16, 200)], TOTAL_BLOCKS)
    assert m.prefill_ms(150) == pytest.approx(TRUE.prefill_ms(150), rel=0.05)


def test_old_records_are_forgotten() -> None:
    """The engine behind a model name changes (a redeploy on other hardware): the fit follows
    within a few half-lives."""
    m = StepCostModel(half_life_steps=200)
    m.observe_all(engine_steps(1000, seed=1, coef=DEFAULT_PRIOR), TOTAL_BLOCKS)
    assert m.prefill_ms(4000) == pytest.approx(DEFAULT_PRIOR.prefill_ms(4000), rel=0.01)
    m.observe_all(engine_steps(2000, seed=2), TOTAL_BLOCKS)
    assert m.prefill_ms(4000) == pytest.approx(TRUE.prefill_ms(4000), rel=0.02)


def test_negative_curvature_is_refitted_at_zero() -> None:
    """Prefill steps whose time flattens with size (a linear-looking engine with noise at the
    top) must not yield a cost that falls with more tokens."""
    concave = [ForwardPass(0, 1, t, 0, 10.0 + 0.02 * t - 2e-6 * t * t, 0)
               for t in range(64, 4097, 64)] * 4
    m = StepCostModel(prior_weight=1e-6)
    m.observe_all(concave, TOTAL_BLOCKS)
    c = m.coefficients
    assert c.a == 0.0
    assert all(m.prefill_ms(t + 256) > m.prefill_ms(t) for t in range(0, 8192, 256))


def test_a_falling_slope_is_refitted_at_zero_and_a_cached_prefix_wins() -> None:
    """A few noisy steps of a CPU engine where short prefills happened to run slowest (Python
    overhead on a busy host) must not yield a cost that falls with more tokens: such a fit sent
    a repeated prompt away from the worker caching it."""
    noisy = [ForwardPass(0, 1, t, 0, ms, 0)
             for t, ms in ((11, 300.0), (37, 320.0), (8, 290.0), (1317, 35.0), (1317, 40.0))]
    m = StepCostModel(prior_weight=0.25)
    m.observe_all(noisy, TOTAL_BLOCKS)
    c = m.coefficients
    assert c.a >= 0.0 and c.b >= 0.0
    assert all(m.prefill_ms(t + 64) >= m.prefill_ms(t) for t in range(0, 4096, 64))
    route = RouteCost(m)
    idle = WorkerLoad(0.0, 0.0, 0.0)
    cached, cold = route.quote([idle, idle], [37, 1317]).costs
    assert cached <= cold


def test_decode_steps_are_sampled_and_weighted_as_the_steps_they_stand_for() -> None:
    """One decode-only step in DECODE_SAMPLE is fitted (they come one per token); the fit
    still recovers the engine, and every step is counted."""
    m = StepCostModel(prior_weight=1e-6)
    m.observe_all([record(0, 8, 100)] * (DECODE_SAMPLE - 1), TOTAL_BLOCKS)
    assert m.coefficients == DEFAULT_PRIOR and m.decode_records == DECODE_SAMPLE - 1
    m.observe(record(0, 8, 100), TOTAL_BLOCKS)
    assert m.coefficients != DEFAULT_PRIOR
    m.observe_all(engine_steps(4000, seed=3), TOTAL_BLOCKS)
    assert m.decode_ms(32, 0.4) == pytest.approx(TRUE.decode_ms(32, 0.4), rel=0.02)


def test_idle_and_empty_steps_are_ignored() -> None:
    m = StepCostModel()
    m.observe(ForwardPass(1, 0, 0, 0, 3.0, 0), TOTAL_BLOCKS)
    m.observe(ForwardPass(2, 1, 100, 0, 0.0, 0), TOTAL_BLOCKS)
    assert m.records == 0
    assert m.coefficients == DEFAULT_PRIOR


def test_ttft_of_a_long_prompt_counts_chunks() -> None:
    """40,000 uncached tokens under an 8,192 budget: four full chunks and the rest, each step
    paying its own fixed cost, which is what makes a long miss expensive."""
    m = StepCostModel()
    p = DEFAULT_PRIOR.prefill_ms
    assert m.ttft_ms(0, 40_000) == pytest.approx(4 * p(8192) + p(40_000 - 4 * 8192))
    # Queued prefill goes first: the same tokens, whoever owns them.
    assert m.ttft_ms(30_000, 10_000) == pytest.approx(m.ttft_ms(0, 40_000))


def test_ttft_adds_a_decode_pass_per_step_and_decodes_share_the_budget() -> None:
    m = StepCostModel()
    d = DEFAULT_PRIOR.decode_ms(192, 0.5)
    p = DEFAULT_PRIOR.prefill_ms
    steps = math.ceil(20_000 / (8192 - 192))
    rest = 20_000 - (steps - 1) * (8192 - 192)
    assert m.ttft_ms(0, 20_000, decoding=192, kv_usage=0.5) == pytest.approx(
        (steps - 1) * p(8000) + p(rest) + steps * d)


def test_ttft_is_monotone_in_every_load() -> None:
    m = StepCostModel()
    m.observe_all(engine_steps(500), TOTAL_BLOCKS)
    base = m.ttft_ms(5000, 3000, decoding=10, kv_usage=0.3)
    assert m.ttft_ms(6000, 3000, decoding=10, kv_usage=0.3) > base
    assert m.ttft_ms(5000, 4000, decoding=10, kv_usage=0.3) > base
    assert m.ttft_ms(5000, 3000, decoding=40, kv_usage=0.3) > base
    assert m.ttft_ms(5000, 3000, decoding=10, kv_usage=0.6) > base
    assert m.ttft_ms(0, 0) == 0.0


def test_a_cached_prefix_saves_more_than_its_share_of_queue() -> None:
    """The trade-off the router makes: worker A holds 30k of a 32k prompt but has 8k queued;
    B is idle with nothing cached. A is cheaper; with 60k queued on A, B is."""
    m = StepCostModel()
    assert m.ttft_ms(8_000, 2_000) < m.ttft_ms(0, 32_000)
    assert m.ttft_ms(60_000, 2_000) > m.ttft_ms(0, 32_000)


def test_cost_models_are_per_model() -> None:
    models = CostModels(half_life_steps=100)
    models.get("big").steps.observe_all(engine_steps(300), TOTAL_BLOCKS)
    assert models.get("big").steps.records == 300
    assert models.get("small").steps.records == 0
    assert models.get("small").steps.coefficients == DEFAULT_PRIOR
    assert models.get("big") is models.get("big")


IDLE = WorkerLoad(0, 0, 0.0)


def test_an_idle_fleet_routes_on_ttft_alone() -> None:
    """No queues anywhere: pressure 0, and a worker holding most of the prompt but with a long
    queue loses to an idle one when its queue costs more than the prefix saves."""
    route = RouteCost(StepCostModel())
    for _ in range(100):
        route.observe(route.quote([IDLE, IDLE], [5000, 5000]))
    assert route.pressure == 0.0
    cached_busy = WorkerLoad(60_000, 0, 0.0)
    costs = route.quote([cached_busy, IDLE], [2_000, 32_000]).costs
    steps = route.steps
    assert costs == [steps.ttft_ms(60_000, 2_000), steps.ttft_ms(0, 32_000)]
    assert costs[1] < costs[0]


def test_queues_make_the_fleet_prefer_less_work() -> None:
    """With every worker queueing about a request's worth of work, pressure rises towards the
    wait/work ratio, and the same choice now goes to the worker that holds the prefix: sending
    32k uncached tokens elsewhere would delay everything queued behind them."""
    route = RouteCost(StepCostModel(), smoothing_decisions=16)
    busy = WorkerLoad(40_000, 0, 0.0)
    for _ in range(200):
        route.observe(route.quote([busy, busy, busy, busy], [20_000, 20_000, 20_000, 20_000]))
    steps = route.steps
    assert route.pressure == pytest.approx(steps.ttft_ms(40_000, 0) / steps.ttft_ms(0, 20_000))
    assert route.pressure > 1
    cached_busy = WorkerLoad(60_000, 0, 0.0)
    costs = route.quote([cached_busy, IDLE], [2_000, 32_000]).costs
    assert costs[0] < costs[1]
    # ... and when the queues drain, pressure falls back and the idle worker wins again.
    for _ in range(200):
        route.observe(route.quote([IDLE, IDLE, IDLE, IDLE], [20_000, 20_000, 20_000, 20_000]))
    assert route.pressure < 0.01
    costs = route.quote([cached_busy, IDLE], [2_000, 32_000]).costs
    assert costs[1] < costs[0]


def test_a_quote_changes_nothing_until_observed() -> None:
    route = RouteCost(StepCostModel())
    busy = WorkerLoad(40_000, 0, 0.0)
    quote = route.quote([busy, busy], [20_000, 20_000])
    assert route.quote([busy, busy], [20_000, 20_000]) == quote
    assert (route.decisions, route.pressure) == (0, 0.0)
    route.observe(quote)
    assert route.decisions == 1 and route.pressure > 1
    assert route.quote([busy, busy], [20_000, 20_000]) != quote


def test_route_costs_need_a_load_per_candidate() -> None:
    route = RouteCost(StepCostModel())
    with pytest.raises(ValueError, match="2 loads for 1 candidates"):
        route.quote([IDLE, IDLE], [100])
    route.observe(route.quote([], []))
    assert route.decisions == 0


@pytest.mark.parametrize("kwargs", [{"prior_weight": 0}, {"half_life_steps": 0},
                                    {"chunk_tokens_prior": 0}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        StepCostModel(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CostModels(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="smoothing_decisions"):
        CostModels(smoothing_decisions=0.5)
