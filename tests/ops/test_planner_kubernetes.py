"""The planner's `kubernetes` connector, through the real `kubernetes.aio` client, against
`FakeKubeApi` on 127.0.0.1 (the Deployment read and `scale` subresource the planner's RBAC role
allows), first alone and then under the planner's own adjustments.

Exercised for real: kubeconfig loading, the client's requests, merge-patching `scale`, reading
`spec.replicas` / `status.readyReplicas`. The test plays the ReplicaSet controller: it says how
many pods are ready, and scales by hand as an operator would. Not exercised: a real controller
creating pods, admission, RBAC enforcement (tests/ops/test_k8s_manifests.py checks the role).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

pytest.importorskip("kubernetes.aio", reason="needs the [kubernetes] extra (kubernetes>=37)")

from common.config import parse
from services.planner.args import PlannerConfig
from services.planner.connectors import PoolState
from services.planner.kube_connector import KubeApiError, KubernetesConnector
from services.planner.load_observer import Demand, Observation
from services.planner.main import Planner
from tests.ops.fake_kube_api import FakeKubeApi
from tests.planner.test_planner_adjust import Clock, ScriptedObserver

NS = "turnout-test"
WORKERS = "turnout-worker"


@pytest_asyncio.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeKubeApi]:
    server = FakeKubeApi(token="s3cret")
    await server.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(server.kubeconfig(namespace=NS))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        yield server
    finally:
        await server.close()


def scale_patches(api: FakeKubeApi) -> list[str]:
    return [path for method, path, _ in api.requests
            if method == "PATCH" and path.endswith("/scale")]


def spec(api: FakeKubeApi) -> tuple[int, int]:
    dep = api.deployments[(NS, WORKERS)]
    return dep["spec"]["replicas"], dep["status"]["readyReplicas"]


# -- the connector alone ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_observe_and_scale_a_deployment(api: FakeKubeApi) -> None:
    api.put_deployment(NS, WORKERS, replicas=2)
    conn = KubernetesConnector("aggregated", WORKERS)  # namespace from the kubeconfig context
    try:
        assert await conn.observe() == PoolState(2, 2)
        assert conn.namespace == NS and conn.current() == 2
        await conn.apply(4)
        assert spec(api) == (4, 2) and conn.current() == 4
        assert scale_patches(api) == [f"/apis/apps/v1/namespaces/{NS}/deployments/{WORKERS}/scale"]
        assert await conn.observe() == PoolState(4, 2), "two pods still starting"
        api.set_ready_replicas(NS, WORKERS, 4)
        assert await conn.observe() == PoolState(4, 4)
        await conn.apply(4)
        assert len(scale_patches(api)) == 1, "already there: no request"
        await conn.apply(1)
        assert spec(api) == (1, 1)
        assert await conn.observe() == PoolState(1, 1)
    finally:
        await conn.close()
    assert spec(api) == (1, 1), "closing leaves the Deployment as it is"


@pytest.mark.asyncio
async def test_a_change_by_hand_is_reported_once_and_adopted(api: FakeKubeApi) -> None:
    api.put_deployment(NS, WORKERS, replicas=2)
    conn = KubernetesConnector("aggregated", WORKERS, NS)
    try:
        assert (await conn.observe()).changed_from is None  # the first look is no change
        api.scale_by_hand(NS, WORKERS, 5)
        assert await conn.observe() == PoolState(5, 2, changed_from=2)
        assert await conn.observe() == PoolState(5, 2), "adopted: no second report"
        await conn.apply(3)
        assert (await conn.observe()).changed_from is None, "its own change is not one"
        assert conn.external_changes == 1
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_api_errors_are_clear(api: FakeKubeApi, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    missing = KubernetesConnector("decode", "turnout-worker-decode", NS)
    try:
        with pytest.raises(KubeApiError, match=r"404.*turnout-worker-decode"):
            await missing.observe()
    finally:
        await missing.close()
    api.put_deployment(NS, WORKERS, replicas=1)
    config = json.loads(api.kubeconfig(NS))
    config["users"][0]["user"]["token"] = "wrong"
    (tmp_path / "bad").write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "bad"))
    denied = KubernetesConnector("aggregated", WORKERS, NS)
    try:
        with pytest.raises(KubeApiError, match="401"):
            await denied.observe()
    finally:
        await denied.close()
    with pytest.raises(ValueError, match="no Deployment"):
        KubernetesConnector("aggregated", "")


# -- under the planner -------------------------------------------------------------------------


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    """The mocker's step times (as tests/planner/test_planner_adjust.py uses)."""
    path = tmp_path / "mocker.json"
    path.write_text(json.dumps({"prefill_ms": [4.209989e-7, 0.01518344, 16.50142],
                                "decode_ms": [5.74, 0.0, 54.01, -25.74]}))
    return path


