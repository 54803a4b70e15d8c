"""`turnout up`: a whole deployment on this machine — router, N workers and a frontend.

Every flag of every service is accepted and passed through to the processes it belongs to, so
`turnout up --block-size 32 --router-mode least-loaded` means what it means on `turnout worker`
and `turnout router`. Discovery is a fresh temporary directory unless `--discovery` is given.

With `--planner` it also runs `turnout planner` (every planner flag accepted: `--min-replicas`,
`--ttft-slo-ms`, `--planner-mode`, ...; without `--planner` they are refused) and the planner
starts and drains the workers: `up` starts none of its own unless `--workers`,
`--prefill-workers` or `--decode-workers` is given, and those are a fixed base the planner adds
to but never drains. The planner's workers get `up`'s worker and engine flags unless
`--worker-args` (or `--prefill-worker-args`/`--decode-worker-args`) says otherwise;
`--prefill-workers`/`--decode-workers` imply `--planner-mode disaggregated`.
It prints the URL once the frontend is healthy and stops everything on Ctrl-C/SIGTERM.

Every child's output comes through `up`'s stderr, each line prefixed with the child's name, and
`up` keeps each child's last lines: a process that dies is named with its exit code and what it
wrote last, and once every worker has died `up` stops at once. Real engines can take minutes to
load, so startup has no deadline while it progresses: each worker's stage (from its output: loading
model, warming up; ready once it registers in discovery) is shown as it changes, and `up` gives up
only after `--startup-timeout-s` without progress (new output, CPU time used by a worker's process
tree, a worker registering).

A plain supervisor: synchronous on purpose (one `select` loop over the children's pipes; blocking
waits are fine).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import re
import selectors
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from common.config import StartupRefused, flag_given, opt, parse_configs, to_argv
from common.discovery import Discovery, open_discovery
from common.messages import MODE_ENCODE, ROLE_WORKER
from common.service import SUPERVISOR_ENV
from services.frontend.args import FrontendConfig
from services.frontend.main import listen_socket
from services.planner.args import PlannerConfig
from services.router.args import RouterConfig
from services.worker.args import DEFAULT_EMBEDDING_CACHE_MB, WorkerConfig
from services.worker.engines import engine_argv, engine_config_classes, split_refusal
from turnout.local_fleets import new_up_discovery


@dataclasses.dataclass
class UpConfig:
    workers: int = opt(2, help="number of aggregated worker processes (0 by default when "
                               "--prefill-workers or --decode-workers is given)")
    prefill_workers: int = opt(0, help="number of prefill workers (--worker-mode prefill)")
    decode_workers: int = opt(0, help="number of decode workers (--worker-mode decode)")
    encode_workers: int = opt(0, help="number of encode workers (--worker-mode encode): chat "
                                      "images are encoded there, not on the LLM workers")
    routers: int = opt(1, help="number of router processes (replicas: each frontend spreads "
                               "requests over them and resumes a lost one's streams elsewhere)")
    planner: bool = opt(False, help="also run `turnout planner`, which starts and drains the "
                                    "workers (the worker counts then default to 0)")
    startup_timeout_s: float = opt(
        600.0, help="give up starting once no process still starting has shown progress (new "
                    "output, CPU time, a worker ready) for this long; 0: wait as long as it takes")


# A worker's startup stage, from the last line of its output that names one (vLLM's own log,
# the mocker's simulated load); "ready" comes from discovery instead.
_STAGES: Final = (
    ("warming up", re.compile(r"warm|compil|cuda graph|profil|kv cache", re.IGNORECASE)),
    ("loading model", re.compile(r"load|weight|download|shard", re.IGNORECASE)),
)
TAIL_LINES: Final = 12
PROGRESS_EVERY_S: Final = 10.0
# CPU seconds a starting process tree must burn between checks to count as progress (an idle
# asyncio loop burns next to none).
_CPU_PROGRESS_S: Final = 0.05


@dataclasses.dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    critical: bool = True  # if it dies, the deployment stops
    is_worker: bool = False
    reported: bool = False
    ready_at: float | None = None  # a worker: when it registered
    stage: str = "starting"
    tail: collections.deque[str] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    partial: bytes = b""
    progress_at: float = 0.0  # last output, CPU use or registration
    cpu_s: float = 0.0

    def take_output(self, data: bytes, now: float) -> None:
        """Forwards what the process wrote (prefixed with its name) and keeps its last lines."""
        self.progress_at = now
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > 65536:  # a progress bar without newlines
            lines.append(self.partial)
            self.partial = b""
        out = sys.stderr.buffer
        for raw in lines:
            text = raw.decode("utf-8", "replace").rsplit("\r", 1)[-1].rstrip()
            out.write(f"[{self.name}] {text}\n".encode())
            if text:
                self.tail.append(text)
                if self.is_worker and self.ready_at is None:
                    self._see_stage(text)
        out.flush()

    def _see_stage(self, line: str) -> None:
        for stage, pattern in _STAGES:
            if pattern.search(line):
                self.stage = stage
                return

    def flush_partial(self) -> None:
        if self.partial:
            self.take_output(b"\n", self.progress_at)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@dataclasses.dataclass
class Plan:
    up: UpConfig
    children: list[Child]
    url: str
    model: str
    tmp: str | None  # temporary discovery directory to delete afterwards
    discovery: str  # where the workers register
    planner: PlannerConfig | None = None  # with --planner


def plan(argv: Sequence[str]) -> Plan:
    """The processes to start and where the deployment will answer."""
    # Engines first: a flag both declare (--max-model-len) takes the engine's default.
    engine_classes = engine_config_classes()
    classes = [UpConfig, *engine_classes, FrontendConfig, RouterConfig, WorkerConfig,
               PlannerConfig]
    up, *rest = parse_configs(classes, argv, prog="turnout up")
    engines = rest[: len(engine_classes)]
    frontend, router, worker, planner = rest[len(engine_classes):]
    if up.prefill_workers < 0 or up.decode_workers < 0:
        raise SystemExit("turnout up: --prefill-workers and --decode-workers must be >= 0")
    split = up.prefill_workers or up.decode_workers
    if (split or up.planner) and not flag_given(argv, "workers"):
        up.workers = 0  # the split replaces the default workers; a planner starts its own
    if not up.planner:
        own = {f.name for f in dataclasses.fields(PlannerConfig)} - {
            f.name for c in classes[:-1] for f in dataclasses.fields(c)}
        given = sorted("--" + name.replace("_", "-") for name in own if flag_given(argv, name))
        if given:
            raise SystemExit(f"turnout up: {', '.join(given)} configure the planner: add "
                             f"--planner")
    if up.workers < 0 or (not up.planner
                          and up.workers + up.prefill_workers + up.decode_workers < 1):
        raise SystemExit("turnout up: --workers must be at least 1 (or give "
                         "--prefill-workers/--decode-workers, or --planner)")
    if up.prefill_workers and not (up.workers or up.decode_workers or up.planner):
        raise SystemExit("turnout up: --prefill-workers needs a worker to decode: add "
                         "--decode-workers (or --workers)")
    if split and worker.worker_mode != "aggregated":
        raise SystemExit("turnout up: give either --worker-mode or --prefill-workers/"
                         "--decode-workers, not both")
    if up.encode_workers < 0:
        raise SystemExit("turnout up: --encode-workers must be >= 0")
    if worker.worker_mode == "encode":
        raise SystemExit("turnout up: give --encode-workers rather than --worker-mode encode "
                         "(the LLM workers are needed too)")
    if worker.embedding_cache_mb != DEFAULT_EMBEDDING_CACHE_MB and not up.encode_workers:
        raise SystemExit("turnout up: --embedding-cache-mb needs --encode-workers")
    if up.planner and split:
        if flag_given(argv, "planner_mode") and planner.planner_mode != "disaggregated":
            raise SystemExit("turnout up: --prefill-workers/--decode-workers are pools of "
                             "--planner-mode disaggregated")
        planner.planner_mode = "disaggregated"
    modes = [worker.worker_mode, *(["prefill"] if up.prefill_workers else []),
             *(["decode"] if up.decode_workers else []),
             *(["prefill"] if up.planner and planner.planner_mode == "disaggregated" else [])]
    for mode in modes:
        if refusal := split_refusal(worker.engine, mode):
            raise SystemExit(f"turnout up: {refusal}")
    if up.planner and worker.worker_mode != "aggregated":
        raise SystemExit("turnout up: with --planner, the planner gives its workers their "
                         "--worker-mode (use --planner-mode disaggregated)")
    if up.routers < 1:
        raise SystemExit("turnout up: --routers must be at least 1")
    if up.routers > 1 and (router.router_port or router.router_metrics_port
                           or router.router_event_port):
        raise SystemExit("turnout up: with --routers > 1 leave --router-port, "
                         "--router-metrics-port and --router-event-port at 0")
    if not up.startup_timeout_s >= 0:  # NaN too
        raise SystemExit("turnout up: --startup-timeout-s must be >= 0 (0: no limit)")
    if frontend.port:
        # Else another deployment's frontend would answer the readiness checks, and this one
        # would say it is up before its own frontend fails to listen.
        try:
            listen_socket(frontend.host, frontend.port).close()
        except StartupRefused as exc:
            raise SystemExit(f"turnout up: {exc}") from None
    tmp: str | None = None
    if not flag_given(argv, "discovery"):
        tmp = new_up_discovery()
        for cfg in (frontend, router, worker, planner):
            cfg.discovery = f"file:{tmp}"
    py = [sys.executable, "-m", "turnout"]
    children = []
    for i in range(up.routers):
        rid = router.router_id and (f"{router.router_id}-{i + 1}" if up.routers > 1
                                    else router.router_id)
        r = dataclasses.replace(router, router_id=rid)
        name = "router" if up.routers == 1 else f"router-{i + 1}"
        # With replicas, one router lost is survived (its streams resume on the others).
        children.append(Child(name, [*py, "router", *to_argv(r)], critical=up.routers == 1))
    roles = [("worker", worker.worker_mode, up.workers),
             ("prefill", "prefill", up.prefill_workers), ("decode", "decode", up.decode_workers),
             ("encode", "encode", up.encode_workers)]
    for name, mode, count in roles:
        for i in range(count):
            suffix = f"{i + 1}" if name == "worker" else f"{name}-{i + 1}"
            wid = worker.worker_id and f"{worker.worker_id}-{suffix}"
            w = dataclasses.replace(worker, worker_id=wid, worker_mode=mode)
            if mode != "encode":  # the embedding cache is the encode workers' only
                w.embedding_cache_mb = DEFAULT_EMBEDDING_CACHE_MB
            children.append(Child(f"{name}-{i + 1}", [*py, "worker", *to_argv(w),
                                                      *engine_argv(mode, worker.engine, engines)],
                                  critical=False, is_worker=True))
    children.append(Child("frontend", [*py, "frontend", *to_argv(frontend)]))
    if up.planner:
        # Its workers run as up's would; the planner adds discovery, model and mode itself.
        own = [f.name for f in dataclasses.fields(WorkerConfig)
               if f.name not in ("worker_id", "worker_mode", "embedding_cache_mb")]
        if not planner.worker_args:
            planner.worker_args = shlex.join([
                *to_argv(worker, only=own),
                *engine_argv(worker.worker_mode, worker.engine, engines)])
        if (planner.encode_max_replicas and not planner.encode_worker_args
                and worker.engine != "mocker"):
            # Its encode workers (a real engine's run only the vision encoder) take no engine
            # flags but the block size.
            planner.encode_worker_args = shlex.join([
                *to_argv(worker, only=own),
                *engine_argv(MODE_ENCODE, worker.engine, engines)])
        children.append(Child("planner", [*py, "planner", *to_argv(planner)]))
    host = frontend.advertise_host or frontend.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    scheme = "https" if frontend.ssl_certfile else "http"
    return Plan(up, children, f"{scheme}://{host}:{frontend.port}", frontend.model_name(), tmp,
                worker.discovery, planner if up.planner else None)


def healthy(url: str) -> bool:
    context = None
    if url.startswith("https:"):  # our own child's readiness, not its certificate, is checked
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url + "/health", timeout=1, context=context) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _say(text: str) -> None:
    print(f"turnout up: {text}", file=sys.stderr, flush=True)


def _process_cpu() -> dict[int, tuple[int, float]]:
    """pid → (parent pid, CPU seconds) of every process, from /proc ({} where there is none)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[int, tuple[int, float]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        try:
            out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        except (IndexError, ValueError):
            continue
    return out


def _tree_cpu(pid: int, table: dict[int, tuple[int, float]]) -> float:
    """CPU seconds of `pid` and its live descendants (vLLM's engine core is a child)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for p, (parent, _) in table.items():
        children[parent].append(p)
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        if p in table:
            total += table[p][1]
        stack.extend(children.get(p, ()))
    return total


class Supervisor:
    """Starts the children, forwards their output, follows the workers' startup and stops
    everything when the deployment can no longer serve."""

    def __init__(self, p: Plan) -> None:
        self.plan = p
        self.children = p.children
        self.workers = [c for c in p.children if c.is_worker]
        self.selector = selectors.DefaultSelector()
        self.started_at = 0.0
        self.ready = False  # the frontend answered /health
        self.stopping = False
        self.code = 0
        self._next_check = 0.0
        self._next_report = 0.0
        self._last_stages = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._discovery: Discovery | None = None

    # -- processes and their output ------------------------------------------------------------

    def start(self) -> None:
        now = time.monotonic()
        self.started_at = now
        self._next_report = now + PROGRESS_EVERY_S
        supervised = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
        for child in self.children:
            # Own process group: a Ctrl-C reaches `up` alone, which then stops the children in
            # order instead of all of them dying at once mid-stream. Not a session of its own:
            # with autogroup scheduling (on in many distributions' kernels) every session is a
            # scheduling group, and a CPU engine's busy threads then kept the router off both
            # cores of a 2-core host for over ten seconds (its lease ran out mid-stream).
            # With our pid in its environment a service stops when we are gone, even killed.
            child.process = proc = subprocess.Popen(
                child.argv, process_group=0, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=supervised)
            assert proc.stdout is not None
            os.set_blocking(proc.stdout.fileno(), False)
            self.selector.register(proc.stdout, selectors.EVENT_READ, child)
            child.progress_at = now
        try:
            self._discovery = open_discovery(self.plan.discovery)
            self._loop = asyncio.new_event_loop()
        except Exception as exc:  # readiness per worker is a nicety; /health still decides
            _say(f"cannot read discovery ({exc}); not following workers one by one")

    def pump(self, timeout: float) -> None:
        """Forwards the output that arrives within `timeout` seconds."""
        if not self.selector.get_map():
            time.sleep(timeout)
            return
        for key, _ in self.selector.select(timeout):
            self._read(key.data)

    def _read(self, child: Child) -> bool:
        """Reads what `child` wrote; False once nothing more is there right now."""
        assert child.process is not None and child.process.stdout is not None
        try:
            data = os.read(child.process.stdout.fileno(), 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if data:
            child.take_output(data, time.monotonic())
            return True
        self.selector.unregister(child.process.stdout)
        child.process.stdout.close()
        child.flush_partial()
        return False

    def _drain(self, child: Child) -> None:
        """Everything an exited child left in its pipe (a descendant may still hold it open)."""
        assert child.process is not None
        stdout = child.process.stdout
        while stdout is not None and not stdout.closed and self._read(child):
            pass

    # -- startup and deaths -------------------------------------------------------------------

    def step(self) -> None:
        self.pump(0.2)
        self.check_exits()
        now = time.monotonic()
        if self.stopping or now < self._next_check:
            return
        self._next_check = now + 1.0
        self.check_workers(now)
        if not self.ready:
            self.check_startup(now)

    def check_exits(self) -> None:
        for child in self.children:
            assert child.process is not None
            rc = child.process.poll()
            if rc is None or child.reported:
                continue
            child.reported = True
            self._drain(child)
            last = "\n".join(f"    {line}" for line in list(child.tail)[-5:])
            _say(f"{child.name} (pid {child.process.pid}) exited with code {rc}"
                 + (f"; its last output:\n{last}" if last else " and wrote nothing"))
            if child.critical and not self.stopping:
                self._fail(f"{child.name} is needed; stopping")
        # With a planner, the workers it starts serve whether or not up's own (if any) live.
        if not self.stopping and self.plan.planner is None \
                and all(w.reported for w in self.workers):
            self._fail("every worker has exited; stopping" if len(self.workers) > 1
                       else "the worker has exited; stopping")

    def check_workers(self, now: float) -> None:
        starting = [w for w in self.workers if w.ready_at is None and not w.reported]
        if not starting:
            return
        registered = self._registered_pids()
        table = _process_cpu()
        for w in starting:
            assert w.process is not None
            if w.process.pid in registered:
                w.ready_at = w.progress_at = now
                w.stage = "ready"
                if self.ready:
                    _say(f"{w.name} ready after {now - self.started_at:.0f} s")
                continue
            cpu = _tree_cpu(w.process.pid, table)
            if cpu - w.cpu_s >= _CPU_PROGRESS_S:
                w.progress_at = now
            w.cpu_s = max(w.cpu_s, cpu)

    def _registered_pids(self) -> set[int]:
        if self._discovery is None or self._loop is None:
            return set()
        try:
            instances = self._loop.run_until_complete(
                asyncio.wait_for(self._discovery.list(role=ROLE_WORKER), 2.0))
        except Exception:
            return set()
        return {i.metadata.get("pid") for i in instances if isinstance(i.metadata.get("pid"), int)}

    def check_startup(self, now: float) -> None:
        if healthy(self.plan.url):
            self.ready = True
            loading = [w.name for w in self.workers if w.ready_at is None and not w.reported]
            count = len(self.workers)
            plural = "" if count == 1 else "s"
            fleet = (f"{count} worker{plural}" if self.plan.planner is None
                     else f"{count} fixed worker{plural}, the planner sizing the rest")
            print(f"Turnout is up: {self.plan.url}/v1 (model {self.plan.model!r}, "
                  f"{fleet}; Ctrl-C stops it)", flush=True)
            if loading:
                _say(f"still starting: {', '.join(loading)}")
            return
        summary = self.summary()
        stages = " ".join(w.stage for w in self.workers if not w.reported)
        if now - self.started_at >= 2 and (stages != self._last_stages
                                           or now >= self._next_report):
            self._last_stages = stages
            self._next_report = now + PROGRESS_EVERY_S
            _say(f"starting ({now - self.started_at:.0f} s): {summary}")
        timeout = self.plan.up.startup_timeout_s
        if timeout <= 0:
            return
        marks = [self.started_at, *(w.progress_at for w in self.workers if not w.reported),
                 *(w.ready_at for w in self.workers if w.ready_at is not None)]
        if now - max(marks) > timeout:
            self._fail(f"no progress for {timeout:.0f} s while starting ({summary}); stopping "
                       "(--startup-timeout-s 0 waits as long as it takes)")

    def summary(self) -> str:
        """Each live worker's stage, and what the frontend waits for."""
        parts = []
        for w in self.workers:
            if w.reported:
                continue
            part = f"{w.name} {w.stage}"
            if w.ready_at is None and w.tail:
                last = w.tail[-1]
                part += f" (last: {last if len(last) <= 100 else '…' + last[-99:]!r})"
            parts.append(part)
        if any(w.ready_at is not None for w in self.workers):
            parts.append("frontend not healthy yet")
        return ", ".join(parts)

    def _fail(self, why: str) -> None:
        _say(why)
        self.stopping = True
        self.code = 1

    # -- shutdown ------------------------------------------------------------------------------

    def stop_all(self, timeout: float = 10.0) -> None:
        # Frontend first (no new requests), then workers and router.
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
                c.process is not None and c.process.poll() is None for c in self.children):
            self.pump(0.1)  # a child blocked writing to a full pipe would never exit
        for child in self.children:
            proc = child.process
            if proc is None:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._drain(child)
        self.selector.close()
        if self._loop is not None:
            if self._discovery is not None:
                with contextlib.suppress(Exception):
                    self._loop.run_until_complete(self._discovery.close())
            self._loop.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    p = plan(args)
    supervisor = Supervisor(p)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        supervisor.start()
        while not supervisor.stopping:
            supervisor.step()
    finally:
        # A planner drains the workers it started before it exits: give it that long.
        supervisor.stop_all(10.0 if p.planner is None
                            else max(10.0, p.planner.worker_stop_timeout_s + 5))
        if p.tmp is not None:
            shutil.rmtree(p.tmp, ignore_errors=True)
    sys.exit(supervisor.code)
