"""Failover with real signals: every stream completes with exactly the tokens of a clean run.

The mocker's output is deterministic (each token depends only on the sequence before it) and the
built-in byte tokenizer maps one token to one character, so comparing texts compares token ids.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable

import openai
import pytest

from turnout.testing.deployment import Deployment, Service, wait_for

pytestmark = pytest.mark.e2e

STREAMS = 32
TOKENS = 512
Fault = Callable[[], Awaitable[None]]


def signal_once_serving(victim: Service, sig: int, *, prompt_tokens: int = 1,
                        replicated: bool = False, within_s: float = 60) -> Fault:
    """A fault: `sig` to `victim` once it is observed serving (`once_serving`)."""
    return once_serving(victim, lambda: victim.signal(sig), prompt_tokens=prompt_tokens,
                        replicated=replicated, within_s=within_s)


def once_serving(victim: Service, act: Callable[[], object], *, prompt_tokens: int = 1,
                 replicated: bool = False, within_s: float = 60) -> Fault:
    """A fault: `act()` once `victim` is observed serving the streams about to start:
    requests running, tokens decoded, at least `prompt_tokens` prompt tokens admitted (their
    first tokens out), and with `replicated`, its KV replicated to a peer and caught up.

    Watched from a thread of its own, which also acts: this test's event loop is busy parsing
    the streams, and a late look could find the victim's streams nearly done."""
    before = victim.metrics()

    def busy() -> bool:
        m = victim.metrics()

        def grew(name: str) -> float:
            return m.value(name) - before.value(name)

        ok = (m.value("turnout_worker_running_requests") > 0
              and grew("turnout_worker_decode_tokens_total") > 0
              and grew("turnout_worker_prompt_tokens_total") >= prompt_tokens)
        if replicated:
            ok = ok and (grew("turnout_worker_kv_replicated_blocks") > 0
                         and m.value("turnout_worker_kv_replication_lag_blocks") == 0)
        return ok

    def watch_then_act() -> None:
        wait_for(busy, within_s, f"{victim.name} to serve the streams", interval=0.02)
        act()

    async def fault() -> None:
        await asyncio.to_thread(watch_then_act)

    return fault


async def run_streams(url: str, fault: Fault | None = None,
                      logprobs: int | None = None) -> tuple[list[str], float]:
    """32 concurrent streams, `fault()` alongside. Returns texts and longest gap; with
    `logprobs`, each text is followed by the JSON of its tokens' logprobs."""
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    longest = 0.0

    async def one(i: int) -> str:
        nonlocal longest
        stream = await oai.completions.create(
            model="mock", prompt=f"stream {i}: " + "tell me everything. " * 8,
            max_tokens=TOKENS, stream=True, logprobs=logprobs, extra_body={"ignore_eos": True})
        text, last = "", time.monotonic()
        entries: list[object] = []
        async for chunk in stream:
            now = time.monotonic()
            if chunk.choices and chunk.choices[0].text:
                longest = max(longest, now - last)
                last = now
                text += chunk.choices[0].text
            if chunk.choices and chunk.choices[0].logprobs is not None:
                lp = chunk.choices[0].logprobs
                entries += zip(lp.tokens or [], lp.token_logprobs or [], lp.top_logprobs or [],
                               strict=True)
        return text + json.dumps(entries) if logprobs is not None else text

    tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
    if fault is not None:
        tasks.append(asyncio.create_task(fault()))
    results = await asyncio.gather(*tasks)
    return [r for r in results if isinstance(r, str)], longest


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM],
                         ids=["sigkill", "sigstop", "sigterm"])