@pytest.fixture
def make_planner(profile: Path) -> Iterator:
    made: list[Planner] = []

    def make(*flags: str) -> Planner:
        config = parse(PlannerConfig, [
            "--connector", "kubernetes", "--kube-namespace", NS, "--profile", str(profile),
            "--load-predictor", "constant", "--max-replicas", "12", "--ready-timeout-s", "30",
            "--scale-down-cooldown-s", "30", *flags])
        p = Planner(config)
        p.observer = ScriptedObserver()  # type: ignore[assignment]
        clock = Clock()
        p.planner.clock = p.startup.clock = clock
        p.planner._started = clock.now
        p.clock = clock  # type: ignore[attr-defined]
        made.append(p)
        return p

    yield make
    for p in made:
        p.subscriber.close()
        p.ctx.destroy(linger=0)


async def adjust(p: Planner, rate: float, times: int = 1) -> int:
    """`times` adjustments 10 s apart at `rate` req/s; the Deployment's replicas after."""
    for _ in range(times):
        p.clock.now += 10  # type: ignore[attr-defined]
        p.observer.next = Observation(10.0, rate, 1500, 200, None, None, [],  # type: ignore[attr-defined]
                                      Demand(0, 0) if rate == 0 else None)
        await p.adjust()
    conn = p.connectors["aggregated"]
    assert isinstance(conn, KubernetesConnector)
    return conn.desired


def metric(p: Planner, name: str, **labels: str) -> float:
    value = p.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


@pytest.mark.asyncio
async def test_a_scale_whose_pods_never_get_ready_does_not_deadlock(
        api: FakeKubeApi, make_planner) -> None:
    api.put_deployment(NS, WORKERS, replicas=1)
    p = make_planner()
    try:
        grown = await adjust(p, 40)
        assert grown > 1 and spec(api) == (grown, 1)  # new pods: Pending, no GPU for them
        assert await adjust(p, 40, times=4) == grown
        role = {"role": "aggregated"}
        assert metric(p, "turnout_planner_start_timeouts_total", **role) == 1
        assert metric(p, "turnout_planner_scale_up_held", **role) == 1
        assert metric(p, "turnout_planner_ready_replicas", **role) == 1
        patches = len(scale_patches(api))
        # Twice the load: no more pods onto a Deployment whose new pods never start.
        assert await adjust(p, 80, times=3) == grown
        assert len(scale_patches(api)) == patches
        # The pods come up (a node with GPUs joined): planning resumes where the load is.
        api.set_ready_replicas(NS, WORKERS, grown)
        bigger = await adjust(p, 80)
        assert bigger > grown and spec(api)[0] == bigger
        assert metric(p, "turnout_planner_scale_up_held", **role) == 0
    finally:
        for conn in p.connectors.values():
            await conn.close()


@pytest.mark.asyncio
async def test_unready_pods_are_scaled_away_when_the_load_goes(api: FakeKubeApi,
                                                               make_planner) -> None:
    """Dynamo #14251: a scale-up stuck on missing GPUs must not pin the fleet after the load
    stops."""
    api.put_deployment(NS, WORKERS, replicas=1)
    p = make_planner()
    try:
        grown = await adjust(p, 40)
        await adjust(p, 40, times=4)
        assert metric(p, "turnout_planner_start_timeouts_total", role="aggregated") == 1
        assert await adjust(p, 0, times=4) == 1
        assert spec(api) == (1, 1) and grown > 1
    finally:
        for conn in p.connectors.values():
            await conn.close()


