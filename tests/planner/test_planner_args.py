"""Planner flags that cannot work today are refused at start-up."""

from __future__ import annotations

import pytest

from common.config import parse
from services.planner.args import PlannerConfig


def test_disaggregated_planning_cannot_start_workers_yet(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(PlannerConfig, ["--planner-mode", "disaggregated"], prog="turnout planner")
    assert exc.value.code == 2
    assert "prefill/decode workers are not available yet" in capsys.readouterr().err
    # Observing (planning without starting anything) stays possible.
    assert parse(PlannerConfig, ["--planner-mode", "disaggregated", "--dry-run"]).dry_run
    assert parse(PlannerConfig, ["--planner-mode", "disaggregated", "--connector", "noop"])
