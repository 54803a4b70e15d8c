"""The deployment harness itself: failures while waiting name the service and carry its log;
stopping reaps every process, a frozen one included."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from turnout.testing.deployment import Deployment, ServiceExited

pytestmark = pytest.mark.e2e


def test_a_service_dying_while_awaited_is_reported_with_its_output(tmp_path: Path) -> None:
    with Deployment(tmp_path) as dep:
        with pytest.raises(ServiceExited, match="w1 exited with code 2") as failed:
            dep.start_worker("--speedup-ratio", "fast")
        assert "--speedup-ratio" in str(failed.value)  # argparse's complaint, from its log
        assert (tmp_path / "w1.log").read_text() in str(failed.value)


def test_stop_reaps_every_process_even_a_frozen_one(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "0"))
    assert deployment.routable() == 2
    assert {s.name for s in deployment.services} == {"router", "w1", "w2", "frontend"}
    frozen = deployment.service("w1")
    frozen.signal(signal.SIGSTOP)
    deployment.stop(grace_s=5)
    assert all(not s.alive() for s in deployment.services)
    # SIGCONT before SIGTERM: the frozen worker too shut down on its own terms.
    assert [s.returncode for s in deployment.services] == [0, 0, 0, 0], deployment.logs()
    assert deployment.records() == [], "every service left discovery"
