"""The mocker's timing model: Dynamo's polynomials, and the loop's sleeps that follow them."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from common.messages import GenerateRequest, SamplingParams
from services.worker.engine import StepOutput
from services.worker.engines.mocker import timing
from services.worker.engines.mocker.config import MockerConfig
from services.worker.engines.mocker.engine import MockerEngine


def test_polynomials() -> None:
    assert timing.prefill_ms(1000) == pytest.approx(0.4209989 + 15.18344 + 16.50142)
    assert timing.decode_ms(0.0) == pytest.approx(5.74)
    assert timing.decode_ms(0.5) == pytest.approx(-6.435 + 27.005 + 5.74)
    assert timing.step_ms(0, 0, 0.3) == 0.0
    assert timing.step_ms(0, 4, 0.0) == pytest.approx(5.74)
    assert timing.step_ms(1000, 4, 0.0) == pytest.approx(timing.prefill_ms(1000) + 5.74)


async def timed_request(speedup: float, prompt_len: int, max_tokens: int,
                        ) -> tuple[float, float, list[StepOutput]]:
    """(TTFT s, end-to-end s, steps) of one request on a fresh engine."""
    engine = MockerEngine(MockerConfig(speedup_ratio=speedup))
    outputs: list[StepOutput] = []
    first = asyncio.Event()
    done = asyncio.Event()

    def sink(out: StepOutput) -> None:
        outputs.append(out)
        for chunk in out.chunks:
            first.set()
            if chunk.finish_reason is not None:
                done.set()

    await engine.start(sink)
    await asyncio.sleep(0.01)  # let the loop park on its idle wait
    t0 = time.monotonic()
    engine.add_request(GenerateRequest("t", "m", [40 + i % 80 for i in range(prompt_len)],
                                       SamplingParams(max_tokens=max_tokens)))
    await asyncio.wait_for(first.wait(), 10)
    ttft = time.monotonic() - t0
    await asyncio.wait_for(done.wait(), 10)
    e2e = time.monotonic() - t0
    await engine.shutdown()
    return ttft, e2e, outputs


@pytest.mark.asyncio
async def test_wall_time_follows_the_model_at_speedup_1() -> None:
    ttft, e2e, outputs = await timed_request(1.0, 1000, 21)
    expected_ttft = timing.prefill_ms(1000) / 1000
    assert 0.5 * expected_ttft < ttft < 1.5 * expected_ttft
    modelled = sum(o.forward_pass.duration_ms for o in outputs) / 1000  # type: ignore[union-attr]
    expected_e2e = expected_ttft + 20 * timing.decode_ms(16 / 16384) / 1000
    assert modelled == pytest.approx(expected_e2e, rel=1e-3)
    assert 0.5 * expected_e2e < e2e < 1.5 * expected_e2e


@pytest.mark.asyncio
async def test_speedup_divides_wall_time_not_the_model() -> None:
    _, e2e, outputs = await timed_request(4.0, 1000, 41)
    modelled = sum(o.forward_pass.duration_ms for o in outputs) / 1000  # type: ignore[union-attr]
    assert modelled > 0.25
    assert 0.5 * modelled / 4 < e2e < 1.5 * modelled / 4


@pytest.mark.asyncio
async def test_speedup_0_never_sleeps() -> None:
    _, e2e, outputs = await timed_request(0.0, 1000, 200)
    assert len(outputs) == 200
    assert e2e < 0.5  # the model says ~1.2 s


class FakeClock:
    """The engine's clock and sleep: time moves only when the engine sleeps or a test says the
    process lost the CPU (`deschedule`)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def deschedule(self, seconds: float) -> None:
        self.now += seconds


