"""Fault injection: what streaming clients see when a worker dies, hangs or is told to stop.

Owns: starting a fresh two-worker deployment per scenario (Turnout: the processes `turnout up`
would start, each through `turnout.testing.deployment`, mocker workers at speed-up 1; NVIDIA
Dynamo 1.6.1's frontend + two mockers via `shared/anchors/dynamo/start.sh`), sending
`--streams` concurrent streaming `/v1/completions` requests of `--tokens` output tokens
(`ignore_eos`, greedy), signalling one worker at `--fault-at` seconds (SIGKILL: crash; SIGSTOP:
hung, SIGCONT'ed before cleanup; SIGTERM: asked to stop), and reading, per stream, every token
chunk's arrival time. It prints one JSON line per (system, fault, prompt, kv replicas): streams
completed/failed, failure detection (Turnout's router histogram; for both, a client-side bound),
the longest token gap per stream (p50/p99/max), tokens recomputed per migrated request
(Turnout's router histogram), wall time; then one summary line with the goals of the failover
issue. Every process it starts is killed on exit. Turnout can run disaggregated instead
(`--prefill-workers`, `--decode-workers`; `--fault-worker` names the worker hit).

Does not own the HTTP client (`bench/load_client.py`) or the servers' code.

    python bench/failover.py [--systems turnout,dynamo] [--faults kill,stop,term]
                             [--faults router-kill,router-stop,router-term,frontend-kill]
                             [--prompts short,long] [--streams 32] [--tokens 512] [--stall-cap 60]

Progress goes to stderr, JSON lines to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.utils import floatToGoString

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from load_client import (  # noqa: E402  (path set up just above)
    LoadResult,
    RequestRecord,
    percentile,
    run,
    run_load,
    served_models,
)

from common.free_port import free_port  # noqa: E402
from common.prometheus_text import Metrics  # noqa: E402
from turnout.testing.deployment import Deployment as LocalDeployment  # noqa: E402
from turnout.testing.deployment import scrape_async  # noqa: E402

DYNAMO_START = Path(os.environ.get("DYNAMO_ANCHOR", "/work/shared/anchors/dynamo")) / "start.sh"
DYNAMO_INSTALL = DYNAMO_START.parent / "install.sh"
DYNAMO_VENV = Path(os.environ.get("DYNAMO_VENV", "/tmp/dynamo-anchor"))
FAULTS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM,
          # Turnout only (two routers): one router killed, frozen or drained; the frontend
          # killed (its clients' streams end with it; what counts is the work left running).
          "router-kill": signal.SIGKILL, "router-stop": signal.SIGSTOP,
          "router-term": signal.SIGTERM, "frontend-kill": signal.SIGKILL}
ROUTER_FAULTS = ("router-kill", "router-stop", "router-term")
WORKERS = 2


def log(msg: str) -> None:
    print(f"[failover {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Deployments
# ---------------------------------------------------------------------------------------------


class Deployment:
    """A running two-worker deployment: URL, worker processes, and how to tear it all down."""

    system = ""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.proc: asyncio.subprocess.Process | None = None  # session leader we started
        self.known: dict[int, psutil.Process] = {}  # every descendant ever seen, for cleanup

    async def start(self, timeout_s: float) -> None:
        raise NotImplementedError

    def workers(self) -> list[psutil.Process]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}

    async def router_metrics(self) -> Metrics | None:
        return None

    def _remember(self, roots: list[int]) -> None:
        for pid in roots:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                for q in [p, *p.children(recursive=True)]:
                    self.known.setdefault(q.pid, q)

    def _leaders(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    async def stop(self) -> None:
        """SIGCONT first (a stopped process cannot act on SIGTERM), then SIGTERM to the whole
        tree and every process group in it, then SIGKILL to whatever is left."""
        self._remember(self._leaders())
        procs = [p for p in self.known.values() if _running(p)]
        groups: set[int] = set()
        for p in procs:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                groups.add(os.getpgid(p.pid))
        groups.update(self._leaders())
        for sig in (signal.SIGCONT, signal.SIGTERM):
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
        loop = asyncio.get_running_loop()
        _, alive = await loop.run_in_executor(None, lambda: psutil.wait_procs(procs, 15))
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        await loop.run_in_executor(None, lambda: psutil.wait_procs(alive, 5))
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class TurnoutDeployment(Deployment):
    system = "turnout"

    def __init__(self, log_dir: Path, model: Path, router_mode: str, kv_replicas: int,
                 migration_limit: int, extra_args: list[str], routers: int = 1,
                 prefill_workers: int = 0, decode_workers: int = 0) -> None:
        super().__init__(log_dir)
        self.prefill_workers, self.decode_workers = prefill_workers, decode_workers
        # One log per process in log_dir; the services' own default lease, as `turnout up`.
        self.local = LocalDeployment(log_dir, lease_ttl_s=None)
        self.flags = ["--engine", "mocker", "--speedup-ratio", "1", "--router-mode", router_mode,
                      "--kv-replicas", str(kv_replicas), "--migration-limit",
                      str(migration_limit), "--model", str(model), "--log-level", "info",
                      "--routers", str(routers),
                      # Long prompts plus their output exceed the tiny model's 4,096-token
                      # context, which is the worker's default limit; the mocker has no such bound.
                      "--max-model-len", "65536", *extra_args]

    async def start(self, timeout_s: float) -> None:
        log(f"turnout: up-style flags {shlex.join(self.flags)} (logs {self.log_dir})")
        # Returns once the frontend is healthy and the router routes to both workers.
        self.local.start_up(self.flags, 0 if self.prefill_workers or self.decode_workers
                            else WORKERS, port=self.port, timeout=timeout_s,
                            prefill_workers=self.prefill_workers,
                            decode_workers=self.decode_workers)

    def worker_named(self, name: str) -> psutil.Process:
        names = [w.name for w in self.local.workers()]
        if name not in names:
            raise RuntimeError(f"--fault-worker {name}: no such worker (workers: {names})")
        return psutil.Process(self.local.service(name).pid)

    def workers(self) -> list[psutil.Process]:
        found = []
        for service in self.local.workers():
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(service.pid))
        return sorted(found, key=lambda p: p.pid)

    async def router_metrics(self) -> Metrics | None:
        try:
            return await scrape_async(self.local.router.metrics_url(), within_s=3.0)
        except (LookupError, OSError, httpx.HTTPError, ValueError):
            return None

    async def stop(self) -> None:
        self.local.stop(grace_s=15)

    def _log_lines(self, roles: tuple[str, ...]) -> list[str]:
        lines = []
        for service in self.local.services:
            if service.role in roles:
                lines += service.output().splitlines()
        return lines

    def verdicts(self) -> list[dict[str, Any]]:
        """The router's 'worker declared dead' log lines: key=value fields, plus `at`, the
        line's wall-clock time (ms resolution)."""
        out = []
        for line in self._log_lines(("router",)):
            if "worker declared dead" in line:
                fields: dict[str, Any] = dict(re.findall(r"(\w+)=(\S+)", line))
                with contextlib.suppress(ValueError):
                    stamp = datetime.datetime.strptime(line.split(" ", 1)[0],
                                                       "%Y-%m-%dT%H:%M:%S.%fZ")
                    fields["at"] = stamp.replace(tzinfo=datetime.UTC).timestamp()
                out.append(fields)
        return out

    def log_problems(self, limit: int = 12) -> list[str]:
        """Warning/error lines other than the expected verdict, for the progress log."""
        lines = []
        for line in self._log_lines(("router", "worker", "frontend")):
            if (" warning " in line or " error " in line or "Traceback" in line) \
                    and "worker declared dead" not in line:
                lines.append(line)
        return lines[-limit:]


