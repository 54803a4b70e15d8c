"""The disaggregated planner with real processes: it sizes the prefill pool and the decode pool
apart, starting mocker workers with `--worker-mode prefill|decode` and their own flags, and it
scales down only by draining, so a request stream running through it never aborts.

Load, phase A: long prompts (1,000 tokens) with two-token answers. The prefill workers run at a
tenth of the mocker's speed in 256-token chunks, so one cannot keep up: the planner grows the
prefill pool while the decode pool stays at one. Phase B: short prompts with long answers on
decode workers of 64 KV blocks each: the decode pool grows, and the prefill pool, idle, is
drained back to one. Every request of both phases must complete with all its tokens.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import openai
import psutil
import pytest

from common.prometheus_text import Metrics
from turnout.testing.deployment import Deployment, scrape_async

pytestmark = pytest.mark.e2e

# The mocker's own step-time polynomials (services/worker/engines/mocker/timing.py), so the
# planner has an estimate from its first interval.
PROFILE = ('{"prefill_ms": [4.209989e-7, 0.01518344, 16.50142], '
           '"decode_ms": [5.74, 0.0, 54.01, -25.74], "block_size": 64}')
# This shared 2-core host freezes for seconds at a time under other jobs; at the default 100 ms
# heartbeats a one-second freeze declares every worker hung (and a worker drops its own
# requests), which is failure handling, not what this test is about: heartbeats every second,
# eight missed before a verdict.
PATIENT = ("--heartbeat-interval-ms", "1000", "--missed-heartbeats", "8")
PREFILL_ARGS = ("--speedup-ratio 0.1 --max-num-batched-tokens 256 --num-blocks 256 "
                "--drain-grace-s 30 --heartbeat-interval-ms 1000")
DECODE_ARGS = ("--speedup-ratio 1 --num-blocks 64 --drain-grace-s 30 --kv-pull-timeout-ms 10000 "
               "--heartbeat-interval-ms 1000")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Stream:
    """An open-loop request stream: `rate` requests/s of the given shape until `stop()`; every
    outcome kept."""

    def __init__(self, url: str) -> None:
        self.client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                         timeout=300)
        self.tasks: list[asyncio.Task[None]] = []
        self.failures: list[str] = []
        self.completed = 0
        self.rng = random.Random(12)

    async def one(self, prompt_tokens: int, max_tokens: int) -> None:
        prompt = [self.rng.randrange(32, 127) for _ in range(prompt_tokens)]  # nothing cached
        try:
            stream = await self.client.completions.create(
                model="mock", prompt=prompt, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            usage = None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
            if usage is None or usage.completion_tokens != max_tokens:
                self.failures.append(f"cut short: {usage}")
            else:
                self.completed += 1
        except Exception as exc:  # every failure is a finding: keep it for the assertion
            self.failures.append(f"{type(exc).__name__}: {exc}")

    async def send(self, rate: float, prompt_tokens: int, max_tokens: int,
                   until: asyncio.Event) -> None:
        start, sent = time.monotonic(), 0
        while not until.is_set():
            self.tasks.append(asyncio.create_task(self.one(prompt_tokens, max_tokens)))
            sent += 1
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(until.wait(), delay)
                except TimeoutError:
                    pass

    async def finish(self, within_s: float) -> None:
        _, pending = await asyncio.wait(self.tasks, timeout=within_s)
        assert not pending, f"{len(pending)} requests still running after {within_s} s"


async def pools(metrics_url: str) -> dict[str, tuple[int, int]]:
    """role → (workers asked for, workers serving), as the planner saw them last."""
    m: Metrics = await scrape_async(metrics_url)
    return {role: (int(m.value("turnout_planner_current_replicas", role=role)),
                   int(m.value("turnout_planner_ready_replicas", role=role)))
            for role in ("prefill", "decode")}


async def wait_pools(metrics_url: str, want: dict[str, tuple[int, int]], within_s: float,
                     stream: Stream, what: str) -> dict[str, tuple[int, int]]:
    deadline = time.monotonic() + within_s
    seen: dict[str, tuple[int, int]] = {}
    while time.monotonic() < deadline:
        seen = await pools(metrics_url)
        if all(seen[role] == n for role, n in want.items()):
            return seen
        assert not stream.failures, stream.failures[:3]
        await asyncio.sleep(0.5)
    raise TimeoutError(f"timed out after {within_s} s waiting for {what}; pools: {seen}")


@pytest.mark.timeout(420)
def test_planner_scales_prefill_and_decode_pools_apart_without_aborting_a_stream(
        deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    profile = tmp_path / "mocker-profile.json"
    profile.write_text(PROFILE)
    dep.start_router("--disagg-mode", "always", *PATIENT, "--frontend-timeout-ms", "20000")
    dep.start_frontend(*PATIENT)
    planner = dep.start_planner(
        "--planner-id", "pp", "--planner-mode", "disaggregated", "--profile", str(profile),
        "--min-replicas", "1", "--max-replicas", "2", "--adjustment-interval-s", "2",
        "--scale-down-cooldown-s", "8", "--load-predictor", "constant",
        "--ttft-slo-ms", "2000", "--itl-slo-ms", "20", "--max-step-tokens", "256",
        "--log-level", "info", "--prefill-worker-args", PREFILL_ARGS,
        "--decode-worker-args", DECODE_ARGS, wait=False)
    started: set[int] = set()  # pids of the workers the planner started, reaped at the end

    def note_workers() -> None:
        started.update(r["metadata"]["pid"] for r in dep.records() if r["role"] == "worker")
        if planner.alive():
            started.update(p.pid for p in psutil.Process(planner.pid).children())

    async def scenario() -> None:
        url = dep.wait_registered(planner, timeout=30)["endpoints"]["metrics"]
        # With no load, it fills each pool to --min-replicas.
        stream = Stream(dep.url)
        await wait_pools(url, {"prefill": (1, 1), "decode": (1, 1)}, 60, stream,
                         "one ready worker per pool")
        note_workers()
        dep.wait_healthy(30)
        modes = sorted(r["metadata"]["mode"] for r in dep.records() if r["role"] == "worker")
        assert modes == ["decode", "prefill"]

        # Phase A: prompts heavy, answers short: only the prefill pool grows.
        phase = asyncio.Event()
        sending = asyncio.create_task(stream.send(2.0, 1000, 2, phase))
        await wait_pools(url, {"prefill": (2, 2)}, 120, stream, "a second prefill worker")
        note_workers()
        assert (await pools(url))["decode"] == (1, 1), "the decode pool had no reason to grow"
        phase.set()
        await sending

        # Phase B: prompts short, answers long: the decode pool grows, the prefill pool
        # drains back to one.
        phase = asyncio.Event()
        sending = asyncio.create_task(stream.send(3.0, 64, 200, phase))
        await wait_pools(url, {"decode": (2, 2)}, 120, stream, "a second decode worker")
        note_workers()
        await wait_pools(url, {"prefill": (1, 1)}, 120, stream,
                         "the idle prefill worker to be drained")
        # Read while the decode load still runs: once it stops, an idle decode pool shrinks
        # too, as it should (a busy host may take longer than the cooldown to finish).
        m = await scrape_async(url)
        phase.set()
        await sending
        await stream.finish(180)
        assert not stream.failures, stream.failures[:5]
        assert stream.completed == len(stream.tasks)
        assert m.value("turnout_planner_scaling_actions_total", role="prefill",
                       direction="down") >= 1
        assert m.value("turnout_planner_scaling_actions_total", role="decode",
                       direction="down") == 0

    try:
        asyncio.run(scenario())
        # SIGTERM: the planner drains every worker it started, then exits.
        planner.signal(signal.SIGTERM)
        assert planner.process.wait(timeout=60) == 0
        assert len(started) >= 4
        assert not [pid for pid in started if alive(pid)], "its workers drained and exited"
    finally:
        # Whatever happened, nothing is left behind: the workers it noted, and any other
        # process of this test's deployment (a worker the planner started last; they run in
        # process groups of their own, out of the harness's reach).
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
                started.add(proc.info["pid"])
        for pid in started:
            if pid != os.getpid() and alive(pid):
                os.kill(pid, signal.SIGKILL)
        if planner.alive():
            planner.process.kill()
            try:
                planner.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