async def paced_run(speedup: float, max_debt_ms: float, stalls: dict[int, float],
                    ) -> tuple[MockerEngine, FakeClock, float, float, list[StepOutput],
                               list[float]]:
    """One request (1000-token prompt, 41 tokens: a prefill and 40 decodes) on a fake clock;
    after step k the process loses the CPU for `stalls[k]` seconds. Returns the engine, the
    clock, start and finish time, the steps, and the debt the engine reported after each."""
    clock = FakeClock()
    engine = MockerEngine(MockerConfig(speedup_ratio=speedup, max_time_debt_ms=max_debt_ms),
                          clock=clock, sleep=clock.sleep)
    outputs: list[StepOutput] = []
    debts: list[float] = []
    finished: list[float] = []
    done = asyncio.Event()

    def sink(out: StepOutput) -> None:
        outputs.append(out)
        debts.append(engine.time_debt_s())
        if any(c.finish_reason is not None for c in out.chunks):
            finished.append(clock.now)
            done.set()
        clock.deschedule(stalls.get(len(outputs), 0.0))

    engine.add_request(GenerateRequest("t", "m", [40 + i % 80 for i in range(1000)],
                                       SamplingParams(max_tokens=41)))
    start = clock.now
    await engine.start(sink)
    await asyncio.wait_for(done.wait(), 10)
    await engine.shutdown()
    return engine, clock, start, finished[0], outputs, debts


def modelled_s(outputs: list[StepOutput]) -> float:
    return sum(o.forward_pass.duration_ms for o in outputs) / 1000  # type: ignore[union-attr]


@pytest.mark.asyncio
@pytest.mark.parametrize("speedup", [1.0, 4.0])
async def test_undisturbed_steps_sleep_exactly_the_model(speedup: float) -> None:
    engine, clock, start, end, outputs, debts = await paced_run(speedup, 2000, {})
    assert len(outputs) == 41
    per_step = [o.forward_pass.duration_ms / 1000 / speedup  # type: ignore[union-attr]
                for o in outputs]
    assert clock.sleeps == pytest.approx(per_step, abs=1e-9)
    assert end - start == pytest.approx(modelled_s(outputs) / speedup, abs=1e-9)
    assert max(debts) == 0.0
    assert engine.time_dropped_s() == 0.0


@pytest.mark.asyncio
async def test_time_lost_to_descheduling_is_paid_back_by_later_steps() -> None:
    # 100 ms without the CPU after step 3: the old loop forgave all but 20 ms of it.
    engine, clock, start, end, outputs, debts = await paced_run(1.0, 2000, {3: 0.1})
    assert end - start == pytest.approx(modelled_s(outputs), abs=1e-9)
    assert debts[3] == pytest.approx(0.1, abs=1e-9)  # step 4 started 100 ms late
    # The debt shrinks by each skipped sleep's model time until it is gone.
    assert clock.sleeps[3] == 0.0
    assert all(b < a for a, b in itertools.pairwise(debts[3:]) if a > 0)
    assert debts[-1] == 0.0 and clock.sleeps[-1] > 0
    assert engine.time_dropped_s() == 0.0
    assert engine.time_debt_s() == 0.0  # idle: nothing owed


@pytest.mark.asyncio
async def test_debt_past_the_bound_is_dropped_and_counted() -> None:
    engine, _, start, end, outputs, debts = await paced_run(1.0, 50, {3: 0.13, 20: 0.03})
    # 80 ms of the first stall are beyond the 50 ms bound; the second is repaid in full.
    assert engine.time_dropped_s() == pytest.approx(0.08, abs=1e-9)
    assert max(debts) == pytest.approx(0.05, abs=1e-9)
    assert end - start == pytest.approx(modelled_s(outputs) + 0.08, abs=1e-9)


@pytest.mark.asyncio
async def test_a_bound_of_zero_forgives_every_delay() -> None:
    engine, _, start, end, outputs, debts = await paced_run(2.0, 0, {3: 0.01, 9: 0.02})
    assert engine.time_dropped_s() == pytest.approx(0.03, abs=1e-9)
    assert max(debts) == 0.0
    assert end - start == pytest.approx(modelled_s(outputs) / 2 + 0.03, abs=1e-9)
