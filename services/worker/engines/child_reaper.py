"""Engine helper processes never outlive their worker.

Real engines run their cores in child processes (vLLM's `EngineCore` and its executor workers,
SGLang's schedulers). When the worker is SIGKILLed those children are orphaned and keep their
memory (on GPUs, the whole KV cache) because nothing tells them. A `ChildReaper` starts a small
watchdog process before the engine starts and tells it, over a pipe only the worker writes to,
about every process the engine starts (polling while a long start-up runs). When the worker is
gone, by any death and at any point after `mark()`, the pipe closes and the watchdog terminates
(then kills) those processes. Processes are named by pid and start time, so a recycled pid is
left alone; multiprocessing's resource tracker is spared so it still cleans up shared memory.

Owns the watchdog. Does not own the engine's orderly shutdown, which happens first when it can.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Awaitable
from typing import TypeVar

import psutil

log = logging.getLogger("turnout.worker")

T = TypeVar("T")

_WATCHDOG = """
import sys, psutil
targets = []
for line in sys.stdin:  # ends once the worker, the only writer, has exited or let go
    pid, created = line.split(":")
    try:
        proc = psutil.Process(int(pid))
        if abs(proc.create_time() - float(created)) < 0.5:
            targets.append(proc)
    except psutil.Error:
        pass
for proc in targets:
    try:
        proc.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(targets, timeout=5)
for proc in alive:
    try:
        proc.kill()
    except psutil.Error:
        pass
"""


class ChildReaper:
    """`mark()` before the engine starts its processes, `guard(...)` the start (or
    `feed_new_children()` after it), `release()` after an orderly shutdown."""

    def __init__(self) -> None:
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._skip: set[int] = set()

    def mark(self) -> None:
        """Start the watchdog; processes that exist now are not the engine's."""
        self._skip = {p.pid for p in psutil.Process().children(recursive=True)}
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._skip.add(self._watchdog.pid)

    def feed_new_children(self) -> int:
        """Tell the watchdog about descendants started since `mark()`; returns how many."""
        watchdog = self._watchdog
        if watchdog is None or watchdog.stdin is None:
            return 0
        lines = []
        for proc in psutil.Process().children(recursive=True):
            if proc.pid in self._skip:
                continue
            self._skip.add(proc.pid)
            try:
                if not _is_resource_tracker(proc):
                    lines.append(f"{proc.pid}:{proc.create_time()}\n")
            except psutil.Error:
                continue
        if lines:
            watchdog.stdin.write("".join(lines).encode())
            watchdog.stdin.flush()
        return len(lines)

    async def guard(self, start: Awaitable[T], interval_s: float = 0.2) -> T:
        """Await `start` (which spawns the engine's processes) while feeding the watchdog, so a
        worker killed half-way through a long start leaves nothing behind either."""
        task = asyncio.ensure_future(start)
        while not task.done():
            self.feed_new_children()
            await asyncio.wait({task}, timeout=interval_s)
        self.feed_new_children()
        return task.result()

    def release(self) -> None:
        """After an orderly shutdown: let the watchdog sweep up stragglers and exit."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog.stdin is not None:
            watchdog.stdin.close()


def _is_resource_tracker(proc: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return False
