"""`ScratchDir` / `sweep_orphans`: the scratch directory of a worker killed with SIGKILL is
deleted by the next worker's start; a live worker's, and directories no Turnout owner file
marks, are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.worker.engines.scratch_dir import ScratchDir, sweep_orphans

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "turnout-test-scratch-"

# A worker's life in short: it makes its directory, puts a socket-like file in it, says where,
# and waits to be killed.
FAKE_WORKER = f"""
import time
from services.worker.engines.scratch_dir import ScratchDir
scratch = ScratchDir({PREFIX!r})
(scratch.path / "kv").touch()
print(scratch.path, flush=True)
time.sleep(60)
"""


@pytest.fixture
def temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    yield tmp_path


def start_worker(temp: Path) -> tuple[subprocess.Popen[str], Path]:
    worker = subprocess.Popen([sys.executable, "-c", FAKE_WORKER], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "TMPDIR": str(temp)})
    assert worker.stdout is not None
    line = worker.stdout.readline().strip()
    assert line, "the fake worker made no directory"
    return worker, Path(line)


def test_a_sigkilled_workers_directory_is_swept_and_a_live_ones_kept(temp: Path) -> None:
    killed, killed_dir = start_worker(temp)
    live, live_dir = start_worker(temp)
    try:
        assert killed_dir.parent == temp and (killed_dir / "kv").exists()
        assert sweep_orphans(PREFIX) == 0  # both alive
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
        assert sweep_orphans(PREFIX) == 1
        assert not killed_dir.exists()
        assert (live_dir / "kv").exists()
    finally:
        for worker in (killed, live):
            if worker.poll() is None:
                worker.kill()
            worker.wait(timeout=10)


def test_only_directories_with_an_unheld_owner_file_go(temp: Path) -> None:
    old = temp / f"{PREFIX}from-an-older-turnout"  # no owner file: nothing says it is unused
    old.mkdir()
    other = temp / "someone-else"
    other.mkdir()
    ours = ScratchDir(PREFIX)
    assert ours.path.parent == temp
    assert sweep_orphans(PREFIX) == 0
    assert old.exists() and other.exists() and ours.path.exists()
    ours.remove()
    assert not ours.path.exists()
    assert sweep_orphans(PREFIX) == 0
    assert old.exists() and other.exists()
