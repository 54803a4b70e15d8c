"""KV-aware routing through real processes: prefix hits, spreading, hotspot guard."""

from __future__ import annotations

import asyncio

import openai
import pytest

from turnout.testing.deployment import Deployment, wait_for

pytestmark = pytest.mark.e2e


def finished(dep: Deployment, worker_id: str) -> float:
    m = dep.metrics_of(worker_id)
    return m.value("turnout_worker_requests_total", outcome="length")


def events_applied(dep: Deployment) -> float:
    router = next(r for r in dep.records() if r["role"] == "router")
    return dep.metrics_of(router["id"]).value("turnout_router_kv_events_applied_total")


def test_repeated_prompt_goes_to_the_worker_holding_it(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "0"),
                     router_args=("--router-mode", "kv"))
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0)
    doc = "Turnout routes each request to the worker that already holds its KV cache. " * 14
    first = oai.completions.create(model="mock", prompt=doc, max_tokens=4)
    holder = "w1" if finished(deployment, "w1") == 1 else "w2"
    other = "w2" if holder == "w1" else "w1"
    assert finished(deployment, holder) == 1 and finished(deployment, other) == 0
    wait_for(lambda: events_applied(deployment) > 0, 5, "the router to index the KV events")

    second = oai.completions.create(model="mock", prompt=doc, max_tokens=4)
    assert finished(deployment, holder) == 2, "the repeat must go where its prefix is cached"
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    full_blocks = (len(doc) - 1) // 64
    assert second.usage.prompt_tokens_details.cached_tokens == full_blocks * 64
    assert first.usage is not None

    # A different prefix, both workers idle: it goes to the other worker.
    oai.completions.create(model="mock", prompt="A wholly different document. " * 20,
                           max_tokens=4)
    assert finished(deployment, other) == 1


def test_a_cache_salt_reuses_and_routes_only_by_its_own_salts_kv(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "0"),
                     router_args=("--router-mode", "kv"))
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0)
    doc = "A tenant's prompt must not warm the cache for another tenant's timing probe. " * 14
    full = (len(doc) - 1) // 64 * 64

    def cached(new: bool, **salt: str) -> int:
        applied = events_applied(deployment)
        out = oai.completions.create(model="mock", prompt=doc, max_tokens=4,
                                     extra_body=salt or None)
        assert out.usage is not None
        if new:  # its blocks reach the router before the next request is placed
            wait_for(lambda: events_applied(deployment) > applied, 5, "the router to index it")
        details = out.usage.prompt_tokens_details
        return details.cached_tokens or 0 if details is not None else 0

    def where() -> list[float]:
        return [finished(deployment, "w1"), finished(deployment, "w2")]

    assert cached(True) == 0
    plain = where().index(1)
    # Same tokens, another salt: nothing reused, and the router does not see the plain copy
    # as a prefix of it (both workers idle: it goes to the one without the plain copy).
    assert cached(True, cache_salt="tenant-a") == 0
    assert where() == [1, 1]
    # The salt's repeat goes where its salt's blocks are and reuses them.
    assert cached(False, cache_salt="tenant-a") == full
    assert where()[1 - plain] == 2
    assert cached(False) == full and where()[plain] == 2


def test_shared_system_prompt_does_not_make_a_hotspot(deployment: Deployment) -> None:
    # Enough requests that steady state, not the start-up burst, sets the totals: until the
    # other workers' first prefills are indexed, the one caching the prompt is rightly cheapest
    # (a 96-request run once gave [37, 20, 20, 19] by that burst alone).
    workers, requests, margin = 4, 192, 0.5
    deployment.start(workers=workers, worker_args=("--speedup-ratio", "20"),
                     router_args=("--router-mode", "kv", "--hotspot-margin", str(margin)))
    system = "You are a helpful assistant who answers in great detail. " * 40  # ~2.3k tokens

    async def run() -> None:
        oai = openai.AsyncOpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                                 timeout=60)
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                out = await oai.chat.completions.create(
                    model="mock", max_tokens=32, extra_body={"ignore_eos": True},
                    messages=[{"role": "system", "content": system},
                              {"role": "user", "content": f"question number {i}: why?"}])
                assert out.usage is not None and out.usage.completion_tokens == 32

        await asyncio.gather(*(one(i) for i in range(requests)))

    asyncio.run(run())
    counts = [finished(deployment, f"w{i + 1}") for i in range(workers)]
    assert sum(counts) == requests
    fair = requests / workers
    assert max(counts) <= fair * (1 + margin), counts
    # And the shared prefix was reused: most prompts hit a cache.
    cached = sum(deployment.metrics_of(f"w{i + 1}").value("turnout_worker_cached_tokens_total")
                 for i in range(workers))
    prompt = sum(deployment.metrics_of(f"w{i + 1}").value("turnout_worker_prompt_tokens_total")
                 for i in range(workers))
    assert cached / prompt > 0.7
