"""A failing e2e test reports the end of every service's log of the deployment it used, so a
failure seen only in CI can be diagnosed from CI's output."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from turnout.testing.deployment import Deployment


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
