"""The mocker's timing model: Dynamo's polynomials, and the loop's sleeps that follow them."""

from __future__ import annotations

import asyncio
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