class DynamoDeployment(Deployment):
    system = "dynamo"

    def __init__(self, log_dir: Path, model: Path, migration_limit: int) -> None:
        super().__init__(log_dir)
        self.model = model
        self.migration_limit = migration_limit
        self.kv_dir = log_dir / "file-kv"
        self.pids: list[int] = []

    async def start(self, timeout_s: float) -> None:
        self.kv_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "DYNAMO_LOGS": str(self.log_dir), "DYN_FILE_KV": str(self.kv_dir),
               "DYNAMO_VENV": str(DYNAMO_VENV)}
        cmd = ["bash", str(DYNAMO_START), str(self.model), str(self.port), str(WORKERS), "1",
               str(self.migration_limit)]
        log(f"dynamo: {shlex.join(cmd)} (logs {self.log_dir})")
        # start.sh backgrounds everything in its own process group and exits once the model is
        # listed; its pids go to a file (a pipe would stay open through the children).
        pid_file = self.log_dir / "pids"
        with pid_file.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=out, env=env,
                preexec_fn=os.setpgrp)
        await asyncio.wait_for(self.proc.wait(), timeout_s)
        self.pids = [int(x) for x in pid_file.read_text().split()]
        self._remember(self.pids)
        if self.proc.returncode != 0 or len(self.pids) != WORKERS + 1:
            raise RuntimeError(f"dynamo failed to start (rc {self.proc.returncode}); "
                               f"logs in {self.log_dir}")
        # /v1/models lists the model once one worker is up: wait for both instances.
        deadline = time.monotonic() + timeout_s
        instances = self.kv_dir / "v1" / "instances"
        while len([p for p in instances.glob("*") if "generate" in p.name]) < WORKERS:
            if time.monotonic() > deadline:
                raise RuntimeError("dynamo: both mockers never registered")
            await asyncio.sleep(0.2)

    def _leaders(self) -> list[int]:
        return [*super()._leaders(), *self.pids]

    def workers(self) -> list[psutil.Process]:
        out = []
        for pid in self.pids[1:]:
            with contextlib.suppress(psutil.Error):
                out.append(psutil.Process(pid))
        return out


