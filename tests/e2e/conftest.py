"""End-to-end fixtures: the `deployment` of the modules in CURVE_TOO runs twice, once with plain
planes and once with fleet keys (CURVE on the request and event planes), so that the ordinary
`make test` proves the fleet behaves the same with keys. TURNOUT_TEST_CURVE chooses otherwise:
1 runs every deployment of every module with keys, 0 every one plain, each test once.

Only fast modules are doubled (their second run costs about two minutes on 2 cores); the others
(vLLM, disaggregation, planner pools, ...) run with keys under TURNOUT_TEST_CURVE=1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from turnout.testing.deployment import Deployment, curve_from_environment, reaped

CURVE_TOO = frozenset({"test_stack", "test_kv_routing", "test_failover", "test_router_replicas",
                       "test_gateway"})
PLANES = ("plain", "curve")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "deployment" not in metafunc.fixturenames or curve_from_environment() is not None:
        return
    if metafunc.module.__name__.rpartition(".")[2] in CURVE_TOO:
        metafunc.parametrize("deployment", PLANES, indirect=True)


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    planes: str | None = getattr(request, "param", None)
    yield from reaped(Deployment(tmp_path, curve=None if planes is None else planes == "curve"))
