"""Shared fixtures: real deployments that are always reaped, with their logs on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from turnout.testing.deployment import Deployment


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + report.when, report)


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        dep.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(dep.logs())