def _by_label(metrics: Metrics, name: str, label: str) -> dict[str, int]:
    """`name`'s non-zero series by one label's value."""
    return {k: int(v) for k, v in metrics.by_label(name, label).items() if v}


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------


# Stdlib docstrings: plain English the tiny tokenizer was trained on, the same on every machine.
_LONG_SOURCES = ("asyncio", "collections", "functools", "itertools", "pathlib", "re", "string",
                 "argparse", "logging", "json", "textwrap", "dataclasses", "contextlib", "heapq",
                 "bisect", "statistics", "fractions", "decimal", "datetime", "enum", "queue")


def build_prompts(kind: str, n: int, model: Path, long_tokens: int) -> list[str]:
    """`n` distinct prompts (a numbered header first, so no two share a KV block)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    count = lambda text: len(tokenizer.encode(text).ids)  # noqa: E731
    if kind == "short":
        return [f"Request {i} of {n}: tell a short story about a railway switch and a tired "
                f"old train." for i in range(n)]
    import importlib

    words: list[str] = []
    for name in _LONG_SOURCES:
        words += (importlib.import_module(name).__doc__ or "").split()
    header = f"Request {n - 1} of {n}. Summarise these notes:"
    if count(f"{header} {' '.join(words)}") < long_tokens:
        raise SystemExit(f"not enough text for {long_tokens}-token prompts")
    lo, hi = 1, len(words)  # fewest words that reach long_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if count(f"{header} {' '.join(words[:mid])}") >= long_tokens:
            hi = mid
        else:
            lo = mid + 1
    body = " ".join(words[:lo + 8])  # a little slack: shorter headers tokenize shorter
    prompts = [f"Request {i} of {n}. Summarise these notes: {body}" for i in range(n)]
    short = min(count(p) for p in prompts)
    if short < long_tokens:
        raise SystemExit(f"long prompts came out at {short} tokens (< {long_tokens})")
    return prompts


@dataclasses.dataclass
class Scenario:
    system: str
    fault: str
    prompt: str
    kv_replicas: int | None  # Turnout only

    def label(self) -> str:
        rep = "" if self.kv_replicas is None else f" replicas={self.kv_replicas}"
        return f"{self.system} {self.fault} {self.prompt}{rep}"


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def arrivals(rec: RequestRecord) -> list[float]:
    """perf_counter times of every token chunk of a stream."""
    if rec.ttft is None:
        return []
    t = rec.start + rec.ttft
    out = [t]
    for gap in rec.itl:
        t += gap
        out.append(t)
    return out


def failure_of(rec: RequestRecord, tokens: int) -> str | None:
    if rec.error is not None:
        return rec.error
    if rec.output_tokens != tokens:
        return f"wrong token count: {rec.output_tokens} of {tokens}"
    return None


def stream_figures(records: list[RequestRecord], tokens: int, fault_t: float) -> dict[str, Any]:
    """Per-stream longest gap (a failed stream's silence until it ended or was given up counts
    too), and client-side detection: for every stream with tokens on both sides of the fault,
    the time from the fault to its next token. Streams on the surviving worker resume within
    an ITL, so the p50 is only meaningful beside the max, which bounds detection + re-placement
    + re-prefill of the moved streams from above."""
    longest: list[float] = []
    after_fault: list[float] = []  # gaps that end after the fault: the fault's own effect
    resume: list[float] = []
    for rec in records:
        times = arrivals(rec)
        failed = failure_of(rec, tokens) is not None
        gaps = [(b - a, b) for a, b in itertools.pairwise(times)]
        if failed and times and rec.e2e is not None:
            gaps.append((rec.start + rec.e2e - times[-1], rec.start + rec.e2e))
        if gaps:
            longest.append(max(g for g, _ in gaps))
            late = [g for g, end in gaps if end > fault_t]
            if late:
                after_fault.append(max(late))
        after = [t for t in times if t > fault_t]
        if not failed and after and times[0] <= fault_t:
            resume.append(after[0] - fault_t)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    ttft = [rec.ttft for rec in records if rec.ttft is not None]
    return {
        "longest_gap_s_p50": r(percentile(longest, 50)),
        "longest_gap_s_p99": r(percentile(longest, 99)),
        "longest_gap_s_max": r(max(longest) if longest else None),
        "longest_gap_after_fault_s_max": r(max(after_fault) if after_fault else None),
        "detection_client_s_p50": r(percentile(resume, 50)),
        "detection_client_s_max": r(max(resume) if resume else None),
        "streams_across_fault": len(resume),
        "ttft_s_max": r(max(ttft) if ttft else None),
    }


async def wait_serving(dep: Deployment, model_hint: str, prompts: list[str],
                       timeout_s: float) -> str:
    """The served model name, once a short completion works twice (round-robin: each worker)."""
    deadline = time.monotonic() + timeout_s
    last = "no model listed"
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            models = await served_models(dep.base_url)
            model = model_hint if model_hint in models else (models[0] if models else "")
            if model:
                probe = await run_load(dep.base_url, model, prompts, 1, 2, 2,
                                       extra_body={"temperature": 0}, request_timeout=20.0)
                errors = [r.error for r in probe.records if r.error]
                if not errors:
                    return model
                last = errors[0]
        await asyncio.sleep(0.3)
    raise RuntimeError(f"{dep.system} not serving after {timeout_s:.0f}s ({last})")


async def run_scenario(sc: Scenario, args: argparse.Namespace, model: Path,
                       prompts: list[str], references: dict[str, list[int]]) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix=f"failover-{sc.system}-{sc.fault}-{sc.prompt}-",
                                    dir=args.log_root))
    dep: Deployment
    if sc.system == "turnout":
        dep = TurnoutDeployment(log_dir, model, args.router_mode, sc.kv_replicas or 0,
                                args.migration_limit, shlex.split(args.turnout_args),
                                routers=2 if sc.fault in (*ROUTER_FAULTS, "frontend-kill")
                                else 1, prefill_workers=args.prefill_workers,
                                decode_workers=args.decode_workers)
    else:
        dep = DynamoDeployment(log_dir, model, args.migration_limit)
    line: dict[str, Any] = {"bench": "failover", "system": sc.system, "fault": sc.fault,
                            "prompt": sc.prompt, "kv_replicas": sc.kv_replicas}
    try:
        t0 = time.monotonic()
        await dep.start(args.startup_timeout)
        model_name = await wait_serving(dep, str(model), [f"warm-up {i}" for i in range(2)],
                                        args.startup_timeout)
        workers = dep.workers()
        target = workers[0]
        if isinstance(dep, TurnoutDeployment) and args.fault_worker:
            target = dep.worker_named(args.fault_worker)
        if isinstance(dep, TurnoutDeployment) and sc.fault in ROUTER_FAULTS:
            target = psutil.Process(dep.local.by_role("router")[1].pid)
        elif isinstance(dep, TurnoutDeployment) and sc.fault == "frontend-kill":
            target = psutil.Process(dep.local.frontend.pid)
        log(f"{sc.label()}: up in {time.monotonic() - t0:.1f}s; workers "
            f"{[w.pid for w in workers]}; fault target {target.pid}")
        before = await dep.router_metrics()

        fault_t = fault_wall = 0.0

        async def inject() -> None:
            nonlocal fault_t, fault_wall
            await asyncio.sleep(args.fault_at)
            fault_t, fault_wall = time.perf_counter(), time.time()
            target.send_signal(FAULTS[sc.fault])
            log(f"{sc.label()}: sent SIG{FAULTS[sc.fault].name[3:]} to {target.pid}")

        fault_task = asyncio.create_task(inject())
        result: LoadResult = await run_load(
            dep.base_url, model_name, prompts, len(prompts), args.tokens, len(prompts),
            extra_body={"temperature": 0}, request_timeout=args.stall_cap)
        if not fault_task.done():
            fault_task.cancel()
            raise RuntimeError("every stream ended before the fault was injected")
        records = result.records
        first_start = min(r.start for r in records)
        ends = [r.start + r.e2e for r in records if r.e2e is not None]
        failures = [f for r in records if (f := failure_of(r, args.tokens)) is not None]
        kinds: dict[str, int] = {}
        for f in failures:
            kinds[f[:100]] = kinds.get(f[:100], 0) + 1
        prompt_tokens = [r.prompt_tokens for r in records if r.prompt_tokens is not None]
        line.update({
            "streams": len(records), "completed": len(records) - len(failures),
            "failed": len(failures), "failed_kinds": kinds,
            "prompt_tokens_min": min(prompt_tokens) if prompt_tokens else None,
            "fault_at_s": round(fault_t - first_start, 3),
            **stream_figures(records, args.tokens, fault_t),
            "wall_s": round(max(ends) - first_start, 3) if ends else None,
        })
        if isinstance(dep, TurnoutDeployment) and sc.fault == "frontend-kill":
            line.update(await orphan_figures(dep, fault_t))
        elif isinstance(dep, TurnoutDeployment) and sc.fault in ROUTER_FAULTS:
            line.update(await router_fault_figures(dep))
            line["continuity_mismatches"] = await continuity(
                dep, model_name, prompts, records, references, sc.prompt, args)
        elif isinstance(dep, TurnoutDeployment):
            line.update(await turnout_figures(dep, before, sc.fault, target.pid, fault_wall))
            line["continuity_mismatches"] = await continuity(
                dep, model_name, prompts, records, references, sc.prompt, args)
        else:
            line.update({"detection_router_s": None, "recomputed_tokens_per_migration": None})
        line["logs"] = str(log_dir)
        return line
    finally:
        await dep.stop()
        log(f"{sc.label()}: stopped")


async def turnout_figures(dep: TurnoutDeployment, before: Metrics | None,
                          fault: str, target_pid: int, fault_wall: float) -> dict[str, Any]:
    # The verdict on a SIGTERM'd worker comes when its drained connection closes: give it (and
    # a hung worker's heartbeat timeout) a moment to land in the metrics.
    deadline = time.monotonic() + 3.0
    metrics = await dep.router_metrics()
    while (metrics is None or not _by_label(metrics, "turnout_router_worker_failures_total",
                                            "cause")) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        metrics = await dep.router_metrics()
    if metrics is None:
        return {"detection_router_s": None, "router_metrics": "unreachable"}
    detection = metrics.histogram("turnout_router_failure_detection_seconds").mean
    recomputed = metrics.histogram("turnout_router_migration_recomputed_tokens")
    migrated = int(recomputed.count)
    out = {
        "detection_router_s": None if detection is None else round(detection, 4),
        "recomputed_tokens_per_migration": (None if recomputed.mean is None
                                            else round(recomputed.mean, 1)),
        "recomputed_observations": migrated,
        # Cumulative counts per upper bound: how the recompute spreads over the moved requests.
        "recomputed_tokens_le": {floatToGoString(le): int(n)
                                 for le, n in recomputed.buckets.items() if migrated},
        "worker_failures": _by_label(metrics, "turnout_router_worker_failures_total", "cause"),
        "migrations": _by_label(metrics, "turnout_router_migrations_total", "cause"),
        "router_requests": _by_label(metrics, "turnout_router_requests_total", "outcome"),
    }
    if isinstance(dep, TurnoutDeployment) and dep.decode_workers:
        # Hand-offs the surviving decode workers took: pulled, or recomputed (no copy left).
        transfers: dict[str, int] = {}
        for w in dep.local.by_role("worker"):
            if w.alive() and not w.stopped() and w.name.startswith("decode-"):
                for k, v in _by_label(w.metrics(), "turnout_worker_disagg_transfers_total",
                                      "outcome").items():
                    transfers[k] = transfers.get(k, 0) + v
        out["decode_transfers"] = transfers
    # The histogram starts at the worker's last heartbeat, which for a crash (caught by the
    # dropped connection) can precede the fault by up to a heartbeat period: the log line's
    # timestamp against our clock gives fault → verdict itself.
    verdicts = dep.verdicts()
    out["router_verdicts"] = [{k: v[k] for k in ("cause", "silent_ms", "inflight") if k in v}
                              for v in verdicts]
    mine = [v for v in verdicts if str(v.get("worker", "")).startswith(f"worker-{target_pid}-")
            and "at" in v]
    out["detection_fault_to_verdict_s"] = round(mine[0]["at"] - fault_wall, 3) if mine else None
    if before is not None:  # the warm-up probes are in the totals: take them out
        warm = _by_label(before, "turnout_router_requests_total", "outcome")
        out["router_requests"] = {k: v - warm.get(k, 0) for k, v in out["router_requests"].items()}
    problems = dep.log_problems()
    if problems:
        log(f"turnout {fault}: log warnings/errors:\n  " + "\n  ".join(problems))
    return out


def _quantile(hist: Any, q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile of a Prometheus histogram."""
    if not hist.count:
        return None
    for le, n in sorted(hist.buckets.items()):
        if n >= q * hist.count:
            return float(le)
    return None


