"""Direct routing targets: a worker id, or HOST:PORT of any of its endpoints (the Gateway API
Inference Extension's `x-gateway-destination-endpoint`), with comma-separated fallbacks."""

from __future__ import annotations

import pytest

from common.messages import GenerateRequest, Instance, SamplingParams
from services.router.policies import Direct, RoutingError, endpoint_addresses, select_target
from services.router.worker_pool import WorkerHandle
from tests.router.fakes import FakeDealer


def worker(worker_id: str, port: int) -> WorkerHandle:
    instance = Instance(id=worker_id, role="worker", model="m", endpoints={
        "request": f"tcp://10.0.0.{port % 250}:{port}",
        "events": f"tcp://10.0.0.{port % 250}:{port + 1}",
        "metrics": f"http://10.0.0.{port % 250}:{port + 2}/metrics"})
    return WorkerHandle(instance, FakeDealer(instance.endpoints["request"]))  # type: ignore[arg-type]


def request(target: str | None) -> GenerateRequest:
    return GenerateRequest("r", "m", [1, 2, 3], SamplingParams(max_tokens=1), target)


POOL = [worker("a", 5000), worker("b", 6000)]


def test_endpoint_addresses() -> None:
    assert endpoint_addresses(POOL[0]) == {"10.0.0.0:5000", "10.0.0.0:5001", "10.0.0.0:5002"}


@pytest.mark.parametrize(("target", "chosen"), [
    ("b", "b"),
    ("10.0.0.0:5000", "a"),
    ("10.0.0.0:6002", "b"),  # the metrics port names the pod too
    ("10.0.0.9:1, 10.0.0.0:6000", "b"),  # primary is gone: the fallback
    ("10.0.0.0:5000,10.0.0.0:6000", "a"),  # primary first
])
def test_targets(target: str, chosen: str) -> None:
    assert select_target(POOL, request(target)).id == chosen
    assert Direct().decide(request(target), POOL).worker.id == chosen


@pytest.mark.parametrize("target", ["c", "10.0.0.9:1", "10.0.0.0:5000x", "10.0.0.0", ","])
def test_unknown_targets_are_a_400(target: str) -> None:
    with pytest.raises(RoutingError) as err:
        select_target(POOL, request(target))
    assert err.value.code == 400 and repr(target) in str(err.value)


def test_direct_mode_needs_a_target() -> None:
    with pytest.raises(RoutingError, match="x-gateway-destination-endpoint") as err:
        Direct().decide(request(None), POOL)
    assert err.value.code == 400
