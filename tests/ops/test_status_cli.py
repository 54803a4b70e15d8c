"""`turnout status` against a real deployment: workers with their load, routers, frontends."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from turnout.testing.deployment import ROOT, Deployment

pytestmark = pytest.mark.e2e


def status_argv(dep: Deployment, *args: str) -> list[str]:
    """`turnout status` as the fleet's operator runs it: with the fleet's keys, if it has them
    (without, it cannot hear a CURVE fleet's event plane: test_curve_planes)."""
    keys = ["--keys-dir", str(dep.keys_dir)] if dep.keys_dir is not None else []
    return [sys.executable, "-m", "turnout", "status", "--discovery", f"file:{dep.discovery}",
            *keys, *args]


def status(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(status_argv(dep, *args), capture_output=True, text=True, cwd=ROOT,
                          timeout=30, check=False)


def test_status_json_shows_workers_with_their_load(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "1"))
    body = {"model": "mock", "prompt": "tell me a long story", "max_tokens": 3000,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", deployment.url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # held: a dropped iterator would close the stream
        got = 0
        for line in lines:
            got += line.startswith("data: {")
            if got >= 3:
                break
        # One request is decoding now: status must see it on its worker, router and frontend.
        out = status(deployment, "--json")
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)

    workers = {w["id"]: w for w in view["workers"]}
    assert set(workers) == {"w1", "w2"}
    for w in workers.values():
        assert w["health"] == "alive", w
        assert w["mode"] == "aggregated" and w["model"] == "mock"
        assert (w["engine"], w["scheduling"], w["structured_outputs"]) == ("mocker", "fcfs",
                                                                           False)
        assert w["kv_total_blocks"] == 16384
        assert 0 <= w["heartbeat_age_s"] < 0.5
    busy = [w for w in workers.values() if w["running"] == 1]
    idle = [w for w in workers.values() if w["running"] == 0]
    assert len(busy) == 1 and len(idle) == 1, workers
    assert busy[0]["in_flight"] == 1 and busy[0]["waiting"] == 0
    assert busy[0]["kv_used_blocks"] >= 1 and busy[0]["kv_used_pct"] > 0
    # Mocker decode steps take ~6 ms at speed-up 1: well over 20 steps a second.
    assert busy[0]["steps_per_s"] > 20
    assert idle[0]["in_flight"] == 0 and idle[0]["steps_per_s"] == 0

    (router,) = view["routers"]
    assert router["reachable"] and router["mode"] == "kv"
    assert router["in_flight"] == 1
    assert router["workers_up"] == {"w1": 1, "w2": 1}
    assert router["request"].startswith("tcp://")
    (frontend,) = view["frontends"]
    assert frontend["url"] == deployment.url
    assert frontend["active_requests"] == 1 and frontend["queued_requests"] == 0


def test_status_table_and_watch(deployment: Deployment) -> None:
    deployment.start(workers=1, worker_args=("--speedup-ratio", "0",
                                             "--scheduling-policy", "priority"))
    out = status(deployment, "--listen-s", "0.5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "WORKERS (1)"
    assert lines[1].split()[:5] == ["ID", "MODE", "MODEL", "HEALTH", "ENGINE"]
    assert lines[2].split()[:5] == ["w1", "aggregated", "mock", "alive", "mocker[priority]"]
    assert "0/16384" in lines[2]
    assert "ROUTERS (1)" in out.stdout and "FRONTENDS (1)" in out.stdout
    assert deployment.url in out.stdout

    proc = subprocess.Popen(
        status_argv(deployment, "--watch", "--json", "--listen-s", "0.3"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        views = []
        deadline = time.monotonic() + 20
        while len(views) < 2 and time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                assert line, f"status exited early: {proc.stderr.read() if proc.stderr else ''}"
                views.append(json.loads(line))
        assert len(views) == 2, "watch mode did not refresh"
        assert all([w["id"] for w in v["workers"]] == ["w1"] for v in views)
        assert views[1]["time"] > views[0]["time"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_status_rejects_a_bad_discovery_spec() -> None:
    out = subprocess.run([sys.executable, "-m", "turnout", "status", "--discovery", "nope:x"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert out.returncode == 2 and "unknown discovery backend" in out.stderr


def test_status_of_an_empty_fleet_says_how_to_start_one(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "turnout", "status", "--discovery",
                          f"file:{tmp_path}"], capture_output=True, text=True, cwd=ROOT,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert f"nothing registers in file:{tmp_path}; start a deployment with `turnout up`" \
        in out.stderr
