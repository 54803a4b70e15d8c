"""`turnout up` while its workers start: dead workers stop it at once and are named with their
exit code and last output; a slow worker that shows progress is waited for past
--startup-timeout-s; one that shows none is given up on after it. Once it is up, `turnout status`
with no flags shows it.

Real processes on 127.0.0.1; the slow worker is the mocker with `--startup-time-s`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from turnout.testing.deployment import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


class Up:
    """One `turnout up` process; its stderr goes to a file the test reads while it runs."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.port = free_port() if port is None else port
        self.err_path = tmp / "up.err"
        self.out_path = tmp / "up.out"
        env = {**(os.environ if env is None else env), "PYTHONPATH": str(REPO),
               "PYTHONUNBUFFERED": "1"}
        with open(self.err_path, "wb") as err, open(self.out_path, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "turnout", "up", "--port", str(self.port), *args],
                stdout=out, stderr=err, env=env, cwd=tmp, start_new_session=True)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"turnout up still running after {timeout} s; stderr:\n"
                        f"{self.stderr()[-4000:]}")

    def wait_stdout(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stdout():
            if self.process.poll() is not None:
                pytest.fail(f"turnout up exited ({self.process.returncode}) before printing "
                            f"{text!r}; stderr:\n{self.stderr()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} after {timeout} s; stderr:\n{self.stderr()[-4000:]}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def up_runs(tmp_path: Path) -> Iterator[list[Up]]:
    runs: list[Up] = []
    yield runs
    for run in runs:
        run.close()


def test_workers_that_all_die_stop_up_at_once_with_their_last_words(
        tmp_path: Path, up_runs: list[Up]) -> None:
    # Both workers are told to bind a port the test holds: each dies as it starts.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        started = time.monotonic()
        up = Up(tmp_path, "--workers", "2", "--worker-port", str(port))
        up_runs.append(up)
        assert up.wait_exit(60) == 1
        elapsed = time.monotonic() - started
    finally:
        taken.close()
    err = up.stderr()
    assert elapsed < 60  # not the old 120 s wait for a frontend that cannot become healthy
    for name in ("worker-1", "worker-2"):
        head = f"turnout up: {name} (pid "
        assert head in err, err[-4000:]
        report = err[err.index(head):].splitlines()
        assert "exited with code 1; its last output:" in report[0], report[0]
        assert "Address already in use" in "\n".join(report[1:6]), err[-4000:]
    assert "turnout up: every worker has exited; stopping" in err
    assert "Turnout is up" not in up.stdout()


def test_a_slow_worker_that_shows_progress_outlives_the_startup_timeout(
        tmp_path: Path, up_runs: list[Up]) -> None:
    up = Up(tmp_path, "--workers", "1", "--startup-time-s", "8", "--startup-timeout-s", "3",
            "--log-level", "info")
    up_runs.append(up)
    up.wait_stdout("Turnout is up", 90)
    err = up.stderr()
    assert "[worker-1]" in err and "loading model (simulated)" in err
    assert "worker-1 loading model" in err  # the stage, in up's own progress line
    assert "no progress" not in err


def test_a_silent_stalled_worker_is_given_up_on_after_the_startup_timeout(
        tmp_path: Path, up_runs: list[Up]) -> None:
    # At the default log level the simulated load writes nothing and burns no CPU: no progress.
    started = time.monotonic()
    up = Up(tmp_path, "--workers", "1", "--startup-time-s", "600", "--startup-timeout-s", "3")
    up_runs.append(up)
    assert up.wait_exit(60) == 1
    assert time.monotonic() - started < 60
    err = up.stderr()
    assert "turnout up: no progress for 3 s while starting (worker-1 starting)" in err, err[-3000:]
    assert "Turnout is up" not in up.stdout()


def test_services_lead_their_own_process_groups_inside_ups_session(
        tmp_path: Path, up_runs: list[Up]) -> None:
    """A Ctrl-C at the terminal reaches `up` alone (each service leads a process group of its
    own), but no service is a session of its own: under autogroup scheduling every session is a
    scheduling group, and a CPU engine's busy threads kept the router off both cores of a
    2-core host for over ten seconds (measured with /proc/<tid>/schedstat), long enough for its
    discovery lease to run out mid-stream."""
    up = Up(tmp_path, "--workers", "1")
    up_runs.append(up)
    up.wait_stdout("Turnout is up", 90)
    session = os.getsid(up.process.pid)
    children = psutil.Process(up.process.pid).children()
    assert len(children) >= 3, children  # router, worker, frontend
    for child in children:
        assert os.getpgid(child.pid) == child.pid, child.cmdline()
        assert os.getsid(child.pid) == session, child.cmdline()


def test_a_port_in_use_stops_up_before_it_starts_anything(tmp_path: Path,
                                                           up_runs: list[Up]) -> None:
    """A second `make up` on the same port: another deployment's frontend answered the
    readiness check, so up said it was up, then its own frontend died with a traceback."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        up = Up(tmp_path, "--workers", "1", port=taken.getsockname()[1])
        up_runs.append(up)
        assert up.wait_exit(60) == 1
    finally:
        taken.close()
    err = up.stderr()
    assert err.startswith(f"turnout up: cannot listen on 127.0.0.1:{up.port}: "), err[-2000:]
    assert "choose another port with --port" in err and "Traceback" not in err
    assert "Turnout is up" not in up.stdout()


def test_services_stop_when_up_is_killed(tmp_path: Path, up_runs: list[Up]) -> None:
    """SIGKILL (or the OOM killer) gives `up` no chance to stop its services: each is told
    by the kernel that its parent is gone, and stops itself."""
    up = Up(tmp_path, "--workers", "2")
    up_runs.append(up)
    up.wait_stdout("Turnout is up", 90)
    children = psutil.Process(up.process.pid).children()
    assert len(children) >= 4, children  # router, two workers, frontend
    up.process.kill()
    up.process.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=60)
    survivors = [p.pid for p in alive]
    for orphan in alive:  # reaped here: nobody else will
        orphan.kill()
    assert not survivors, f"still running after up was killed: pids {survivors}"


def test_status_with_no_flags_shows_the_up_deployment_running_here(
        tmp_path: Path, up_runs: list[Up]) -> None:
    """`make up`, then `turnout status` in another terminal: up's discovery is a temporary
    directory of its own, so status, reading the default one, showed an empty fleet. It now
    shows the one `turnout up` deployment running on the machine, and with two asks which."""
    temp = tmp_path / "tmp"  # the machine's temporary directory, as both commands see it
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TURNOUT_DISCOVERY"}
    env["TMPDIR"] = str(temp)

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "turnout", "status", "--json"],
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path)

    runs = [tmp_path / "first", tmp_path / "second"]
    for run in runs:
        run.mkdir()
    up = Up(runs[0], "--workers", "1", env=env)
    up_runs.append(up)
    up.wait_stdout("Turnout is up", 90)
    (first,) = temp.glob("turnout-up-*")
    out = status()
    assert out.returncode == 0, out.stderr
    assert f"showing the `turnout up` deployment at file:{first}" in out.stderr
    view = json.loads(out.stdout)
    assert [w["model"] for w in view["workers"]] == ["mock"], view
    assert len(view["routers"]) == 1 and len(view["frontends"]) == 1, view

    second = Up(runs[1], "--workers", "1", env=env)
    up_runs.append(second)
    second.wait_stdout("Turnout is up", 90)
    out = status()
    assert out.returncode == 2 and out.stdout == "", out
    assert "2 `turnout up` deployments run on this machine: name one with --discovery" \
        in out.stderr
    for directory in temp.glob("turnout-up-*"):
        assert f"file:{directory}" in out.stderr
