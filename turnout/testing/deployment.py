"""A deployment of real Turnout processes on 127.0.0.1, shared by the end-to-end tests and the
benchmarks.

`Deployment` starts each service as its own `python -m turnout <service> ...` process (or
another launcher of the `turnout` command) in its own process group, on free ports, with a
temporary file-discovery directory; it waits with a bound for each one to register (and the
frontend's /health, and the router to route to every worker); it reads discovery records and
/metrics; it signals services; and it always stops and reaps what it started, in order (planner,
frontend, router, workers), SIGKILLing whatever SIGTERM did not stop in time. Every service's
output goes to its own log file, kept for failure reports. With `curve=True` (or
TURNOUT_TEST_CURVE=1 in the environment, so any existing end-to-end test runs that way;
TURNOUT_TEST_CURVE=0 or unset: plain) it first generates fleet keys in `<workdir>/keys` and
every service it starts gets them (TURNOUT_KEYS_DIR): the planes use CURVE.

Owns process lifecycle and observation. Does not own what a test or benchmark sends.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import zmq

from common import prometheus_text
from common.free_port import free_port
from common.prometheus_text import Metrics

ROOT = Path(__file__).resolve().parents[2]
PYTHON_TURNOUT = (sys.executable, "-m", "turnout")
# Stop order: nothing new comes in (planner, frontend), then the relay, then the engines.
STOP_ORDER = ("planner", "frontend", "router", "worker")
PIDFD_GETFD = 438  # the syscall number, the same on x86-64 and arm64

T = TypeVar("T")


def curve_from_environment() -> bool | None:
    """TURNOUT_TEST_CURVE: 1 (every deployment with fleet keys), 0 (every one plain), unset or
    empty (None: each caller's default). Anything else is an error, not silently plain."""
    value = os.environ.get("TURNOUT_TEST_CURVE", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"TURNOUT_TEST_CURVE must be 0 or 1, got {value!r}")
    return None if value == "" else value == "1"


def wait_for(predicate: Callable[[], T], timeout: float, what: str,
             interval: float = 0.05) -> T:
    """`predicate()`'s first truthy value; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def eventually(condition: Callable[[], object], what: str, within: float = 10.0,
                     interval: float = 0.01) -> None:
    """Wait, on the running event loop, until `condition()` is truthy; AssertionError after
    `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(interval)


def read_records(directory: Path) -> list[dict[str, Any]]:
    """The discovery records in a file-discovery directory (half-written ones skipped)."""
    out = []
    for path in directory.glob("*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def scrape(url: str, timeout: float = 5.0) -> Metrics:
    """GET a /metrics URL and parse it."""
    response = httpx.get(url, timeout=timeout)
    response.raise_for_status()
    return prometheus_text.parse(response.text)


def requests_on(worker: Metrics) -> float:
    """A worker's requests running or waiting, read from one scrape (two scrapes could count a
    request moving between the two states twice or not at all)."""
    return (worker.value("turnout_worker_running_requests")
            + worker.value("turnout_worker_waiting_requests"))


async def scrape_async(url: str, within_s: float = 5.0) -> Metrics:
    async with httpx.AsyncClient(timeout=within_s) as http:
        response = await http.get(url)
    response.raise_for_status()
    return prometheus_text.parse(response.text)


class ServiceExited(RuntimeError):
    """A service died while the deployment waited for it."""


class Service:
    """One process of the deployment."""

    def __init__(self, deployment: Deployment, role: str, name: str, argv: list[str],
                 process: subprocess.Popen[bytes], log: Path) -> None:
        self.deployment = deployment
        self.role = role
        self.name = name
        self.argv = argv
        self.process = process
        self.log = log
        # Killed on purpose by a test: its exit is no failure (`Deployment.check_alive`).
        self.retired = False

    def __repr__(self) -> str:
        return f"<Service {self.name} pid={self.pid} alive={self.alive()}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stopped(self) -> bool:
        """The process is stopped by a signal (state T in /proc)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "T"
        except FileNotFoundError:
            return False

    def cut_connections(self, endpoint: str) -> int:
        """Shut down this process's established TCP connections to `endpoint` (`tcp://host:port`
        on this host, as in a discovery record), as a network fault would (a reset, a middlebox
        dropping them): both processes live on. Takes the sockets with pidfd_getfd (Linux >=
        5.6; the process is our child). Returns how many were cut."""
        port = int(endpoint.rsplit(":", 1)[1])
        inodes = set()
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{self.pid}/net/{table}") as f:
                for line in list(f)[1:]:
                    fields = line.split()  # remote address is fields[2]; state 01: established
                    if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                        inodes.add(f"socket:[{fields[9]}]")
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(self.pid)
        cut = 0
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    if os.readlink(f"/proc/{self.pid}/fd/{fd}") not in inodes:
                        continue
                except OSError:
                    continue  # closed meanwhile
                ours = libc.syscall(PIDFD_GETFD, pidfd, int(fd), 0)
                if ours < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd")
                with socket.socket(fileno=ours) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
                cut += 1
        finally:
            os.close(pidfd)
        return cut

    def output(self, tail_chars: int | None = None) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if tail_chars is None else text[-tail_chars:]

    def check_alive(self) -> None:
        if not self.alive():
            raise ServiceExited(f"{self.name} exited with code {self.returncode}:\n"
                                f"{self.output(4000)}")

    def record(self) -> dict[str, Any] | None:
        """This process's discovery record (matched by pid), if registered."""
        return next((r for r in self.deployment.records()
                     if r.get("metadata", {}).get("pid") == self.pid), None)

    @property
    def instance_id(self) -> str:
        rec = self.record()
        if rec is None:
            raise LookupError(f"{self.name} is not registered")
        return str(rec["id"])

    def metrics_url(self) -> str:
        rec = self.record()
        if rec is None or not rec.get("endpoints", {}).get("metrics"):
            raise LookupError(f"{self.name} has no registered metrics endpoint")
        return str(rec["endpoints"]["metrics"])

    def metrics(self) -> Metrics:
        return scrape(self.metrics_url())