async def router_fault_figures(dep: TurnoutDeployment) -> dict[str, Any]:
    """Router faults, by the frontend's clock: streams resumed, routers lost (why), hang
    detection, and each resumed stream's pause (the lost router's last frame to the next
    token through the other router); by the workers': handovers, replays, prompt tokens."""
    front = await scrape_async(dep.local.frontend.metrics_url(), within_s=3.0)
    gap = front.histogram("turnout_frontend_stream_resume_gap_seconds")
    hang = front.histogram("turnout_frontend_router_hang_detection_seconds")
    workers = [w.metrics() for w in dep.local.workers()]
    return {
        "streams_resumed": int(front.value("turnout_frontend_streams_resumed_total")),
        "resume_failed": int(front.value("turnout_frontend_streams_resume_failed_total")),
        "routers_lost": _by_label(front, "turnout_frontend_routers_lost_total", "why"),
        "detection_frontend_s": None if hang.mean is None else round(hang.mean, 4),
        "resume_gap_s_p50_le": _quantile(gap, 0.5),
        "resume_gap_s_p99_le": _quantile(gap, 0.99),
        "resume_gap_s_mean": None if gap.mean is None else round(gap.mean, 4),
        "handovers": int(sum(m.value("turnout_worker_handovers_total") for m in workers)),
        # Resumed streams that had ended on their worker while the router was not listening.
        "replays": int(sum(m.value("turnout_worker_replayed_streams_total") for m in workers)),
        # Prompt tokens every worker computed, warm-up included: a prompt prefilled a second
        # time shows here.
        "prefill_tokens": int(sum(m.value("turnout_worker_prefill_tokens_total")
                                  for m in workers)),
    }


