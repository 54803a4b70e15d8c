"""One adjustment at a time, in process: observations in, replica targets applied out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import parse
from services.planner.args import PlannerConfig
from services.planner.connectors import PoolState
from services.planner.load_observer import Observation
from services.planner.main import Planner
from services.planner.performance_model import StepSample


class FakeConnector:
    """A pool whose workers become ready when the test says (`ready`), and that someone else
    may resize (`replicas` set directly, then `changed_from`)."""

    def __init__(self, role: str, replicas: int) -> None:
        self.role = role
        self.replicas = replicas
        self.ready: int | None = None  # None: every worker is ready at once
        self.changed_from: int | None = None
        self.applied: list[int] = []

    def current(self) -> int:
        return self.replicas

    async def observe(self) -> PoolState:
        ready = self.replicas if self.ready is None else min(self.ready, self.replicas)
        changed, self.changed_from = self.changed_from, None
        return PoolState(self.replicas, ready, changed)

    async def apply(self, target: int) -> None:
        self.applied.append(target)
        self.replicas = target

    async def close(self) -> None:
        pass


class ScriptedObserver:
    """Hands out the next scripted observation at each interval."""

    def __init__(self) -> None:
        self.next: Observation | None = None

    async def collect(self, routers: object, frontends: object) -> Observation:
        assert self.next is not None
        return self.next


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    path = tmp_path / "mocker.json"
    path.write_text(json.dumps({"prefill_ms": [4.209989e-7, 0.01518344, 16.50142],
                                "decode_ms": [5.74, 0.0, 54.01, -25.74]}))
    return path


@pytest.fixture
def planner(profile: Path) -> Iterator[Planner]:
    config = parse(PlannerConfig, ["--dry-run", "--profile", str(profile), "--load-predictor",
                                   "constant", "--max-replicas", "16",
                                   "--scale-down-cooldown-s", "0"])
    p = Planner(config)
    p.observer = ScriptedObserver()  # type: ignore[assignment]
    p.connectors = {"aggregated": FakeConnector("aggregated", 1)}
    try:
        yield p
    finally:
        p.subscriber.close()
        p.ctx.destroy(linger=0)


def observe(rate: float | None, isl: float | None = 1500, osl: float | None = 200,
            ttft_ms: float | None = None, itl_ms: float | None = None,
            steps: list[StepSample] | None = None) -> Observation:
    return Observation(1.0, rate, isl, osl, ttft_ms, itl_ms, steps or [])


@pytest.mark.asyncio
async def test_targets_follow_the_load(planner: Planner) -> None:
    conn = planner.connectors["aggregated"]
    assert isinstance(conn, FakeConnector)
    targets = []
    for rate in (1, 10, 40, 80, 20, 0):
        planner.observer.next = observe(rate)  # type: ignore[attr-defined]
        await planner.adjust()
        targets.append(conn.replicas)
    assert targets[0] == 1 and targets[3] > targets[2] > targets[1] >= 1, targets
    assert targets[4] < targets[3] and targets[5] == 1, targets
    m = {s.name + str(s.labels): s.value for f in planner.metrics.registry.collect()
         for s in f.samples}
    assert m["turnout_planner_predicted_request_rate{}"] == 0
    assert m["turnout_planner_adjustments_total{}"] == 6
    assert m["turnout_planner_scaling_actions_total{'role': 'aggregated', 'direction': 'up'}"] >= 2


@pytest.mark.asyncio
async def test_no_traffic_seen_yet_holds(planner: Planner) -> None:
    planner.observer.next = observe(None, None, None)  # type: ignore[attr-defined]
    await planner.adjust()
    assert planner.connectors["aggregated"].current() == 1


@pytest.mark.asyncio
async def test_slow_observed_itl_adds_replicas(planner: Planner) -> None:
    steps = [StepSample(0, 64, 0.2, 15.0)] * 10
    planner.observer.next = observe(60, itl_ms=None, steps=steps)  # type: ignore[attr-defined]
    await planner.adjust()
    base = planner.connectors["aggregated"].current()
    model_itl = planner.model.decode_ms(64, 0.2)
    planner.observer.next = observe(60, itl_ms=4 * model_itl,  # type: ignore[attr-defined]
                                    steps=steps)
    await planner.adjust()
    await planner.adjust()
    assert planner.planner.itl_correction.factor > 2
    assert planner.connectors["aggregated"].current() > base
