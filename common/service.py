"""The lifecycle every Turnout process shares: id, signals, long-running tasks, ordered shutdown.

A process builds one `Service`, registers a shutdown step for each thing it sets up (a ZeroMQ
context, a status server, a discovery registration, ...) as it sets it up, spawns its loops,
and awaits `run()`. Leaving `async with service` runs the shutdown steps once, last registered
first, so everything is undone in the reverse order it was done: a service that stops during
start-up undoes exactly what it had done so far. `run()` returns when SIGTERM/SIGINT asks for a
stop or when any spawned loop ends; a loop that raised is logged, and the service then exits
with an error (`ServiceFailed`) after its shutdown. `run_service` is the `main()` of a
`turnout <role>` subcommand: flags, logging, uvloop.

Owns none of the resources it shuts down; each service says how to close its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any

from common.config import StartupRefused, parse_configs
from common.logs import setup_logging

ShutdownStep = Callable[[], Awaitable[object] | object]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Set by a supervisor (`turnout up`) in the environment of the services it starts: its pid.
SUPERVISOR_ENV = "TURNOUT_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


class ServiceFailed(Exception):
    """A long-running task of the service ended with an error (it was logged when it did)."""


def new_instance_id(role: str) -> str:
    """`<role>-<pid>-<6 hex digits>`: unique per process, and says which process it is."""
    return f"{role}-{os.getpid()}-{secrets.token_hex(3)}"


class Service:
    """One process's lifecycle; see the module docstring."""

    def __init__(self, role: str, instance_id: str = "") -> None:
        self.role = role
        self.id = instance_id or new_instance_id(role)
        self.log = logging.getLogger(f"turnout.{role}")
        self._stop = asyncio.Event()
        self._tasks: dict[asyncio.Task[Any], str] = {}
        self._steps: list[tuple[str, ShutdownStep]] = []
        self._failures: list[str] = []
        self._shut_down = False

    # -- stopping ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a stop from now on (call it before a long start-up, such
        as an engine load, so a stop during it still shuts down cleanly)."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def request_stop(self) -> None:
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stopping:
            self.log.info("stopping", extra={"fields": {"signal": sig.name}})
        self.request_stop()

    @property
    def stopping(self) -> bool:
        """A stop was requested (signal, a loop that ended, or shutdown under way)."""
        return self._stop.is_set()

    async def wait_stopping(self) -> None:
        await self._stop.wait()

    @property
    def failed(self) -> bool:
        return bool(self._failures)

    # -- tasks and shutdown steps --------------------------------------------------------------

    def spawn(self, name: str, coro: Coroutine[Any, Any, object]) -> asyncio.Task[Any]:
        """Run `coro` as one of the service's long-running loops. If it ends (raising: logged as
        a failure) the service stops. At shutdown it is cancelled, at the point of the shutdown
        order where it was spawned."""
        task = asyncio.create_task(coro, name=f"{self.role}:{name}")
        self._tasks[task] = name
        task.add_done_callback(self._task_done)
        self.on_shutdown(f"cancel {name}", lambda: self._cancel(task))
        return task

    def on_shutdown(self, name: str, step: ShutdownStep) -> None:
        """Run `step` (a function, sync or async) at shutdown. Steps run last registered first;
        one that raises is logged and the others still run."""
        self._steps.append((name, step))

    async def run(self) -> None:
        """Serve until a stop is requested or a spawned loop ends."""
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Request a stop, then run the shutdown steps in reverse order (once)."""
        if self._shut_down:
            return
        self._shut_down = True
        self._stop.set()
        while self._steps:
            name, step = self._steps.pop()
            self.log.debug("shutdown step", extra={"fields": {"step": name}})
            try:
                result = step()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.log.exception("shutdown step failed", extra={"fields": {"step": name}})

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.shutdown()
        if exc is None and self._failures:
            raise ServiceFailed(f"{', '.join(self._failures)} failed; see the log above")

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        name = self._tasks.pop(task, "?")
        if task.cancelled():
            if not self.stopping:
                self.log.warning("task cancelled; stopping", extra={"fields": {"task": name}})
        elif (exc := task.exception()) is not None:
            self._failures.append(name)
            self.log.error("task failed; stopping", exc_info=exc,
                           extra={"fields": {"task": name}})
        elif not self.stopping:
            self.log.info("task ended; stopping", extra={"fields": {"task": name}})
        self._stop.set()

    @staticmethod
    async def _cancel(task: asyncio.Task[Any]) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def stop_with_supervisor() -> None:
    """Under a supervisor (its pid in `SUPERVISOR_ENV`): SIGTERM when it is gone, however it
    went (SIGKILL, the OOM killer), so a killed `turnout up` leaves no service behind. The
    variable is taken out of the environment: what this process starts is its own to stop.
    Linux only (prctl); elsewhere a no-op."""
    supervisor = os.environ.pop(SUPERVISOR_ENV, "")
    if not supervisor.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != int(supervisor):  # it went before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_service(role: str, config_classes: Sequence[type],
                start: Callable[..., Coroutine[Any, Any, None]],
                argv: Sequence[str] | None = None) -> None:
    """`turnout <role>`: parse `argv` into `config_classes` (flags + `TURNOUT_*`), set up logging
    from the first config's `log_level`, call `start(*configs)` and run what it returns on
    uvloop. A `ServiceFailed` becomes exit status 1 with a one-line message."""
    stop_with_supervisor()
    configs = parse_configs(config_classes, list(sys.argv[1:] if argv is None else argv),
                            prog=f"turnout {role}")
    setup_logging(role, configs[0].log_level)
    import uvloop

    try:
        uvloop.run(start(*configs))
    except (ServiceFailed, StartupRefused) as exc:
        raise SystemExit(f"turnout {role}: {exc}") from None
