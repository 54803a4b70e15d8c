"""The planner as a real process beside a real deployment: it fills the fleet up to
--min-replicas by starting a worker, and drains that worker when it exits."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import psutil
import pytest

from common.prometheus_text import Metrics
from turnout.testing.deployment import Deployment, wait_for

pytestmark = pytest.mark.e2e


def workers(dep: Deployment) -> list[dict]:
    return [r for r in dep.records() if r["role"] == "worker"]


def planner_metrics(dep: Deployment, planner_id: str) -> Metrics:
    return dep.metrics_of(planner_id)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(service: object, timeout: float = 20) -> int:
    proc: subprocess.Popen[bytes] = service.process  # type: ignore[attr-defined]
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def test_planner_scales_up_to_min_replicas_and_drains_its_workers_on_exit(
        deployment: Deployment) -> None:
    dep = deployment
    dep.start_router()
    dep.start_worker()
    dep.start_frontend()
    common = ["--min-replicas", "2", "--adjustment-interval-s", "0.3", "--log-level", "info",
              "--worker-args", "--drain-grace-s 1"]

    # Dry run first: it decides to scale up, says so in its metrics, and starts nothing.
    dry = dep.start_planner("--planner-id", "pdry", "--dry-run", *common, name="planner-dry",
                            wait=False)
    dep.wait_registered(dry, timeout=20)
    wait_for(lambda: planner_metrics(dep, "pdry").value("turnout_planner_adjustments_total")
             >= 3, 10, "three dry-run adjustments")
    m = planner_metrics(dep, "pdry")
    assert m.value("turnout_planner_target_replicas", role="aggregated") == 2
    assert m.value("turnout_planner_current_replicas", role="aggregated") == 1
    assert m.value("turnout_planner_scaling_actions_total", direction="up",
                   role="aggregated") >= 1
    assert [w["id"] for w in workers(dep)] == ["w1"]
    assert stop(dry) == 0

    # The local connector: a second worker process registers, and only one.
    planner = dep.start_planner("--planner-id", "p1", *common, wait=False)
    started = dep.wait_registered(planner, timeout=20, instance_id="p1-aggregated-1")
    pid = started["metadata"]["pid"]
    try:
        assert started["metadata"]["mode"] == "aggregated"
        wait_for(lambda: dep.routable() == 2, 10, "the router to admit it")
        adjustments = planner_metrics(dep, "p1").value("turnout_planner_adjustments_total")
        wait_for(lambda: planner_metrics(dep, "p1").value("turnout_planner_adjustments_total")
                 >= adjustments + 3, 10, "three more adjustments")
        assert sorted(w["id"] for w in workers(dep)) == ["p1-aggregated-1", "w1"]
        m = planner_metrics(dep, "p1")
        assert m.value("turnout_planner_current_replicas", role="aggregated") == 2
        assert m.value("turnout_planner_scaling_actions_total", direction="up",
                       role="aggregated") == 1

        # SIGTERM: the planner drains the worker it started (not w1) and exits.
        assert stop(planner) == 0
        assert not alive(pid), "the planner waits for its workers to exit"
        assert [w["id"] for w in workers(dep)] == ["w1"]
        assert dep.service("w1").alive()
    finally:
        if alive(pid):  # reap what the planner left behind, whatever happened
            os.kill(pid, signal.SIGKILL)


def test_planner_scales_from_zero_on_demand_and_back_to_zero_when_idle(
        deployment: Deployment) -> None:
    """--min-replicas 0 with no worker at all: today's frontend refuses the first request (503,
    no workers, counted), the planner sees the refusal within a reactive tick and starts a
    worker, the retry is served; idle for a cooldown, the worker is drained away again."""
    dep = deployment
    dep.start_router()
    dep.start_frontend()
    planner = dep.start_planner(
        "--planner-id", "p0", "--min-replicas", "0", "--adjustment-interval-s", "1",
        "--reactive-interval-s", "0.3", "--scale-down-cooldown-s", "4", "--log-level", "info",
        "--worker-args", "--drain-grace-s 1", wait=False)
    dep.wait_registered(planner, timeout=20)
    wait_for(lambda: planner_metrics(dep, "p0").value("turnout_planner_adjustments_total")
             >= 2, 20, "two adjustments with no worker")
    assert workers(dep) == [], "idle and at zero: nothing started"

    refused = httpx.post(dep.url + "/v1/completions", timeout=10,
                         json={"model": "mock", "prompt": "hello", "max_tokens": 4})
    assert refused.status_code == 503
    started = dep.wait_registered(planner, timeout=60, instance_id="p0-aggregated-1")
    pid = started["metadata"]["pid"]
    try:
        m = planner_metrics(dep, "p0")
        assert m.value("turnout_planner_scale_from_zero_total", role="aggregated") == 1
        dep.wait_healthy(timeout=30)
        served = httpx.post(dep.url + "/v1/completions", timeout=30,
                            json={"model": "mock", "prompt": "hello", "max_tokens": 4})
        assert served.status_code == 200, served.text
        # Idle: after a cooldown with nothing in flight, the worker drains and exits.
        wait_for(lambda: not alive(pid), 60, "the idle worker to be drained away")
        assert workers(dep) == []
        wait_for(lambda: planner_metrics(dep, "p0").value(
            "turnout_planner_current_replicas", role="aggregated") == 0, 10, "it to count 0")
        assert stop(planner) == 0
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