async def orphan_figures(dep: TurnoutDeployment, fault_t: float) -> dict[str, Any]:
    """Frontend killed: how long the workers kept running its requests (0 orphaned work is the
    goal: the routers notice the silent frontend and cancel)."""
    deadline = time.monotonic() + 30
    cleared = None
    while time.monotonic() < deadline:
        busy = 0.0
        for w in dep.local.workers():
            m = w.metrics()
            busy += (m.value("turnout_worker_running_requests")
                     + m.value("turnout_worker_waiting_requests"))
        if busy == 0:
            cleared = round(time.perf_counter() - fault_t, 3)
            break
        await asyncio.sleep(0.02)
    routers = [r.metrics() for r in dep.local.by_role("router") if r.alive()]
    return {
        "orphans_cleared_s": cleared,
        "orphans_cancelled": int(sum(m.value("turnout_router_orphans_cancelled_total")
                                     for m in routers)),
        "frontends_lost": int(sum(m.value("turnout_router_frontends_lost_total")
                                  for m in routers)),
    }


async def continuity(dep: TurnoutDeployment, model_name: str, prompts: list[str],
                     records: list[RequestRecord], references: dict[str, list[int]],
                     prompt_kind: str, args: argparse.Namespace) -> int | None:
    """Streams whose text differs in length from a fault-free run of the same prompts.

    The mocker's tokens are a pure function of the prompt, so a migrated stream must carry
    exactly the text an undisturbed one does; a repeated or lost token changes its length.
    The reference run happens once per prompt kind, on the surviving worker, after the fault
    run (so it cannot warm the caches the fault run depends on)."""
    if not args.verify:
        return None
    if prompt_kind not in references:
        ref = await run_load(dep.base_url, model_name, prompts, len(prompts), args.tokens,
                             len(prompts), extra_body={"temperature": 0},
                             request_timeout=args.stall_cap)
        if any(failure_of(r, args.tokens) for r in ref.records):
            log("continuity: the reference run itself failed; not checked")
            return None
        references[prompt_kind] = [r.text_chars for r in ref.records]
    expected = references[prompt_kind]
    return sum(1 for rec, chars in zip(records, expected, strict=True)
               if failure_of(rec, args.tokens) is None and rec.text_chars != chars)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    out = []
    for fault in args.faults:
        for prompt in args.prompts:
            for system in args.systems:
                if system != "turnout" and fault in (*ROUTER_FAULTS, "frontend-kill"):
                    log(f"{system} {fault}: not run (Dynamo's router lives in its frontend)")
                    continue
                if system == "turnout":
                    reps = args.long_replicas if prompt == "long" else [0]
                    out += [Scenario(system, fault, prompt, r) for r in reps]
                else:
                    out.append(Scenario(system, fault, prompt, None))
    return out


