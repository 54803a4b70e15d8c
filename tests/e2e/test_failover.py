"""Failover with real signals: every stream completes with exactly the tokens of a clean run.

The mocker's output is deterministic (each token depends only on the sequence before it) and the
built-in byte tokenizer maps one token to one character, so comparing texts compares token ids.
"""

from __future__ import annotations

import asyncio
import signal
import time

import openai
import pytest

from tests.e2e.deployment import Deployment, metric, wait_for

pytestmark = pytest.mark.e2e

STREAMS = 32
TOKENS = 512


async def run_streams(url: str, fault: object = None, at: float = 1.0) -> tuple[list[str], float]:
    """32 concurrent streams; `fault()` runs `at` seconds in. Returns texts and longest gap."""
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    longest = 0.0

    async def one(i: int) -> str:
        nonlocal longest
        stream = await oai.completions.create(
            model="mock", prompt=f"stream {i}: " + "tell me everything. " * 8,
            max_tokens=TOKENS, stream=True, extra_body={"ignore_eos": True})
        text, last = "", time.monotonic()
        async for chunk in stream:
            now = time.monotonic()
            if chunk.choices and chunk.choices[0].text:
                longest = max(longest, now - last)
                last = now
                text += chunk.choices[0].text
        return text

    async def inject() -> None:
        await asyncio.sleep(at)
        fault()  # type: ignore[operator]

    tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
    if fault is not None:
        tasks.append(asyncio.create_task(inject()))
    results = await asyncio.gather(*tasks)
    return [r for r in results if isinstance(r, str)], longest


def router_metric(dep: Deployment, name: str) -> dict[str, float]:
    router = next(r for r in dep.records() if r["role"] == "router")
    return {k: v for k, v in dep.metrics_of(router["id"]).items() if k.startswith(name)}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM],
                         ids=["sigkill", "sigstop", "sigterm"])
def test_streams_survive_a_worker_fault(deployment: Deployment, sig: int) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1", "--drain-grace-s", "0.3"),
                     router_args=("--router-mode", "round-robin"))
    clean, _ = asyncio.run(run_streams(deployment.url))
    assert len(clean) == STREAMS and all(len(t) == TOKENS for t in clean)

    victim = deployment.services[1]  # w1
    t0 = time.monotonic()
    faulty, longest = asyncio.run(run_streams(deployment.url, lambda: victim.signal(sig)))
    assert faulty == clean, "every stream must carry exactly the clean run's tokens"
    assert time.monotonic() - t0 < 60
    migrations = router_metric(deployment, "turnout_router_migrations_total")
    assert sum(migrations.values()) > 0, "the fault must have hit running streams"
    cause = {signal.SIGKILL: "crash", signal.SIGSTOP: "hang", signal.SIGTERM: "drain"}[sig]
    assert migrations.get(f'turnout_router_migrations_total{{cause="{cause}"}}', 0) > 0, \
        migrations
    # Detection is fast: a hung worker is noticed within ~3 heartbeats, not a lease.
    assert longest < 2.0, f"longest token gap {longest:.2f} s"
    if sig == signal.SIGSTOP:
        victim.signal(signal.SIGCONT)


def test_migration_limit_zero_turns_a_crash_into_a_clean_error(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1"),
                     router_args=("--router-mode", "round-robin", "--migration-limit", "0"))
    victim = deployment.services[1]

    async def run() -> tuple[int, int]:
        oai = openai.AsyncOpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                                 timeout=60)

        async def one(i: int) -> bool:
            stream = await oai.completions.create(
                model="mock", prompt=f"request {i}", max_tokens=TOKENS, stream=True,
                extra_body={"ignore_eos": True})
            try:
                async for _ in stream:
                    pass
            except openai.APIError as exc:
                assert "migration limit" in str(exc)
                return False
            return True

        async def kill() -> None:
            await asyncio.sleep(1.0)
            victim.signal(signal.SIGKILL)

        results = await asyncio.gather(*(one(i) for i in range(8)), kill())
        ok = sum(1 for r in results[:8] if r)
        return ok, 8 - ok

    ok, failed = asyncio.run(run())
    assert failed > 0 and ok > 0  # w1's streams fail cleanly, w2's finish
    wait_for(lambda: not victim.alive(), 5, "the victim to be gone")


def test_kv_replicas_keep_the_kv_of_long_prompts(deployment: Deployment) -> None:
    """With --kv-replicas 1 a migrated request recomputes at most its last block plus the
    tokens generated since the last replicated block; without, the whole context."""
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1", "--kv-replicas", "1"),
                     router_args=("--router-mode", "round-robin"))
    victim = deployment.services[1]

    async def run(fault: bool) -> list[str]:
        oai = openai.AsyncOpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                                 timeout=120)

        async def one(i: int) -> str:
            prompt = f"long document {i}: " + "all work and no play makes a dull boy. " * 110
            stream = await oai.completions.create(model="mock", prompt=prompt, max_tokens=256,
                                                  stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream if c.choices])

        async def kill() -> None:
            await asyncio.sleep(1.5)
            victim.signal(signal.SIGKILL)

        out = await asyncio.gather(*(one(i) for i in range(8)), *([kill()] if fault else []))
        return [t for t in out if isinstance(t, str)]

    texts = asyncio.run(run(fault=True))
    assert len(texts) == 8 and all(len(t) == 256 for t in texts)
    assert texts == asyncio.run(run(fault=False)), "the same tokens as a run without the fault"
    recomputed = router_metric(deployment, "turnout_router_migration_recomputed_tokens")
    count = recomputed["turnout_router_migration_recomputed_tokens_count"]
    assert count > 0, "some streams must have been migrated"
    # Every migrated request found its KV on the replica: at most two blocks recomputed
    # (the engine always recomputes the last block, plus the block still being generated).
    within = recomputed['turnout_router_migration_recomputed_tokens_bucket{le="128.0"}']
    assert within == count, recomputed
    survivor = deployment.metrics_of("w2")
    assert metric(survivor, "turnout_worker_kv_blocks_promoted_total") > 0


def test_a_worker_wrongly_declared_dead_is_readmitted(deployment: Deployment) -> None:
    """A brief freeze (a starved host) looks like a hang; once the worker heartbeats again it
    is resynced and routed to again, instead of being lost for good."""
    deployment.start(workers=2, worker_args=("--speedup-ratio", "0"),
                     router_args=("--router-mode", "round-robin"))
    victim = deployment.services[1]
    victim.signal(signal.SIGSTOP)
    time.sleep(0.6)  # > 3 heartbeats: declared dead; < 1 s: the worker does not rejoin itself
    victim.signal(signal.SIGCONT)
    wait_for(lambda: sum(router_metric(
        deployment, "turnout_router_worker_recoveries_total").values()) >= 1, 10,
        "the router to re-admit the worker")
    deaths = router_metric(deployment, "turnout_router_worker_failures_total")
    assert deaths.get('turnout_router_worker_failures_total{cause="hang"}', 0) == 1
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0)
    before = metric(deployment.metrics_of("w1"), "turnout_worker_prompt_tokens_total")
    for i in range(6):
        oai.completions.create(model="mock", prompt=f"after the freeze {i}", max_tokens=2)
    assert metric(deployment.metrics_of("w1"), "turnout_worker_prompt_tokens_total") > before
