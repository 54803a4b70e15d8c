"""The planner scaling the encode pool: the rule on observed encode-stage latency and image
rates, the routers' series it reads, and the planner applying it through a (fake) connector."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from common.messages import ROLE_ROUTER, Instance
from services.planner.encode_pool import EncodePoolPlanner, EncodeStage
from services.planner.load_observer import LoadObserver
from services.router.encode_routing import EncodeMetrics
from tests.planner.test_load_observer import Pages
from tests.planner.test_planner_adjust import (
    Clock,
    FakeConnector,
    close,
    make_planner,
    metrics,
    observe,
)
from tests.planner.test_planner_adjust import profile as profile

SLO = 200.0


def rule(clock: Clock, cooldown_s: float = 0.0, lo: int = 0, hi: int = 4) -> EncodePoolPlanner:
    return EncodePoolPlanner(SLO, lo, hi, 0.5, cooldown_s, clock)


def stage(pool: float = 0.0, inline: float = 0.0, latency: float | None = None) -> EncodeStage:
    return EncodeStage(pool, inline, latency)


def test_slow_encode_stage_adds_a_worker_up_to_the_cap() -> None:
    clock = Clock()
    p = rule(clock, hi=3)
    assert p.target(stage(20, latency=350), 1) == 2
    assert p.target(stage(20, latency=350), 3) == 3  # at --encode-max-replicas
    assert p.target(stage(20, latency=150), 2) == 2  # under the SLO, but not idle enough


def test_an_empty_pool_starts_one_when_images_are_encoded_in_line() -> None:
    clock = Clock()
    p = rule(clock)
    assert p.target(stage(), 0) == 0
    assert p.target(stage(inline=3), 0) == 1
    assert p.target(None, 0) == 0  # no router answered: hold


def test_removal_needs_spare_capacity_and_the_cooldown() -> None:
    clock = Clock()
    p = rule(clock, cooldown_s=60)
    # 10 images/s x 40 ms = 0.4 images in the stage: over half a worker for 1 of 2.
    assert p.target(stage(10, latency=40), 2) == 2
    # 5 images/s x 40 ms = 0.2: one worker fewer would stay under the margin, but the
    # cooldown (from the planner's start) has not passed.
    assert p.target(stage(5, latency=40), 2) == 2
    clock.now += 61
    assert p.target(stage(5, latency=40), 2) == 1
    assert p.target(stage(), 1) == 1  # idle, but the removal just now restarted the cooldown
    clock.now += 61
    assert p.target(stage(), 1) == 0  # idle for a cooldown: to the floor
    assert rule(clock, lo=1).target(stage(), 1) == 1  # --encode-min-replicas 1


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min"):
        EncodePoolPlanner(SLO, 3, 2, 0.5, 0, Clock())
    with pytest.raises(ValueError, match="encode-latency-slo-ms"):
        EncodePoolPlanner(0, 0, 2, 0.5, 0, Clock())


@pytest.mark.asyncio
async def test_observer_reads_the_routers_encode_series() -> None:
    """From the router's own metrics class, so a renamed series fails here."""
    registry = CollectorRegistry()
    enc = EncodeMetrics(registry)
    web = Pages()
    router = Instance("r1", ROLE_ROUTER, endpoints={"metrics": "http://r/metrics"})
    web.pages["http://r/metrics"] = generate_latest(registry).decode()
    async with httpx.AsyncClient(transport=httpx.MockTransport(web.handler)) as client:
        obs = LoadObserver("mock", client)
        first = await obs.collect([router], [])
        assert first.encode is None  # a baseline only
        await asyncio.sleep(0.2)
        enc.images.labels("encode_pool").inc(6)
        enc.images.labels("inline").inc(2)
        for seconds in (0.1, 0.3):
            enc.seconds.observe(seconds)
        web.pages["http://r/metrics"] = generate_latest(registry).decode()
        second = await obs.collect([router], [])
    assert second.encode is not None
    assert second.encode.pool_images_per_s == pytest.approx(6 / second.interval_s)
    assert second.encode.inline_images_per_s == pytest.approx(2 / second.interval_s)
    assert second.encode.latency_ms == pytest.approx(200.0)


@pytest.mark.asyncio
async def test_planner_scales_the_encode_pool_beside_the_llm_workers(profile: Path,
                                                                     ) -> None:
    p = make_planner(profile, "--encode-max-replicas", "3", "--encode-latency-slo-ms", "100")
    try:
        encoders = FakeConnector("encode", 0)
        p.encode_connector = encoders
        assert p.encode_pool is not None
        p.encode_pool.clock = p.clock  # type: ignore[attr-defined]
        base = observe(5)

        async def step(encode: EncodeStage | None) -> int:
            p.clock.now += 10  # type: ignore[attr-defined]
            p.observer.next = dataclasses.replace(base, encode=encode)  # type: ignore[attr-defined]
            await p.adjust()
            return encoders.replicas

        assert await step(stage(inline=2)) == 1  # images encoded in-line: start one
        assert await step(stage(8, latency=400)) == 2  # over the SLO
        encoders.ready = 2
        assert await step(stage(8, latency=400)) == 3
        encoders.ready = 2  # the third still starting: hold, whatever the latency
        assert await step(stage(8, latency=900)) == 3
        encoders.ready = None
        assert await step(stage(1, latency=30)) == 2  # 0.03 images in the stage: one fewer
        assert await step(stage()) == 1
        assert encoders.applied == [1, 2, 3, 2, 1]  # nothing applied while one starts
        m = metrics(p)
        assert m["turnout_planner_scaling_actions_total{'role': 'encode', 'direction': 'up'}"] == 3
        assert m["turnout_planner_current_replicas{'role': 'encode'}"] == 2
        # The LLM pool is planned as before (the encode pool is apart from it).
        assert p.connectors["aggregated"].current() >= 1
    finally:
        close(p)


def test_encode_flags_are_checked() -> None:
    from common.config import parse
    from services.planner.args import PlannerConfig
    from services.planner.main import _check

    bad = parse(PlannerConfig, ["--encode-max-replicas", "1", "--encode-min-replicas", "2"])
    with pytest.raises(SystemExit, match="encode-min-replicas"):
        _check(bad)
    with pytest.raises(SystemExit, match="encode-latency-slo-ms"):
        _check(parse(PlannerConfig, ["--encode-latency-slo-ms", "0"]))