class Deployment:
    """Router(s), workers, frontend(s) and planners, each a real process."""

    def __init__(self, workdir: Path, *, command: Sequence[str] = PYTHON_TURNOUT,
                 lease_ttl_s: float | None = 2.0, env: dict[str, str] | None = None,
                 extra: Sequence[str] = (), curve: bool | None = None) -> None:
        """`command` launches the `turnout` CLI; `lease_ttl_s` (None: the services' default)
        and `extra` flags go to every service started by role; `curve` (None: whether
        TURNOUT_TEST_CURVE is 1) starts every service with fleet keys."""
        self.workdir = workdir
        self.discovery = workdir / "discovery"
        self.discovery.mkdir(parents=True, exist_ok=True)
        self.command = list(command)
        self.lease_ttl_s = lease_ttl_s
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        if curve is None:
            curve = bool(curve_from_environment())
        self.keys_dir: Path | None = None
        if curve:
            from common.fleet_keys import generate

            self.keys_dir = workdir / "keys"
            generate(self.keys_dir)
            self.env["TURNOUT_KEYS_DIR"] = str(self.keys_dir)
        self.extra = list(extra)
        self.services: list[Service] = []
        self.port = 0
        self._workers = 0

    def fleet_socket(self, ctx: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
        """A ZeroMQ socket as this deployment's processes hold one, for a test that plays a
        part of the fleet: with its keys (when it runs with them) a PUB is a CURVE server
        proving the fleet secret and any other socket a CURVE client presenting the fleet key;
        plain otherwise. Bind or connect it as usual."""
        sock = ctx.socket(kind)
        if self.keys_dir is not None:
            from common.fleet_keys import load

            keys = load(self.keys_dir)
            sock.curve_secretkey = keys.secret
            if kind == zmq.PUB:
                sock.curve_server = True
            else:
                sock.curve_publickey, sock.curve_serverkey = keys.public, keys.public
        return sock

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- starting ------------------------------------------------------------------------------

    def spawn(self, role: str, name: str, argv: Sequence[str]) -> Service:
        """Start `turnout <argv...>` (argv begins with the subcommand; nothing is added to it);
        its output goes to `<workdir>/<name>.log`."""
        cmd = [*self.command, *argv]
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            # Own process group: a signal meant for the test runner does not reach the
            # services, and stop() can reach a service's children through it. Not a session of
            # its own: see turnout/up.py on autogroup scheduling.
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, cwd=ROOT, env=self.env,
                                       process_group=0)
        service = Service(self, role, name, cmd, process, log)
        self.services.append(service)
        return service

    def _common(self) -> list[str]:
        """Flags every service started by role gets: this deployment's discovery and lease."""
        flags = ["--discovery", f"file:{self.discovery}"]
        if self.lease_ttl_s is not None:
            flags += ["--lease-ttl-s", f"{self.lease_ttl_s:g}"]
        return [*flags, *self.extra]

    def start_router(self, *args: str, wait: bool = True, name: str = "router") -> Service:
        service = self.spawn("router", name, ["router", *self._common(), *args])
        if wait:
            self.wait_registered(service)
        return service

    def start_worker(self, *args: str, worker_id: str | None = None,
                     wait: bool = True) -> Service:
        """A worker called `worker_id` (default w1, w2, ... in start order)."""
        self._workers += 1
        worker_id = worker_id or f"w{self._workers}"
        service = self.spawn("worker", worker_id,
                             ["worker", "--worker-id", worker_id, *self._common(), *args])
        if wait:
            self.wait_registered(service)
        return service

    def start_frontend(self, *args: str, port: int | None = None, wait: bool = True,
                       name: str = "frontend") -> Service:
        self.port = port or free_port()
        service = self.spawn("frontend", name,
                             ["frontend", "--port", str(self.port), *self._common(), *args])
        if wait:
            self.wait_registered(service)
        return service

    def start_planner(self, *args: str, wait: bool = True, name: str = "planner") -> Service:
        service = self.spawn("planner", name, ["planner", *self._common(), *args])
        if wait:
            self.wait_registered(service)
        return service

    def start(self, workers: int = 2, worker_args: Sequence[str] = (),
              router_args: Sequence[str] = (), frontend_args: Sequence[str] = (),
              timeout: float = 30, routers: int = 1) -> None:
        """`routers` routers (router, router-2, ...), `workers` workers and a frontend; returns
        once the frontend is healthy and every router routes to every worker."""
        for i in range(routers):
            self.start_router(*router_args, name="router" if i == 0 else f"router-{i + 1}")
        for _ in range(workers):
            self.start_worker(*worker_args)
        self.start_frontend(*frontend_args)
        self.wait_healthy(timeout)
        self.wait_routable(workers, timeout)

    def start_up(self, flags: Sequence[str], workers: int, port: int | None = None,
                 timeout: float = 120, prefill_workers: int = 0,
                 decode_workers: int = 0) -> None:
        """What `turnout up --workers N [--prefill-workers P --decode-workers D] <flags>`
        starts (its flags split among the services as `turnout up` splits them), each process
        managed here; returns once the frontend is healthy and the router routes to every
        worker."""
        from turnout.up import plan

        self.port = port or free_port()
        argv = [*flags, "--workers", str(workers), "--port", str(self.port),
                "--discovery", f"file:{self.discovery}"]
        if prefill_workers or decode_workers:
            argv += ["--prefill-workers", str(prefill_workers),
                     "--decode-workers", str(decode_workers)]
        if self.lease_ttl_s is not None:
            argv += ["--lease-ttl-s", f"{self.lease_ttl_s:g}"]
        if self.keys_dir is not None:  # `up` passes its own setting on, over the environment's
            argv += ["--keys-dir", str(self.keys_dir)]
        for child in plan(argv).children:
            # plan() writes `python -m turnout <role> ...`; this deployment's command instead.
            role = child.argv[3]
            self.spawn(role, child.name, child.argv[3:])
        for service in self.services:
            self.wait_registered(service, timeout)
        self.wait_healthy(timeout)
        self.wait_routable(workers + prefill_workers + decode_workers, timeout)

    # -- observing -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def by_role(self, role: str) -> list[Service]:
        return [s for s in self.services if s.role == role]

    def service(self, name: str) -> Service:
        found = next((s for s in self.services if s.name == name), None)
        if found is None:
            raise LookupError(f"no service called {name!r}")
        return found

    @property
    def router(self) -> Service:
        return self.by_role("router")[0]

    @property
    def frontend(self) -> Service:
        return self.by_role("frontend")[0]

    def workers(self) -> list[Service]:
        return self.by_role("worker")

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.discovery)

    def record(self, instance_id: str) -> dict[str, Any] | None:
        return next((r for r in self.records() if r["id"] == instance_id), None)

    def check_alive(self) -> None:
        """Raise `ServiceExited` for the first service that died, but for retired ones."""
        for service in self.services:
            if not service.retired:
                service.check_alive()

    def pause_whole(self, seconds: float, late: Service | None = None,
                    late_s: float = 0.0) -> None:
        """Every process stops at once for `seconds` (a paused VM, a SIGSTOP of the lot), then
        all resume; `late` only `late_s` after the others (a busy host runs it last)."""
        services = [s for s in self.services if s.alive()]
        for service in services:
            service.signal(signal.SIGSTOP)
        wait_for(lambda: all(s.stopped() for s in services), 10, "every process to stop",
                 interval=0.01)
        time.sleep(seconds)  # the pause itself
        for service in services:
            if service is not late:
                service.signal(signal.SIGCONT)
        if late is not None:
            time.sleep(late_s)  # part of the fault, like the pause
            late.signal(signal.SIGCONT)

    def wait_registered(self, service: Service, timeout: float = 30,
                        instance_id: str | None = None) -> dict[str, Any]:
        """`service`'s discovery record (or, with `instance_id`, that instance's: one the
        service starts, say) once registered; ServiceExited if `service` dies first."""
        def ready() -> dict[str, Any] | None:
            service.check_alive()
            return service.record() if instance_id is None else self.record(instance_id)

        return wait_for(ready, timeout, f"{instance_id or service.name} to register")

    def wait_healthy(self, timeout: float = 30) -> None:
        def ok() -> bool:
            self.check_alive()
            try:
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ok, timeout, "the frontend's /health to be 200")

    def routable(self) -> int:
        """Workers the first router routes to now."""
        return int(self.router.metrics().value("turnout_router_workers", state="routable"))

    def wait_routable(self, workers: int, timeout: float = 30) -> None:
        """Every live router routes to `workers` workers."""
        def ready() -> bool:
            self.check_alive()
            return all(int(r.metrics().value("turnout_router_workers", state="routable"))
                       >= workers for r in self.by_role("router"))

        wait_for(ready, timeout, f"every router to route to {workers} workers", interval=0.1)

    def metrics_of(self, instance_id: str) -> Metrics:
        """/metrics of a registered instance, by discovery id."""
        rec = self.record(instance_id)
        if rec is None:
            raise LookupError(f"{instance_id} is not registered")
        return scrape(rec["endpoints"]["metrics"])

    def frontend_metrics(self) -> Metrics:
        return scrape(self.url + "/metrics")

    def logs(self, tail_chars: int = 4000) -> str:
        """Every service's exit code and the end of its log, for a failure report."""
        return "\n".join(f"----- {s.name} pid {s.pid} (exit {s.returncode}) -----\n"
                         f"{s.output(tail_chars)}" for s in self.services)

    # -- stopping ------------------------------------------------------------------------------

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every service, role by role in STOP_ORDER (then any other), each group given
        `grace_s` after SIGTERM before SIGKILL; then kill what is left in their process groups
        (a service's own children) and reap."""
        ordered = [[s for s in self.services if s.role == role] for role in STOP_ORDER]
        ordered.append([s for s in self.services if s.role not in STOP_ORDER])
        for group in ordered:
            for service in group:
                service.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                service.signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for service in group:
                try:
                    service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    service.process.kill()
        # Every group is killed whatever one process did (a slow exit must not leave the
        # others running), then each is reaped.
        for service in self.services:
            try:
                os.killpg(service.pid, signal.SIGKILL)  # process_group=0: pgid == pid
            except (ProcessLookupError, PermissionError):
                pass
        for service in self.services:
            try:
                service.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass  # unkillable for now (uninterruptible sleep): the OS reaps it later

    close = stop


def reaped(dep: Deployment) -> Iterator[Deployment]:
    """Yield `dep`, then stop everything it started: a pytest fixture's body."""
    try:
        yield dep
    finally:
        dep.stop()
