"""A worker that joins takes over requests still queued on the others (real processes)."""

from __future__ import annotations

import asyncio
import threading

import openai
import pytest

from turnout.testing.deployment import Deployment, wait_for

pytestmark = pytest.mark.e2e

# One mocker running two sequences at a time: the rest of a burst waits in its queue.
SLOW = ("--speedup-ratio", "1", "--max-num-seqs", "2")
PROMPTS = [f"Request {i}: " + "tell me about the river and the stone lantern. " * 4
           for i in range(6)]
TOKENS = 150


def waiting(dep: Deployment, worker: str) -> float:
    return dep.metrics_of(worker).value("turnout_worker_waiting_requests")


def test_a_joining_worker_takes_queued_requests_and_every_stream_is_unchanged(
        deployment: Deployment) -> None:
    deployment.start(workers=1, worker_args=SLOW)
    texts: dict[int, str] = {}
    failures: list[BaseException] = []

    async def burst() -> None:
        oai = openai.AsyncOpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                                 timeout=120)

        async def one(i: int) -> None:
            stream = await oai.completions.create(
                model="mock", prompt=PROMPTS[i], max_tokens=TOKENS, stream=True,
                extra_body={"ignore_eos": True})
            texts[i] = "".join([c.choices[0].text async for c in stream if c.choices])

        results = await asyncio.gather(*(one(i) for i in range(len(PROMPTS))),
                                       return_exceptions=True)
        failures.extend(r for r in results if isinstance(r, BaseException))

    client = threading.Thread(target=asyncio.run, args=(burst(),))
    client.start()
    try:
        # Two run on w1, four wait there (observed, not slept on).
        wait_for(lambda: waiting(deployment, "w1") >= 4, 30, "four requests queued on w1")
        deployment.start_worker(*SLOW)
        client.join(timeout=120)
        assert not client.is_alive(), "the burst did not finish"
    finally:
        client.join(timeout=120)
    assert not failures, failures
    router = deployment.router.metrics()
    assert router.value("turnout_router_queued_moves_total", pool="serving") >= 1
    assert deployment.metrics_of("w2").value("turnout_worker_prompt_tokens_total") > 0
    assert deployment.metrics_of("w1").value("turnout_worker_requests_total",
                                             outcome="cancelled") >= 1
    # Each moved stream carries exactly what the same request gives on a quiet fleet.
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=60)
    for i, prompt in enumerate(PROMPTS):
        again = oai.completions.create(model="mock", prompt=prompt, max_tokens=TOKENS,
                                       extra_body={"ignore_eos": True})
        assert texts[i] == again.choices[0].text, i