def summary(lines: list[dict[str, Any]]) -> dict[str, Any]:
    def find(system: str, fault: str, prompt: str, reps: int | None) -> dict[str, Any] | None:
        for line in lines:
            if (line["system"], line["fault"], line["prompt"], line["kv_replicas"]) == (
                    system, fault, prompt, reps) and "error" not in line:
                return line
        return None

    turnout_best = find("turnout", "kill", "long", 1)
    dynamo = find("dynamo", "kill", "long", None)
    ratio = after_ratio = None
    if turnout_best and dynamo and dynamo.get("longest_gap_s_max"):
        ratio = round(turnout_best["longest_gap_s_max"] / dynamo["longest_gap_s_max"], 4)
    if turnout_best and dynamo and dynamo.get("longest_gap_after_fault_s_max"):
        after_ratio = round(turnout_best["longest_gap_after_fault_s_max"]
                            / dynamo["longest_gap_after_fault_s_max"], 4)
    # A killed frontend ends its clients' streams by nature: what counts there is orphaned work.
    failed = {f"{x['system']} {x['fault']} {x['prompt']} r={x['kv_replicas']}":
              x.get("failed", "run error") for x in lines if x["fault"] != "frontend-kill"}
    router_faults = [x for x in lines if x["fault"] in ROUTER_FAULTS and "error" not in x]
    orphans = [x.get("orphans_cleared_s") for x in lines if x["fault"] == "frontend-kill"]
    hung = [x for x in lines if x["system"] == "turnout" and x["fault"] == "stop"
            and "error" not in x]
    hung_detect = [x["detection_router_s"] for x in hung]
    hung_verdict = [x.get("detection_fault_to_verdict_s") for x in hung]
    return {
        "bench": "failover", "summary": True,
        "long_kill_gap_ratio_turnout_replicas1_over_dynamo": ratio,
        "long_kill_after_fault_gap_ratio": after_ratio,
        "turnout_long_kill_replicas1_longest_gap_s": turnout_best and
        turnout_best["longest_gap_s_max"],
        "dynamo_long_kill_longest_gap_s": dynamo and dynamo["longest_gap_s_max"],
        "failed_streams": failed,
        "turnout_hung_detection_router_s": hung_detect,
        "turnout_hung_fault_to_verdict_s": hung_verdict,
        "goal_zero_failed": all(v == 0 for k, v in failed.items() if k.startswith("turnout")),
        "goal_hung_detection_under_0_5s": None if not hung_detect else all(
            d is not None and d < 0.5 for d in hung_detect),
        "goal_gap_ratio_at_most_0_2": None if ratio is None else ratio <= 0.2,
        "goal_router_faults_resume_gap_p99_at_most_0_5s": None if not router_faults else all(
            (x.get("resume_gap_s_p99_le") or 0) <= 0.5 for x in router_faults),
        "goal_no_orphaned_work_after_frontend_kill_1s": None if not orphans else all(
            o is not None and o <= 1.0 for o in orphans),
    }