@pytest.mark.asyncio
async def test_replicas_changed_by_hand_are_adopted(api: FakeKubeApi, make_planner) -> None:
    """Dynamo #4420: the Deployment, not the planner's memory, says how many replicas run."""
    api.put_deployment(NS, WORKERS, replicas=1)
    p = make_planner("--min-replicas", "1")
    try:
        base = await adjust(p, 20, times=4)
        api.scale_by_hand(NS, WORKERS, base + 3)
        api.set_ready_replicas(NS, WORKERS, base + 3)
        assert await adjust(p, 20, times=2) == base + 3, "adopted, not reverted at once"
        assert metric(p, "turnout_planner_external_replica_changes_total",
                      role="aggregated") == 1
        assert metric(p, "turnout_planner_current_replicas", role="aggregated") == base + 3
        assert await adjust(p, 20, times=3) == base, "a cooldown later: what the load needs"
        # Scaled to zero by hand while requests keep coming: one comes back at once.
        api.scale_by_hand(NS, WORKERS, 0)
        assert await adjust(p, 20) == base
        assert metric(p, "turnout_planner_external_replica_changes_total",
                      role="aggregated") == 2
    finally:
        for conn in p.connectors.values():
            await conn.close()


@pytest.mark.asyncio
async def test_scale_from_zero_through_the_api(api: FakeKubeApi, make_planner) -> None:
    api.put_deployment(NS, WORKERS, replicas=0)
    p = make_planner("--min-replicas", "0", "--max-gpus", "4", "--gpus-per-worker", "2")
    try:
        await p.react()
        assert spec(api) == (0, 0), "nobody waits: stays at zero"
        p.observer.demand = Demand(waiting=3, in_flight=3)  # type: ignore[attr-defined]
        await p.react()
        assert spec(api) == (1, 0)
        await p.react()
        assert spec(api) == (1, 0), "one start under way is enough"
        assert await adjust(p, 200) == 2, "the budget: 4 GPUs at 2 per worker"
        assert metric(p, "turnout_planner_budget_limited_total", role="aggregated") == 1
    finally:
        for conn in p.connectors.values():
            await conn.close()


@pytest.mark.asyncio
async def test_prefill_and_decode_deployments_share_the_budget(api: FakeKubeApi,
                                                              make_planner) -> None:
    """Ready for disaggregation: one Deployment per pool, one GPU budget over both."""
    api.put_deployment(NS, "turnout-worker-prefill", replicas=1)
    api.put_deployment(NS, "turnout-worker-decode", replicas=1)
    p = make_planner("--planner-mode", "disaggregated", "--max-gpus", "6")
    try:
        p.clock.now += 10  # type: ignore[attr-defined]
        p.observer.next = Observation(10.0, 60, 3000, 300, None, None, [])  # type: ignore[attr-defined]
        await p.adjust()
        prefill = api.deployments[(NS, "turnout-worker-prefill")]["spec"]["replicas"]
        decode = api.deployments[(NS, "turnout-worker-decode")]["spec"]["replicas"]
        assert prefill >= 1 and decode >= 1 and prefill + decode == 6, (prefill, decode)
        assert metric(p, "turnout_planner_target_gpus") == 6
    finally:
        for conn in p.connectors.values():
            await conn.close()


@pytest.mark.asyncio
async def test_an_unreachable_deployment_is_counted_and_planning_resumes(
        api: FakeKubeApi, make_planner) -> None:
    p = make_planner()
    try:
        with pytest.raises(KubeApiError, match="404"):
            await adjust(p, 20)  # no Deployment yet: the loop logs it and tries again
        assert metric(p, "turnout_planner_connector_errors_total", role="aggregated") == 1
        api.put_deployment(NS, WORKERS, replicas=1)
        assert await adjust(p, 40) > 1
    finally:
        for conn in p.connectors.values():
            await conn.close()