def test_streams_survive_a_worker_fault(deployment: Deployment, sig: int) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1", "--drain-grace-s", "0.3"),
                     router_args=("--router-mode", "round-robin"))
    clean, _ = asyncio.run(run_streams(deployment.url))
    assert len(clean) == STREAMS and all(len(t) == TOKENS for t in clean)

    victim = deployment.service("w1")
    t0 = time.monotonic()
    faulty, longest = asyncio.run(run_streams(deployment.url, signal_once_serving(victim, sig)))
    assert faulty == clean, "every stream must carry exactly the clean run's tokens"
    assert time.monotonic() - t0 < 60
    migrations = deployment.router.metrics().by_label("turnout_router_migrations_total", "cause")
    cause = {signal.SIGKILL: "crash", signal.SIGSTOP: "hang", signal.SIGTERM: "drain"}[sig]
    assert migrations.get(cause, 0) > 0, migrations
    # Detection is fast, by the router's own clock (a dead worker's last heartbeat to the
    # verdict): a crash or a drain at the dropped connection, a hang within ~3 heartbeats; never
    # a lease.
    detection = deployment.router.metrics().histogram("turnout_router_failure_detection_seconds")
    assert detection.count == 1 and detection.buckets[1.0] == 1, detection
    # What clients see: no stream stalls for long. Loose, as this measures the test's own busy
    # event loop too, which on a loaded machine alone adds a second or two.
    assert longest < 5.0, f"longest token gap {longest:.2f} s"
    # A dead process is not taken back while its record lasts (it heartbeats no more).
    assert deployment.router.metrics().value("turnout_router_worker_recoveries_total") == 0 \
        or sig == signal.SIGSTOP
    if sig == signal.SIGSTOP:
        victim.signal(signal.SIGCONT)


def test_logprobs_survive_a_worker_crash(deployment: Deployment) -> None:
    """Streams asking for logprobs, their worker SIGKILLed: each migrated stream carries the
    clean run's tokens and, token for token, their logprobs (the mocker's are a function of
    the sequence, so the worker that continues gives the same)."""
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1"),
                     router_args=("--router-mode", "round-robin"))
    clean, _ = asyncio.run(run_streams(deployment.url, logprobs=2))
    assert len(clean) == STREAMS
    for text in clean:  # the byte tokenizer: a token per character
        entries = json.loads(text[TOKENS:])
        assert "".join(token for token, _, _ in entries) == text[:TOKENS]
        # The mocker's token is always its most likely one.
        assert all(len(top) == 2 and max(top.values()) == value for _, value, top in entries)
    faulty, _ = asyncio.run(run_streams(
        deployment.url, signal_once_serving(deployment.service("w1"), signal.SIGKILL),
        logprobs=2))
    assert faulty == clean, "every stream must carry the clean run's tokens and logprobs"
    migrations = deployment.router.metrics().by_label("turnout_router_migrations_total", "cause")
    assert migrations.get("crash", 0) > 0, migrations


def test_a_worker_whose_connection_is_cut_while_it_lives_is_used_again(
        deployment: Deployment) -> None:
    """The router's connection to a serving worker is cut (a network fault; both processes
    live on): its streams move with the clean run's tokens, and once the worker is reachable
    and heartbeating it is re-admitted and served again, not left unused until a restart."""
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1"),
                     router_args=("--router-mode", "round-robin"))
    clean, _ = asyncio.run(run_streams(deployment.url))
    victim = deployment.service("w1")
    router = deployment.router
    record = deployment.record("w1")
    assert record is not None
    cut: list[int] = []
    faulty, _ = asyncio.run(run_streams(deployment.url, once_serving(
        victim, lambda: cut.append(router.cut_connections(record["endpoints"]["request"])))))
    assert cut and cut[0] >= 1
    assert faulty == clean, "every stream must carry exactly the clean run's tokens"
    metrics = router.metrics()
    assert metrics.value("turnout_router_worker_failures_total", cause="crash") == 1
    assert metrics.value("turnout_router_migrations_total", cause="crash") > 0
    wait_for(lambda: router.metrics().value("turnout_router_worker_recoveries_total") == 1, 20,
             "the router to re-admit the worker")
    deployment.wait_routable(2)
    assert victim.alive()
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0)
    before = deployment.metrics_of("w1").value("turnout_worker_prompt_tokens_total")
    for i in range(6):
        oai.completions.create(model="mock", prompt=f"after the cut {i}", max_tokens=2)
    assert deployment.metrics_of("w1").value("turnout_worker_prompt_tokens_total") > before


