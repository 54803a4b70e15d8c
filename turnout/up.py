"""`turnout up`: a whole deployment on this machine — router, N workers and a frontend.

Every flag of every service is accepted and passed through to the processes it belongs to, so
`turnout up --block-size 32 --router-mode least-loaded` means what it means on `turnout worker`
and `turnout router`. Discovery is a fresh temporary directory unless `--discovery` is given.
It prints the URL once the frontend is healthy, says which process died if one does, and stops
everything on Ctrl-C/SIGTERM.

A plain supervisor: synchronous on purpose (it runs no event loop, so blocking waits are fine).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from common.config import opt, parse_configs, to_argv
from services.frontend.args import FrontendConfig
from services.router.args import RouterConfig
from services.worker.args import WorkerConfig
from services.worker.engines import engine_config_classes


@dataclasses.dataclass
class UpConfig:
    workers: int = opt(2, help="number of worker processes")
    startup_timeout_s: float = opt(120.0, help="how long to wait for the frontend to be healthy")


@dataclasses.dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    critical: bool = True  # if it dies, the deployment stops
    reported: bool = False


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@dataclasses.dataclass
class Plan:
    up: UpConfig
    children: list[Child]
    url: str
    model: str
    tmp: str | None  # temporary discovery directory to delete afterwards


def plan(argv: Sequence[str]) -> Plan:
    """The processes to start and where the deployment will answer."""
    # Engines first: a flag both declare (--max-model-len) takes the engine's default.
    engine_classes = engine_config_classes()
    classes = [UpConfig, *engine_classes, FrontendConfig, RouterConfig, WorkerConfig]
    up, *rest = parse_configs(classes, argv, prog="turnout up")
    engines, (frontend, router, worker) = rest[: len(engine_classes)], rest[len(engine_classes):]
    if up.workers < 1:
        raise SystemExit("turnout up: --workers must be at least 1")
    tmp: str | None = None
    explicit = any(a == "--discovery" or a.startswith("--discovery=") for a in argv) \
        or "TURNOUT_DISCOVERY" in os.environ
    if not explicit:
        tmp = tempfile.mkdtemp(prefix="turnout-up-")
        for cfg in (frontend, router, worker):
            cfg.discovery = f"file:{tmp}"
    py = [sys.executable, "-m", "turnout"]
    children = [Child("router", [*py, "router", *to_argv(router)])]
    engine_argv: list[str] = []
    for cfg in engines:
        engine_argv += to_argv(cfg)
    for i in range(up.workers):
        wid = worker.worker_id and f"{worker.worker_id}-{i + 1}"
        w = dataclasses.replace(worker, worker_id=wid)
        children.append(Child(f"worker-{i + 1}", [*py, "worker", *to_argv(w), *engine_argv],
                              critical=False))
    children.append(Child("frontend", [*py, "frontend", *to_argv(frontend)]))
    host = frontend.advertise_host or frontend.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return Plan(up, children, f"http://{host}:{frontend.port}", frontend.model_name(), tmp)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_all(children: list[Child], timeout: float = 10.0) -> None:
    # Frontend first (no new requests), then workers and router.
    for child in reversed(children):
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        proc = child.process
        if proc is None:
            continue
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    p = plan(args)
    children, url = p.children, p.url
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        for child in children:
            # Own process group: a Ctrl-C reaches `up` alone, which then stops the children in
            # order instead of all of them dying at once mid-stream.
            child.process = subprocess.Popen(child.argv, start_new_session=True)
        deadline = time.monotonic() + p.up.startup_timeout_s
        ready = False
        while not stopping:
            for child in children:
                assert child.process is not None
                rc = child.process.poll()
                if rc is not None and not child.reported:
                    child.reported = True
                    print(f"turnout up: {child.name} (pid {child.process.pid}) exited with "
                          f"code {rc}", file=sys.stderr, flush=True)
                    if child.critical:
                        stopping = True
                        code = 1
            if not ready and not stopping:
                if healthy(url):
                    ready = True
                    print(f"Turnout is up: {url}/v1 (model {p.model!r}, "
                          f"{p.up.workers} workers; Ctrl-C stops it)", flush=True)
                elif time.monotonic() > deadline:
                    print(f"turnout up: the frontend was not healthy after "
                          f"{p.up.startup_timeout_s:.0f} s", file=sys.stderr, flush=True)
                    stopping = True
                    code = 1
            time.sleep(0.2)
    finally:
        stop_all(children)
        if p.tmp is not None:
            shutil.rmtree(p.tmp, ignore_errors=True)
    sys.exit(code)
