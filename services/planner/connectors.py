"""Connectors: how a replica target becomes running workers of one role.

`Connector` is what the planner calls: `observe()` (a `PoolState`: workers of the role asked
for, i.e. running or starting but not draining, and how many of them serve), `current()` (the
asked-for count as last observed), `apply(target)` and `close()`. `LocalConnector` starts
`python -m turnout worker ...` processes on this machine and stops the newest of its own with
SIGTERM (a worker drains on SIGTERM: it leaves discovery, finishes its streams within its grace
period and exits); it never SIGKILLs a worker, and never touches workers it did not start.
`NoopConnector` only observes (`--dry-run`): it logs what it would do. The Kubernetes connector
is `kube_connector.KubernetesConnector`.

Owns process lifecycles. Does not own the targets (`replica_planner`) or worker discovery (the
planner passes in who is registered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("turnout.planner")

Registered = Callable[[], set[str]]  # ids of live registered workers of the connector's role


@dataclass(frozen=True, slots=True)
class PoolState:
    desired: int  # workers running or starting, not those draining away
    ready: int  # of those, how many serve (registered; on Kubernetes: Ready pods)
    # The asked-for count before someone other than this planner changed it (None: nobody did
    # since the last observation).
    changed_from: int | None = None


class Connector(Protocol):
    role: str

    async def observe(self) -> PoolState:
        """The role's workers now (may ask an API: the planner calls it once per decision)."""
        ...

    def current(self) -> int:
        """Workers of this role running or starting (not those draining away), as last seen."""
        ...

    async def apply(self, target: int) -> None:
        """Start or stop workers towards `target` (as far as this connector can)."""
        ...

    async def close(self) -> None: ...


class NoopConnector:
    """Observe only: counts the registered workers and logs what it would change."""

    def __init__(self, role: str, registered: Registered) -> None:
        self.role = role
        self.registered = registered

    def current(self) -> int:
        return len(self.registered())

    async def observe(self) -> PoolState:
        n = self.current()
        return PoolState(n, n)

    async def apply(self, target: int) -> None:
        current = self.current()
        if target != current:
            log.info("dry run: would scale", extra={"fields": {
                "role": self.role, "current": current, "target": target}})

    async def close(self) -> None:
        pass


class LocalConnector:
    """Starts and stops worker processes on this machine."""

    def __init__(self, role: str, command: Sequence[str], registered: Registered,
                 id_prefix: str, stop_on_close: bool = True,
                 stop_timeout_s: float = 40.0) -> None:
        """`command` runs one worker minus its id (e.g. [python, -m, turnout, worker, ...]);
        each started worker gets `--worker-id <id_prefix>-<role>-<n>` appended."""
        self.role = role
        self.command = list(command)
        self.registered = registered
        self.id_prefix = id_prefix
        self.stop_on_close = stop_on_close
        self.stop_timeout_s = stop_timeout_s
        # Started by us and not told to stop, oldest first (dicts keep insertion order).
        self.running: dict[str, asyncio.subprocess.Process] = {}
        self.stopping: dict[str, asyncio.subprocess.Process] = {}
        # Ours and exited (stopped, or died), while discovery may still list them (a lease
        # outlives its process by up to its TTL): never counted again, forgotten once
        # discovery drops them. Counted, a scale-down would stop a live worker in its place.
        self.exited: set[str] = set()
        self.started_total = 0
        self.exited_unexpectedly = 0
        self._floor_warned: tuple[int, int] | None = None

    @staticmethod
    def worker_command(worker_args: Sequence[str], mode: str, discovery: str,
                       lease_ttl_s: float, model: str = "",
                       served_model_name: str = "", keys_dir: str = "") -> list[str]:
        """`python -m turnout worker` with the planner's discovery, model, CURVE keys and the
        role's mode first, so flags in `worker_args` (which come after) override them."""
        argv = [sys.executable, "-m", "turnout", "worker", "--discovery", discovery,
                "--lease-ttl-s", str(lease_ttl_s), "--worker-mode", mode]
        if keys_dir:
            argv += ["--keys-dir", keys_dir]
        if model:
            argv += ["--model", model]
        if served_model_name:
            argv += ["--served-model-name", served_model_name]
        return [*argv, *worker_args]

    def current(self) -> int:
        self._reap()
        return len(self._serving() | self.running.keys())

    async def observe(self) -> PoolState:
        desired = self.current()
        return PoolState(desired, len(self._serving()))

    def _serving(self) -> set[str]:
        """Registered workers not stopped by us (ours running, or started by hand)."""
        registered = self.registered()
        self.exited &= registered
        return registered - self.stopping.keys() - self.exited

    async def apply(self, target: int) -> None:
        current = self.current()
        if target > current:
            for _ in range(target - current):
                await self._start()
        elif target < current:
            surplus = current - target
            victims = list(self.running)[-surplus:]  # the newest first to go
            for worker_id in victims:
                self._stop(worker_id)
            if len(victims) < surplus and self._floor_warned != (target, current):
                # Once per situation: a fixed base (say `turnout up --workers 2 --planner`)
                # would otherwise say so every interval.
                self._floor_warned = (target, current)
                log.warning("cannot scale down further: the other workers were not started by "
                            "this planner", extra={"fields": {
                                "role": self.role, "target": target,
                                "current": current - len(victims)}})

    async def close(self) -> None:
        """Stop our workers if asked to, then wait (bounded) for every stopping one to exit."""
        if self.stop_on_close:
            for worker_id in list(self.running):
                self._stop(worker_id)
        waiting = list(self.stopping.values())
        if not waiting:
            return
        _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in waiting],
                                        timeout=self.stop_timeout_s)
        if pending:
            for task in pending:
                task.cancel()
            log.warning("workers still draining; leaving them to finish on their own",
                        extra={"fields": {"role": self.role, "workers": len(pending)}})
        self._reap()

    # -- processes -----------------------------------------------------------------------------

    async def _start(self) -> None:
        self.started_total += 1
        worker_id = f"{self.id_prefix}-{self.role}-{self.started_total}"
        argv = [*self.command, "--worker-id", worker_id]
        try:
            # Own process group: a Ctrl-C meant for the planner does not hit its workers
            # mid-stream; the planner stops them itself, draining. Not a session (see
            # turnout/up.py on autogroup scheduling); uvloop takes no `process_group`, and
            # setpgrp is a bare system call, safe between fork and exec.
            proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL,
                                                        preexec_fn=os.setpgrp)
        except OSError as exc:
            log.error("could not start a worker", extra={"fields": {
                "role": self.role, "error": str(exc)}})
            return
        self.running[worker_id] = proc
        log.info("started worker", extra={"fields": {"role": self.role, "id": worker_id,
                                                     "pid": proc.pid}})

    def _stop(self, worker_id: str) -> None:
        proc = self.running.pop(worker_id)
        self.stopping[worker_id] = proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        log.info("stopping worker (drain)", extra={"fields": {"role": self.role, "id": worker_id,
                                                              "pid": proc.pid}})

    def _reap(self) -> None:
        for worker_id, proc in list(self.running.items()):
            if proc.returncode is not None:
                del self.running[worker_id]
                self.exited.add(worker_id)
                self.exited_unexpectedly += 1
                log.warning("worker exited on its own", extra={"fields": {
                    "role": self.role, "id": worker_id, "code": proc.returncode}})
        for worker_id, proc in list(self.stopping.items()):
            if proc.returncode is not None:
                del self.stopping[worker_id]
                self.exited.add(worker_id)