def test_migration_limit_zero_turns_a_crash_into_a_clean_error(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1"),
                     router_args=("--router-mode", "round-robin", "--migration-limit", "0"))
    victim = deployment.service("w1")
    kill = signal_once_serving(victim, signal.SIGKILL)

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

        results = await asyncio.gather(*(one(i) for i in range(8)), kill())
        ok = sum(1 for r in results[:8] if r)
        return ok, 8 - ok

    ok, failed = asyncio.run(run())
    assert failed > 0 and ok > 0  # w1's streams fail cleanly, w2's finish
    wait_for(lambda: not victim.alive(), 5, "the victim to be gone")


def long_prompt(i: int) -> str:
    return f"long document {i}: " + "all work and no play makes a dull boy. " * 110


def test_kv_replicas_keep_the_kv_of_long_prompts(deployment: Deployment) -> None:
    """With --kv-replicas 1 a migrated request recomputes at most its last block plus the
    tokens generated since the last replicated block; without, the whole context."""
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1", "--kv-replicas", "1"),
                     router_args=("--router-mode", "round-robin"))
    victim = deployment.service("w1")

    async def run(fault: Fault | None) -> list[str]:
        oai = openai.AsyncOpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                                 timeout=120)

        async def one(i: int) -> str:
            # Half of them salted (whichever worker gets which): a salted request's blocks are
            # replicated, looked up and promoted under its salt.
            salt = {"cache_salt": "tenant-a"} if i % 4 < 2 else {}
            stream = await oai.completions.create(model="mock", prompt=long_prompt(i),
                                                  max_tokens=256, stream=True,
                                                  extra_body={"ignore_eos": True, **salt})
            return "".join([c.choices[0].text async for c in stream if c.choices])

        out = await asyncio.gather(*(one(i) for i in range(8)), *([fault()] if fault else []))
        return [t for t in out if isinstance(t, str)]

    # Killed once each of its 4 streams is past its prompt and the KV is replicated: what this
    # test is about is a migration that finds it there.
    prompt_tokens = len(long_prompt(0)) + 1  # the byte tokenizer, + BOS
    texts = asyncio.run(run(signal_once_serving(victim, signal.SIGKILL, replicated=True,
                                                prompt_tokens=4 * prompt_tokens)))
    assert len(texts) == 8 and all(len(t) == 256 for t in texts)
    assert texts == asyncio.run(run(None)), "the same tokens as a run without the fault"
    recomputed = deployment.router.metrics().histogram(
        "turnout_router_migration_recomputed_tokens")
    assert recomputed.count > 0, "some streams must have been migrated"
    # Every migrated request found its KV on the replica: at most two blocks recomputed
    # (the engine always recomputes the last block, plus the block still being generated).
    assert recomputed.buckets[128.0] == recomputed.count, recomputed
    survivor = deployment.metrics_of("w2")
    assert survivor.value("turnout_worker_kv_blocks_promoted_total") > 0


def test_a_worker_wrongly_declared_dead_is_readmitted(deployment: Deployment) -> None:
    """A brief freeze (a starved host) looks like a hang; once the worker heartbeats again it
    is resynced and routed to again, instead of being lost for good."""
    deployment.start(workers=2, worker_args=("--speedup-ratio", "0"),
                     router_args=("--router-mode", "round-robin"))
    victim = deployment.service("w1")
    router = deployment.router
    victim.signal(signal.SIGSTOP)
    # Frozen until declared dead (> 3 heartbeats), then thawed at once: well inside its lease,
    # so it is the router that re-admits it, not a fresh registration.
    wait_for(lambda: router.metrics().value("turnout_router_worker_failures_total",
                                            cause="hang") >= 1,
             10, "the router to declare the frozen worker dead", interval=0.02)
    victim.signal(signal.SIGCONT)
    wait_for(lambda: router.metrics().value("turnout_router_worker_recoveries_total") >= 1, 10,
             "the router to re-admit the worker")
    assert router.metrics().value("turnout_router_worker_failures_total", cause="hang") == 1
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0)
    before = deployment.metrics_of("w1").value("turnout_worker_prompt_tokens_total")
    for i in range(6):
        oai.completions.create(model="mock", prompt=f"after the freeze {i}", max_tokens=2)
    assert deployment.metrics_of("w1").value("turnout_worker_prompt_tokens_total") > before