async def main_async(args: argparse.Namespace, model: Path) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    prompts = {kind: build_prompts(kind, args.streams, model, args.long_tokens)
               for kind in args.prompts}
    references: dict[str, list[int]] = {}
    lines = []
    for sc in scenarios(args):
        try:
            line = await run_scenario(sc, args, model, prompts[sc.prompt], references)
        except (RuntimeError, TimeoutError, OSError) as exc:
            log(f"{sc.label()}: run failed: {exc}")
            line = {"bench": "failover", "system": sc.system, "fault": sc.fault,
                    "prompt": sc.prompt, "kv_replicas": sc.kv_replicas, "error": str(exc)}
        print(json.dumps(line), flush=True)
        if "error" not in line:
            log(f"{sc.label()}: {line['completed']}/{line['streams']} completed, longest gap "
                f"max {line['longest_gap_s_max']} s, router detection "
                f"{line.get('detection_router_s')} s, wall {line['wall_s']} s")
        lines.append(line)
    print(json.dumps(summary(lines)), flush=True)
    return 0


def default_model() -> Path:
    """The tests' tiny model, or its 2,048-token build where Dynamo's mocker needs it (see
    `bench/overhead.py`)."""
    from overhead import default_model as overhead_model

    return overhead_model()


def _list(choices: tuple[str, ...] | None = None):  # -> argparse type
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {choices}")
        return items
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", type=_list(("turnout", "dynamo")),
                        default=["turnout", "dynamo"])
    parser.add_argument("--faults", type=_list(tuple(FAULTS)), default=["kill", "stop", "term"],
                        help="worker faults (kill, stop, term) and, Turnout only, "
                             + ", ".join([*ROUTER_FAULTS, "frontend-kill"]))
    parser.add_argument("--prompts", type=_list(("short", "long")), default=["short", "long"])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512, help="max_tokens of every stream")
    parser.add_argument("--stall-cap", type=float, default=60.0,
                        help="hard limit per stream, seconds: one still open then is failed "
                             "(hung)")
    parser.add_argument("--fault-at", type=float, default=1.0,
                        help="seconds after the streams start")
    parser.add_argument("--long-tokens", type=int, default=4000,
                        help="the long prompts have at least this many tokens")
    parser.add_argument("--long-replicas", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 1], help="Turnout --kv-replicas values for long prompts")
    parser.add_argument("--prefill-workers", type=int, default=0,
                        help="Turnout only: run disaggregated, this many prefill workers ...")
    parser.add_argument("--decode-workers", type=int, default=0,
                        help="... and this many decode workers (instead of 2 aggregated)")
    parser.add_argument("--fault-worker", default=None,
                        help="Turnout: the worker a worker fault hits, by `turnout up`'s name "
                             "(worker-1, prefill-2, decode-1; default the oldest worker)")
    parser.add_argument("--router-mode", default="round-robin",
                        help="Turnout --router-mode (Dynamo's frontend default is round-robin)")
    parser.add_argument("--migration-limit", type=int, default=3, help="both systems")
    parser.add_argument("--turnout-args", default="--token-range-lo 1000 --token-range-hi 2000",
                        help="extra `turnout up` flags (default: Dynamo's mocker output ids)")
    parser.add_argument("--model", type=Path, default=None,
                        help="HF model dir; default the tests' tiny model (2,048-token build)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="Turnout: compare each stream's text length with a fault-free run")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--log-root", default=None, help="where per-run log folders go")
    args = parser.parse_args(argv)
    disagg = args.prefill_workers or args.decode_workers
    if disagg and args.systems != ["turnout"]:
        parser.error("--prefill-workers/--decode-workers: Turnout only (--systems turnout)")
    if disagg and not (args.prefill_workers and args.decode_workers):
        parser.error("--prefill-workers and --decode-workers go together")
    if args.fault_worker and args.systems != ["turnout"]:
        parser.error("--fault-worker: Turnout only (--systems turnout)")
    if args.log_root:
        Path(args.log_root).mkdir(parents=True, exist_ok=True)
    if "dynamo" in args.systems and not (DYNAMO_VENV / "bin" / "python").exists():
        log(f"{DYNAMO_VENV} missing; running {DYNAMO_INSTALL}")
        subprocess.run(["bash", str(DYNAMO_INSTALL)], check=True)
    model = (args.model or default_model()).resolve()
    log(f"model {model}; {args.streams} streams x {args.tokens} tokens; fault at "
        f"{args.fault_at}s; stall cap {args.stall_cap}s")
    try:
        return run(main_async(args, model))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
