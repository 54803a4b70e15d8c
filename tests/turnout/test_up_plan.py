"""`turnout up`'s plan with prefill and decode workers: which processes, in which roles."""

from __future__ import annotations

import pytest

from common.config import parse
from services.planner.args import PlannerConfig
from turnout import up

# An explicit discovery: plan() would otherwise make a temporary directory (nothing is started).
DISCOVERY = ["--discovery", "file:/nonexistent/turnout-plan-test"]


def plan(argv: list[str]) -> up.Plan:
    return up.plan([*argv, *DISCOVERY])


def modes(argv: list[str]) -> dict[str, str]:
    """Child name → its --worker-mode (workers only)."""
    out = {}
    for child in plan(argv).children:
        if child.is_worker:
            out[child.name] = child.argv[child.argv.index("--worker-mode") + 1]
    return out


def test_prefill_and_decode_workers_replace_the_default_aggregated_ones() -> None:
    assert modes(["--prefill-workers", "1", "--decode-workers", "2"]) == {
        "prefill-1": "prefill", "decode-1": "decode", "decode-2": "decode"}
    assert modes([]) == {"worker-1": "aggregated", "worker-2": "aggregated"}


def test_aggregated_workers_beside_them_when_asked_for() -> None:
    assert modes(["--workers", "1", "--prefill-workers", "1", "--decode-workers", "1"]) == {
        "worker-1": "aggregated", "prefill-1": "prefill", "decode-1": "decode"}


def test_worker_ids_get_a_role_suffix() -> None:
    ids = [c.argv[c.argv.index("--worker-id") + 1] for c in plan(
        ["--worker-id", "w", "--prefill-workers", "1", "--decode-workers", "1"]).children
        if c.is_worker]
    assert ids == ["w-prefill-1", "w-decode-1"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--prefill-workers", "2"], "needs a worker to decode"),
    (["--decode-workers", "-1"], "must be >= 0"),
    (["--workers", "0"], "at least 1"),
])
def test_impossible_splits_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        plan(argv)


def planner_config(argv: list[str]) -> PlannerConfig:
    """The settings `turnout up`'s planner child runs with (its argv, parsed as it would)."""
    child = next(c for c in plan(argv).children if c.name == "planner")
    assert child.argv[3] == "planner"
    return parse(PlannerConfig, child.argv[4:])


def test_up_runs_a_planner_with_its_flags_and_no_workers_of_its_own() -> None:
    p = plan(["--planner", "--min-replicas", "2", "--max-replicas", "5", "--ttft-slo-ms", "300",
              "--itl-slo-ms", "40", "--adjustment-interval-s", "3", "--speedup-ratio", "4"])
    assert [c.name for c in p.children] == ["router", "frontend", "planner"]
    cfg = planner_config(["--planner", "--min-replicas", "2", "--max-replicas", "5",
                          "--ttft-slo-ms", "300", "--adjustment-interval-s", "3",
                          "--speedup-ratio", "4"])
    assert (cfg.min_replicas, cfg.max_replicas, cfg.ttft_slo_ms) == (2, 5, 300)
    assert cfg.adjustment_interval_s == 3 and cfg.planner_mode == "aggregated"
    assert cfg.discovery == DISCOVERY[1]
    worker_args = cfg.worker_args.split()
    assert worker_args[worker_args.index("--speedup-ratio") + 1] == "4.0", \
        "the planner's workers run with up's engine flags"
    assert "--worker-mode" not in worker_args and "--worker-id" not in worker_args


def test_up_with_a_planner_and_prefill_decode_pools() -> None:
    argv = ["--planner", "--prefill-workers", "1", "--decode-workers", "1"]
    assert modes(argv) == {"prefill-1": "prefill", "decode-1": "decode"}
    assert planner_config(argv).planner_mode == "disaggregated"
    assert planner_config(["--planner", "--planner-mode", "disaggregated",
                           "--decode-worker-args", "--num-blocks 64"]
                          ).decode_worker_args == "--num-blocks 64"


@pytest.mark.parametrize(("argv", "message"), [
    (["--min-replicas", "2"], "--min-replicas configure the planner: add --planner"),
    (["--planner", "--prefill-workers", "1", "--planner-mode", "aggregated"],
     "pools of --planner-mode disaggregated"),
    (["--planner", "--worker-mode", "decode"], "gives its workers their --worker-mode"),
])
def test_planner_flags_without_a_planner_or_contradicting_it_are_refused(
        argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        plan(argv)
