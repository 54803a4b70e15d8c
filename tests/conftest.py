"""Shared fixtures: real deployments that are always reaped. A failing test reports the end of
every service's log of each deployment it used (of any fixture scope), so a failure seen only in
CI can be diagnosed from CI's output."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from turnout.testing.deployment import Deployment, reaped


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        if isinstance(value, Deployment):
            report.sections.append((f"deployment {name!r}: service logs", value.logs(3000)))


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    yield from reaped(Deployment(tmp_path))
