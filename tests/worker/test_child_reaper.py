"""`ChildReaper`: an engine's helper processes die with a SIGKILLed worker; earlier children and
processes after an orderly release are left to their owners."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]

FAKE_WORKER = """
import subprocess, sys, time
from services.worker.engines.child_reaper import ChildReaper
before = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
reaper = ChildReaper()
reaper.mark()
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
assert reaper.feed_new_children() == 1
print(before.pid, engine.pid, flush=True)
time.sleep(60)
"""


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_engine_children_die_with_a_sigkilled_worker() -> None:
    worker = subprocess.Popen([sys.executable, "-c", FAKE_WORKER], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    before = engine = 0
    try:
        assert worker.stdout is not None
        before, engine = map(int, worker.stdout.readline().split())
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=5)
        assert gone(engine, 10), "the engine's process outlived its worker"
        assert not gone(before, 0.5), "a process from before the engine was killed"
    finally:
        for pid in (before, engine):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if worker.poll() is None:
            worker.kill()


KILLED_DURING_START = """
import asyncio, subprocess, sys
from services.worker.engines.child_reaper import ChildReaper

async def slow_start():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(child.pid, flush=True)
    await asyncio.sleep(60)  # the engine is still starting when the worker dies

async def main():
    reaper = ChildReaper()
    reaper.mark()
    await reaper.guard(slow_start())

asyncio.run(main())
"""


def test_engine_children_die_with_a_worker_killed_during_start() -> None:
    worker = subprocess.Popen([sys.executable, "-c", KILLED_DURING_START], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        time.sleep(0.6)  # a few polls of the guard
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=5)
        assert gone(child, 10), "a process started during start-up outlived its worker"
    finally:
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if worker.poll() is None:
            worker.kill()
