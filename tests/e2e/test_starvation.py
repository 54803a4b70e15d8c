"""A worker that keeps losing the CPU for a few hundred milliseconds (a busy host) is starved,
not hung: after the first such pause, which its heartbeat explains (`loop_lag_s`), the router
stops taking its pauses for hangs, and every stream completes with a clean run's tokens."""

from __future__ import annotations

import asyncio
import signal
import time

import openai
import pytest

from turnout.testing.deployment import Deployment, Service, wait_for

pytestmark = pytest.mark.e2e

STREAMS = 8
TOKENS = 1024
PAUSES = 5
PAUSE_S = 0.35  # past the old fixed limit (3 x 100 ms heartbeats) every time


async def streams(url: str) -> list[str]:
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

    async def one(i: int) -> str:
        stream = await oai.completions.create(
            model="mock", prompt=f"stream {i}: " + "tell me everything. " * 8,
            max_tokens=TOKENS, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    return list(await asyncio.gather(*(one(i) for i in range(STREAMS))))


def starve(victim: Service) -> None:
    """Once `victim` serves: PAUSES times, no CPU for PAUSE_S (SIGSTOP/SIGCONT), then 0.7 s of
    CPU."""
    wait_for(lambda: victim.metrics().value("turnout_worker_running_requests") > 0, 60,
             f"{victim.name} to serve the streams", interval=0.02)
    for _ in range(PAUSES):
        victim.signal(signal.SIGSTOP)
        time.sleep(PAUSE_S)
        victim.signal(signal.SIGCONT)
        time.sleep(0.7)


def test_a_worker_starved_again_and_again_is_not_taken_for_hung(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1"),
                     router_args=("--router-mode", "round-robin"))
    clean = asyncio.run(streams(deployment.url))
    assert all(len(t) == TOKENS for t in clean)

    async def starved() -> list[str]:
        texts, _ = await asyncio.gather(
            streams(deployment.url), asyncio.to_thread(starve, deployment.service("w1")))
        return texts

    assert asyncio.run(starved()) == clean, "every stream carries the clean run's tokens"
    router = deployment.router.metrics()
    hangs = router.value("turnout_router_worker_failures_total", cause="hang")
    # The first pause, on a quiet history, looks like a freeze; the heartbeat after it says
    # the loop ran ~350 ms late, and no later pause is a verdict.
    assert hangs <= 1, f"{hangs} hang verdicts for a worker that was only starved"
    lag = deployment.service("w1").metrics().histogram("turnout_worker_event_loop_lag_seconds")
    assert lag.count - lag.buckets[0.25] >= PAUSES  # the worker saw each pause itself
