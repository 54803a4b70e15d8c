"""Planner flags: disaggregated planning starts prefill and decode workers with their own flags."""

from __future__ import annotations

import sys

from common.config import parse
from services.planner.args import PlannerConfig
from services.planner.connectors import LocalConnector
from services.planner.main import Planner


def test_disaggregated_planning_starts_prefill_and_decode_workers_with_their_flags() -> None:
    config = parse(PlannerConfig, [
        "--planner-mode", "disaggregated", "--discovery", "file:/tmp/d", "--planner-id", "p",
        "--worker-args", "--speedup-ratio 2", "--prefill-worker-args", "--num-blocks 512"],
        prog="turnout planner")
    planner = Planner(config)
    try:
        assert list(planner.connectors) == ["prefill", "decode"]
        prefill, decode = planner.connectors["prefill"], planner.connectors["decode"]
        assert isinstance(prefill, LocalConnector) and isinstance(decode, LocalConnector)
        assert prefill.command[:4] == [sys.executable, "-m", "turnout", "worker"]
        mode = prefill.command.index("--worker-mode")
        assert prefill.command[mode + 1] == "prefill"
        assert prefill.command[-2:] == ["--num-blocks", "512"]
        assert "--speedup-ratio" not in prefill.command, "the role's own flags replace the rest"
        assert decode.command[decode.command.index("--worker-mode") + 1] == "decode"
        assert decode.command[-2:] == ["--speedup-ratio", "2"], "defaults to --worker-args"
        assert "--discovery" in decode.command and "file:/tmp/d" in decode.command
    finally:
        planner.subscriber.close()
        planner.ctx.destroy(linger=0)
