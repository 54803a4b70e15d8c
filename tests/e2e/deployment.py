"""Real multi-process Turnout deployments for end-to-end tests.

`Deployment` starts each service as its own `python -m turnout ...` process on 127.0.0.1 (free
ports, a temporary file-discovery directory), waits with a bound for each to register, and
always reaps what it started (SIGKILL at the end if SIGTERM was not enough).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def read_records(directory: Path) -> list[dict]:
    """The discovery records in a file-discovery directory (half-written ones skipped)."""
    out = []
    for path in directory.glob("*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (labels as printed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metric(metrics: dict[str, float], name: str) -> float:
    """Sum of every series of `name` (any labels)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


class Service:
    def __init__(self, name: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.process.pid, sig)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Deployment:
    """Router + workers + frontend, each a real process."""

    def __init__(self, tmp: Path, extra: list[str] | None = None) -> None:
        self.tmp = tmp
        self.discovery = tmp / "discovery"
        self.discovery.mkdir(parents=True, exist_ok=True)
        self.extra = list(extra or [])
        self.services: list[Service] = []
        self.port = 0
        self._n = 0

    # -- starting ------------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str]) -> Service:
        log = self.tmp / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "turnout", *args, "--discovery", f"file:{self.discovery}",
                 "--lease-ttl-s", "2"],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        service = Service(name, proc, log)
        self.services.append(service)
        return service

    def start_router(self, *args: str) -> Service:
        return self.spawn("router", ["router", *self.extra, *args])

    def start_worker(self, *args: str, wait: bool = True) -> Service:
        self._n += 1
        worker_id = f"w{self._n}"
        service = self.spawn(worker_id, ["worker", "--worker-id", worker_id, *self.extra, *args])
        if wait:
            self.wait_registered(worker_id, service)
        return service

    def start_frontend(self, *args: str) -> Service:
        self.port = free_port()
        service = self.spawn("frontend", ["frontend", "--port", str(self.port), *self.extra,
                                          *args])
        self.wait_registered_role("frontend", service)
        return service

    def start(self, workers: int = 2, worker_args: tuple[str, ...] = (),
              router_args: tuple[str, ...] = (), frontend_args: tuple[str, ...] = ()) -> None:
        self.start_router(*router_args)
        for _ in range(workers):
            self.start_worker(*worker_args)
        self.start_frontend(*frontend_args)
        self.wait_healthy()

    # -- observing -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self) -> list[dict]:
        return read_records(self.discovery)

    def record(self, instance_id: str) -> dict | None:
        return next((r for r in self.records() if r["id"] == instance_id), None)

    def wait_registered(self, instance_id: str, service: Service, timeout: float = 30) -> dict:
        def ready() -> dict | None:
            if not service.alive():
                raise RuntimeError(f"{service.name} exited:\n{service.output()}")
            return self.record(instance_id)

        return wait_for(ready, timeout, f"{instance_id} to register")  # type: ignore[return-value]

    def wait_registered_role(self, role: str, service: Service, timeout: float = 30) -> None:
        def ready() -> bool:
            if not service.alive():
                raise RuntimeError(f"{service.name} exited:\n{service.output()}")
            return any(r["role"] == role and r.get("metadata", {}).get("pid") == service.pid
                       for r in self.records())

        wait_for(ready, timeout, f"{service.name} to register")

    def wait_healthy(self, timeout: float = 30) -> None:
        def ok() -> bool:
            try:
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ok, timeout, "frontend /health to be 200")

    def metrics_of(self, instance_id: str) -> dict[str, float]:
        rec = self.record(instance_id)
        assert rec is not None, f"{instance_id} is not registered"
        return parse_metrics(httpx.get(rec["endpoints"]["metrics"], timeout=5).text)

    def frontend_metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=5).text)

    # -- stopping ------------------------------------------------------------------------------

    def close(self) -> None:
        for service in self.services:
            if service.alive():
                try:
                    service.process.send_signal(signal.SIGCONT)
                    service.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for service in self.services:
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(timeout=5)
