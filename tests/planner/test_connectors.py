"""The local connector with stand-in worker processes: start, stop newest first, never kill."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.planner.connectors import LocalConnector, NoopConnector, PoolState

# A stand-in worker: exits on SIGTERM after a short drain, like a real one with no streams.
# With a directory as its first argument, it marks itself ready there (a file named by its id).
DRAINS = ("import pathlib, signal, sys, time\n"
          "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.1), sys.exit(0)))\n"
          "if len(sys.argv) > 3: (pathlib.Path(sys.argv[1]) / sys.argv[-1]).touch()\n"
          "time.sleep(60)\n")
# One that ignores SIGTERM (a drain that never ends).
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"


async def wait_exit(proc: asyncio.subprocess.Process) -> int:
    return await asyncio.wait_for(proc.wait(), 10)


async def wait_ready(directory: Path, worker_id: str) -> None:
    deadline = time.monotonic() + 10
    while not (directory / worker_id).exists():
        assert time.monotonic() < deadline, f"{worker_id} never got ready"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_scale_up_then_down_stops_the_newest_of_its_own(tmp_path: Path) -> None:
    external = {"w-external"}
    conn = LocalConnector("aggregated", [sys.executable, "-c", DRAINS, str(tmp_path)],
                          lambda: set(external), "p", stop_timeout_s=10)
    try:
        assert conn.current() == 1
        await conn.apply(3)
        assert list(conn.running) == ["p-aggregated-1", "p-aggregated-2"]
        assert conn.current() == 3  # starting processes count before they register
        await conn.apply(3)
        assert conn.started_total == 2, "no double start while the first ones come up"
        newest = conn.running["p-aggregated-2"]
        await wait_ready(tmp_path, "p-aggregated-2")
        await conn.apply(2)
        assert list(conn.running) == ["p-aggregated-1"] and conn.current() == 2
        assert await wait_exit(newest) == 0  # it drained and exited on SIGTERM
        await conn.apply(0)  # can only stop its own: the external one stays
        assert conn.current() == 1 and not conn.running
    finally:
        await conn.close()
    assert not conn.running and not conn.stopping


@pytest.mark.asyncio
async def test_registered_workers_being_stopped_do_not_count() -> None:
    registered: set[str] = set()
    conn = LocalConnector("decode", [sys.executable, "-c", DRAINS], lambda: set(registered),
                          "p", stop_timeout_s=10)
    try:
        await conn.apply(2)
        assert await conn.observe() == PoolState(2, 0), "started, not registered: not ready"
        registered.add("p-decode-1")
        assert await conn.observe() == PoolState(2, 1)
        registered.update(conn.running)  # both registered
        assert conn.current() == 2
        await conn.apply(1)  # the stopped one may linger in discovery for a poll
        assert conn.current() == 1
        assert await conn.observe() == PoolState(1, 1)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_stopped_worker_still_in_discovery_after_its_exit_does_not_count() -> None:
    """Its lease outlives it: counted, the next scale-down to 1 would stop the last live
    worker (the planner's predictive and reactive loops each scaling 2 -> 1 left none)."""
    registered: set[str] = set()
    conn = LocalConnector("aggregated", [sys.executable, "-c", DRAINS],
                          lambda: set(registered), "p", stop_timeout_s=10)
    try:
        await conn.apply(2)
        registered.update(conn.running)
        stopped = conn.running["p-aggregated-2"]
        await conn.apply(1)
        await wait_exit(stopped)
        assert conn.current() == 1 and "p-aggregated-2" in registered
        assert await conn.observe() == PoolState(1, 1)
        await conn.apply(1)
        assert list(conn.running) == ["p-aggregated-1"]  # nothing more was stopped
        registered.discard("p-aggregated-2")  # its lease expired
        assert conn.current() == 1 and not conn.exited
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_close_drains_and_waits_but_never_kills() -> None:
    conn = LocalConnector("aggregated", [sys.executable, "-c", STUBBORN], set, "p",
                          stop_timeout_s=0.5)
    await conn.apply(1)
    proc = conn.running["p-aggregated-1"]
    await asyncio.sleep(0.3)  # let it install its handler
    await conn.close()  # SIGTERM ignored: close gives up after the timeout
    try:
        assert proc.returncode is None, "a draining worker must never be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the test reaps what it made
        await wait_exit(proc)


@pytest.mark.asyncio
async def test_close_without_stop_leaves_workers_running() -> None:
    conn = LocalConnector("aggregated", [sys.executable, "-c", DRAINS], set, "p",
                          stop_on_close=False)
    await conn.apply(1)
    proc = conn.running["p-aggregated-1"]
    await conn.close()
    try:
        assert proc.returncode is None
    finally:
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc)


@pytest.mark.asyncio
async def test_a_worker_that_dies_is_no_longer_counted() -> None:
    conn = LocalConnector("aggregated", [sys.executable, "-c", "raise SystemExit(3)"], set, "p")
    await conn.apply(1)
    await wait_exit(conn.running["p-aggregated-1"])
    assert conn.current() == 0 and conn.exited_unexpectedly == 1
    await conn.close()


def test_worker_command_puts_user_flags_last() -> None:
    argv = LocalConnector.worker_command(["--speedup-ratio", "10", "--discovery", "file:/x"],
                                         "prefill", "file:/d", 2.0, model="m")
    assert argv[1:4] == ["-m", "turnout", "worker"]
    assert argv[argv.index("--worker-mode") + 1] == "prefill"
    assert argv[argv.index("--model") + 1] == "m"
    assert argv[-4:] == ["--speedup-ratio", "10", "--discovery", "file:/x"]
    assert "--keys-dir" not in argv


def test_worker_command_passes_the_planners_curve_keys() -> None:
    argv = LocalConnector.worker_command([], "decode", "file:/d", 2.0, keys_dir="/keys")
    assert argv[argv.index("--keys-dir") + 1] == "/keys"


@pytest.mark.asyncio
async def test_noop_connector_only_counts() -> None:
    conn = NoopConnector("aggregated", lambda: {"a", "b"})
    assert conn.current() == 2 and await conn.observe() == PoolState(2, 2)
    await conn.apply(5)
    assert conn.current() == 2
    await conn.close()
