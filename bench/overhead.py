"""The foundation benchmark: what Turnout's processes cost per request when the engine is free.

Owns: starting a one-worker deployment (the processes of `turnout up --engine mocker
--speedup-ratio 0`, each through `turnout.testing.deployment`) and, with
`--dynamo`, NVIDIA Dynamo 1.6.1 (frontend + one mocker at speed-up 10000) on the same machine in
the same run; driving both with the same closed-loop client, prompts (exact token-id lists) and
concurrency levels; reading each server process's CPU time around every level; printing one JSON
line per (system, level, round) and one Turnout/Dynamo ratio line per level (medians over
`--rounds`). With `--curve on` Turnout runs with fleet keys (CURVE on the request and event
planes); `--curve both` runs it both ways in the same run (alternating first per round) and
prints a curve/plain ratio line per level. With `--floor` the bare HTTP floor
(`bench/http_floor.py`: the frontend's HTTP stack answering at once) runs too, and each system's
compare line against it carries `added_ttft_ms_p50`, what serving adds to the first token.
Does not own the HTTP client
(`bench/load_client.py`) or anything it starts beyond this run: every process is killed by
process group on exit.

    python bench/overhead.py [--dynamo] [--skip-turnout] [--levels 1,16,64] [--requests 64,1000]
                             [--curve off|on|both] [--floor]

Progress goes to stderr, JSON lines to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from load_client import (  # noqa: E402  (path set up just above)
    random_token_prompts,
    run,
    run_load,
    served_models,
    wait_until_ok,
)

from turnout.testing.deployment import PYTHON_TURNOUT  # noqa: E402
from turnout.testing.deployment import Deployment as LocalDeployment  # noqa: E402

DYNAMO_START = Path(os.environ.get("DYNAMO_ANCHOR", "/work/shared/anchors/dynamo")) / "start.sh"
# Dynamo 1.6.1's mocker draws output token ids from [1000, 2000) and sends no chunk for a token
# that decodes to no text, so a smaller vocabulary makes it stream fewer chunks than tokens.
DYNAMO_MOCKER_TOKEN_RANGE = (1000, 2000)


def log(msg: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The systems under test
# ---------------------------------------------------------------------------------------------


class Stack:
    """A running deployment: its URL, its process group, and its processes by role."""

    name = ""

    def __init__(self, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path: Path | None = None
        self.extra_pids: list[int] = []

    async def start(self, timeout_s: float) -> None:
        raise NotImplementedError

    async def spawn(self, cmd: list[str], log_prefix: str) -> None:
        """Start `cmd` as this stack's process, leading its own process group (so `stop()` can
        kill the group; not a session: see turnout/up.py on autogroup scheduling), output to a
        fresh log file."""
        fd, name = tempfile.mkstemp(prefix=log_prefix, suffix=".log")
        self.log_path = Path(name)
        log(f"starting: {shlex.join(cmd)} (log {name})")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd,
                preexec_fn=os.setpgrp, cwd=str(REPO))
        finally:
            os.close(fd)

    def processes(self) -> dict[str, list[psutil.Process]]:
        raise NotImplementedError

    def stop(self) -> None:
        """Kill the whole process group (and anything it started), politely then not."""
        pids = list(self.extra_pids)
        pgid = None
        if self.proc is not None:
            pgid = self.proc.pid  # started with setpgrp: pgid == pid
            pids.append(self.proc.pid)
        doomed: list[psutil.Process] = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                doomed += [p, *p.children(recursive=True)]
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        for p in doomed:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(doomed, timeout=10)
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)

    def tail_log(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class TurnoutStack(Stack):
    name = "turnout"

    def __init__(self, port: int, command: list[str], model: Path, speedup: float,
                 extra_args: list[str], curve: bool = False) -> None:
        super().__init__(port)
        self.curve = curve
        if curve:
            self.name = "turnout-curve"
        self.port = port
        self.command = command
        self.model = model
        self.speedup = speedup
        self.extra_args = extra_args
        self.local: LocalDeployment | None = None

    async def start(self, timeout_s: float) -> None:
        flags = ["--engine", "mocker", "--speedup-ratio", f"{self.speedup:g}",
                 "--model", str(self.model), *self.extra_args]
        logs = Path(tempfile.mkdtemp(prefix="turnout-overhead-"))
        # The services' own default lease, as `turnout up`; one log per process.
        self.local = LocalDeployment(logs, command=self.command, lease_ttl_s=None,
                                     curve=self.curve)
        log(f"starting: {shlex.join(self.command)} <role> with up-style flags "
            f"{shlex.join(flags)} (logs {logs})")
        if self.local.keys_dir is not None:
            log(f"CURVE planes: fleet keys in {self.local.keys_dir}")
        # Returns once the frontend is healthy and the router routes to the worker.
        self.local.start_up(flags, 1, port=self.port, timeout=timeout_s)
        if self.curve:  # every process says its key in discovery: CURVE is really on
            assert all("curve_key" in r["metadata"] for r in self.local.records())

    def alive(self) -> bool:
        return self.local is not None and all(s.alive() for s in self.local.services)

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop(grace_s=10)

    def tail_log(self, lines: int = 30) -> str:
        return "" if self.local is None else self.local.logs(tail_chars=lines * 160)

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Each service's process and its helpers (a helper counts for its service)."""
        assert self.local is not None
        found: dict[str, list[psutil.Process]] = {}
        for service in self.local.services:
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(service.pid)
                found.setdefault(service.role, []).extend([top, *top.children(recursive=True)])
        return found


class FloorStack(Stack):
    """`bench/http_floor.py`: the same HTTP stack as Turnout's frontend answering at once, with
    no routing, engine or detokenizing behind it: the floor for TTFT and CPU per request."""

    name = "floor"

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.port = port

    async def start(self, timeout_s: float) -> None:
        await self.spawn([sys.executable, str(REPO / "bench" / "http_floor.py"),
                          "--port", str(self.port)], "http-floor-")
        await wait_until_ok(self.base_url, "/health", timeout_s, alive=self.alive)

    def processes(self) -> dict[str, list[psutil.Process]]:
        assert self.proc is not None
        return {"http": [psutil.Process(self.proc.pid)]}


class DynamoStack(Stack):
    name = "dynamo"

    def __init__(self, port: int, model: Path, speedup: float) -> None:
        super().__init__(port)
        self.port = port
        self.model = model
        self.speedup = speedup
        self.pids: list[int] = []

    async def start(self, timeout_s: float) -> None:
        logs = tempfile.mkdtemp(prefix="dynamo-logs-")
        self.log_path = Path(logs) / "frontend.log"
        env = {**os.environ, "DYNAMO_LOGS": logs}
        cmd = ["bash", str(DYNAMO_START), str(self.model), str(self.port), "1",
               f"{self.speedup:g}"]
        log(f"starting: {shlex.join(cmd)} (logs {logs})")
        # start.sh backgrounds frontend + mocker in its own process group, prints their pids and
        # exits once /v1/models lists the model. Its pids go to a file, not a pipe: under uvloop
        # the backgrounded children keep the pipe open, so EOF would never come.
        pid_file = Path(logs) / "pids"
        with pid_file.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=out, env=env,
                preexec_fn=os.setpgrp)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"dynamo start.sh did not finish in {timeout_s:.0f}s") from None
        self.pids = [int(x) for x in pid_file.read_text().split()]
        self.extra_pids = self.pids
        if self.proc.returncode != 0 or not self.pids:
            raise RuntimeError(f"dynamo failed to start (rc {self.proc.returncode}):\n"
                               f"{self.tail_log()}")
        await wait_until_ok(self.base_url, "/v1/models", timeout_s)

    def alive(self) -> bool:
        return all(psutil.pid_exists(p) for p in self.pids)

    def processes(self) -> dict[str, list[psutil.Process]]:
        found: dict[str, list[psutil.Process]] = {}
        for i, pid in enumerate(self.pids):
            role = "frontend" if i == 0 else "worker"
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                found.setdefault(role, []).extend([p, *p.children(recursive=True)])
        return found


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def cpu_seconds(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for role, plist in procs.items():
        total = 0.0
        for p in plist:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        out[role] = total
    return out


def machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + t.nice + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


@dataclasses.dataclass
class Workload:
    levels: list[int]
    requests: list[int]
    input_tokens: int
    output_tokens: int
    warmup: int | None
    prompt_ids: list[int]  # token ids prompts are drawn from
    seed: int


def prompt_token_ids(model_dir: Path) -> list[int]:
    """Ordinary (non-special) token ids of the model's tokenizer."""
    data = json.loads((model_dir / "tokenizer.json").read_text())
    special = {t["id"] for t in data.get("added_tokens", [])}
    vocab = data.get("model", {}).get("vocab", {})
    ids = vocab.values() if isinstance(vocab, dict) else range(len(vocab))
    return sorted(i for i in ids if i not in special)


def prompts_for(work: Workload, n: int, seed: int) -> list[list[int]]:
    raw = random_token_prompts(n, work.input_tokens, len(work.prompt_ids), seed=seed, low=0)
    return [[work.prompt_ids[i] for i in p] for p in raw]


async def wait_until_serving(stack: Stack, work: Workload, timeout_s: float) -> str:
    """The served model's name, once a one-token completion succeeds (a healthy frontend may
    not have discovered its worker yet)."""
    deadline = time.monotonic() + timeout_s
    last = "no model listed"
    while time.monotonic() < deadline:
        if not stack.alive():
            raise RuntimeError(f"{stack.name} exited while waiting to serve ({last})")
        models = await served_models(stack.base_url)
        if models:
            probe = await run_load(stack.base_url, models[0], prompts_for(work, 1, seed=-1), 1,
                                   1, 1, request_timeout=10.0)
            error = probe.records[0].error
            if error is None:
                return models[0]
            last = error
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{stack.name} not serving after {timeout_s:.0f}s ({last})")


async def measure(stack: Stack, work: Workload, timeout_s: float,
                  round_no: int) -> list[dict[str, Any]]:
    started = time.monotonic()
    model = await wait_until_serving(stack, work, timeout_s)
    log(f"{stack.name} serves {model!r} ({time.monotonic() - started:.1f}s after /health)")
    lines = []
    for li, (conc, n) in enumerate(zip(work.levels, work.requests, strict=True)):
        # Same prompts for both systems at a level; fresh ones per level so no prefix is cached.
        warm_n = work.warmup if work.warmup is not None else 2 * conc + 16
        if warm_n:
            warm = prompts_for(work, warm_n, seed=work.seed * 1000 + 500 + li)
            res = await run_load(stack.base_url, model, warm, conc, work.output_tokens, warm_n)
            if res.summary()["errors"]:
                log(f"{stack.name} c={conc}: warm-up errors {res.summary()['error_kinds']}")
        prompts = prompts_for(work, n, seed=work.seed * 1000 + li)
        procs = stack.processes()
        cpu0, busy0, self0, t0 = (cpu_seconds(procs), machine_busy_seconds(),
                                  time.process_time(), time.perf_counter())
        result = await run_load(stack.base_url, model, prompts, conc, work.output_tokens, n)
        cpu1, busy1, self1, t1 = (cpu_seconds(procs), machine_busy_seconds(),
                                  time.process_time(), time.perf_counter())
        s = result.summary()
        done = max(s["completed"], 1)
        per_role = {r: round((cpu1[r] - cpu0[r]) * 1000 / done, 3) for r in cpu0}
        server_s = sum(cpu1[r] - cpu0[r] for r in cpu0)
        capacity = (t1 - t0) * (psutil.cpu_count() or 1)
        line = {
            "bench": "overhead", "system": stack.name, "concurrency": conc, "round": round_no,
            "requests": s["requests"], "errors": s["errors"],
            "req_s": s["req_s"], "output_tok_s": s["output_tok_s"],
            "ttft_ms_p50": s["ttft_ms_p50"], "ttft_ms_p99": s["ttft_ms_p99"],
            "itl_ms_p50": s["itl_ms_p50"], "itl_ms_p99": s["itl_ms_p99"],
            "tpot_ms_p50": s["tpot_ms_p50"], "e2e_ms_p50": s["e2e_ms_p50"],
            "prompt_tokens_mean": s["prompt_tokens_mean"],
            "output_tokens_mean": s["output_tokens_mean"],
            "tokens_per_chunk": s["tokens_per_chunk"],
            "cpu_ms_per_req": per_role,
            "server_cpu_ms_per_req": round(sum(per_role.values()), 3),
            "client_cpu_ms_per_req": round((self1 - self0) * 1000 / done, 3),
            "machine_cpu_util": round((busy1 - busy0) / capacity, 3),
            # CPU that neither the servers nor this client used: other load on the machine
            # (kernel networking included), which makes req/s and latency less comparable.
            "foreign_cpu_util": round((busy1 - busy0 - server_s - (self1 - self0)) / capacity, 3),
        }
        if s["errors"]:
            line["error_kinds"] = s["error_kinds"]
        print(json.dumps(line), flush=True)
        log(f"{stack.name} c={conc}: {s['req_s']} req/s, TTFT p50 {s['ttft_ms_p50']} ms, "
            f"server CPU {line['server_cpu_ms_per_req']} ms/req, errors {s['errors']}")
        lines.append(line)
    return lines


async def run_side(stack: Stack, work: Workload, timeout_s: float,
                   round_no: int) -> list[dict[str, Any]]:
    try:
        try:
            await stack.start(timeout_s)
            log(f"{stack.name} up at {stack.base_url}; processes: "
                + ", ".join(f"{r}={[p.pid for p in ps]}" for r, ps in stack.processes().items()))
            return await measure(stack, work, timeout_s, round_no)
        except (TimeoutError, RuntimeError, OSError) as exc:
            raise RuntimeError(f"{stack.name}: {exc}\n--- log tail ---\n"
                               f"{stack.tail_log()}") from exc
    finally:
        stack.stop()
        log(f"{stack.name} stopped")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def compare_lines(turnout: list[list[dict[str, Any]]], dynamo: list[list[dict[str, Any]]],
                  names: tuple[str, str] = ("turnout", "dynamo")) -> list[dict[str, Any]]:
    """First/second ratios per level (Turnout/Dynamo, or CURVE/plain), of the medians over
    rounds."""
    out = []
    for li, first in enumerate(turnout[0]):
        med: dict[str, dict[str, float | None]] = {}
        for name, rounds in ((names[0], turnout), (names[1], dynamo)):
            med[name] = {key: _median([r[li][key] for r in rounds])
                         for key in ("req_s", "ttft_ms_p50", "tpot_ms_p50",
                                     "server_cpu_ms_per_req")}
        t, d = med[names[0]], med[names[1]]
        out.append({
            "bench": "overhead", "compare": f"{names[0]}/{names[1]}",
            "concurrency": first["concurrency"],
            "rounds": len(turnout),
            "req_s_ratio": _ratio(t["req_s"], d["req_s"]),
            "ttft_p50_ratio": _ratio(t["ttft_ms_p50"], d["ttft_ms_p50"]),
            "tpot_p50_ratio": _ratio(t["tpot_ms_p50"], d["tpot_ms_p50"]),
            "server_cpu_per_req_ratio": _ratio(t["server_cpu_ms_per_req"],
                                               d["server_cpu_ms_per_req"]),
            names[0]: t, names[1]: d,
        })
    return out


async def main_async(args: argparse.Namespace, work: Workload, model: Path) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # so `finally` kills what we started
    sides: list[tuple[str, Callable[[], Stack]]] = []
    if not args.skip_turnout:
        command = [str(args.turnout_bin)] if args.turnout_bin else list(PYTHON_TURNOUT)
        for curve in {"off": [False], "on": [True], "both": [False, True]}[args.curve]:
            sides.append(("turnout-curve" if curve else "turnout",
                          lambda curve=curve: TurnoutStack(
                              args.port, command, model, args.turnout_speedup,
                              shlex.split(args.turnout_args), curve)))
    if args.dynamo:
        sides.append(("dynamo", lambda: DynamoStack(args.dynamo_port, model,
                                                    args.dynamo_speedup)))
    if args.floor:
        sides.append(("floor", lambda: FloorStack(args.floor_port)))
    results: dict[str, list[list[dict[str, Any]]]] = {name: [] for name, _ in sides}
    for round_no in range(args.rounds):
        # Alternate which side goes first, so a slow drift in the machine's load (this machine
        # may be shared) does not always land on the same side.
        for name, make in sides if round_no % 2 == 0 else sides[::-1]:
            results[name].append(await run_side(make(), work, args.startup_timeout, round_no))
    for first, second in (("turnout", "dynamo"), ("turnout-curve", "turnout"),
                          ("turnout", "floor"), ("dynamo", "floor")):
        if first in results and second in results:
            for line in compare_lines(results[first], results[second], (first, second)):
                if second == "floor":
                    # What serving adds to the first token over the bare HTTP floor.
                    line["added_ttft_ms_p50"] = _difference(line[first]["ttft_ms_p50"],
                                                            line[second]["ttft_ms_p50"])
                print(json.dumps(line), flush=True)
    return 0


def _difference(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def covers_dynamo_tokens(ids: list[int]) -> bool:
    lo, hi = DYNAMO_MOCKER_TOKEN_RANGE
    return set(range(lo, hi)) <= set(ids)


def default_model() -> Path:
    """The tests' tiny model (its vocabulary covers Dynamo's mocker output ids)."""
    from tests import tiny_model

    model = tiny_model.cached_tiny_model()
    if not covers_dynamo_tokens(prompt_token_ids(model)):
        raise SystemExit(f"{model}: vocabulary too small for Dynamo's mocker output ids")
    return model


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def default_requests(concurrency: int) -> int:
    return 64 if concurrency <= 1 else 1000 if concurrency <= 16 else 3000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dynamo", action="store_true", help="also run Dynamo 1.6.1 alongside")
    parser.add_argument("--skip-turnout", action="store_true", help="only run Dynamo")
    parser.add_argument("--floor", action="store_true",
                        help="also run the bare HTTP floor (bench/http_floor.py) and report "
                             "each system's added TTFT over it")
    parser.add_argument("--floor-port", type=int, default=18300)
    parser.add_argument("--curve", choices=["off", "on", "both"], default="off",
                        help="Turnout with fleet keys (CURVE planes): off, on, or both ways")
    parser.add_argument("--levels", type=_ints, default=[1, 16, 64], help="concurrency levels")
    parser.add_argument("--requests", type=_ints, default=None,
                        help="requests per level: one number, or one per level "
                             "(default 64 / 1000 / 3000 at concurrency 1 / <=16 / more)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="unmeasured requests before each level (default 2*c+16)")
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, default=None,
                        help="HF model dir (tokenizer + config); default tests/tiny_model.py's "
                             "(a 2,048-token build of it if its vocabulary is smaller)")
    parser.add_argument("--port", type=int, default=18100, help="Turnout's HTTP port")
    parser.add_argument("--dynamo-port", type=int, default=18000)
    parser.add_argument("--turnout-bin", type=Path, default=None,
                        help="the `turnout` command to launch each process with (default: "
                             "this Python's `-m turnout`, from this checkout)")
    parser.add_argument("--turnout-speedup", type=float, default=0.0,
                        help="mocker speed-up for Turnout (0: no simulated time)")
    parser.add_argument("--dynamo-speedup", type=float, default=10000.0,
                        help="Dynamo mocker speed-up (its 0 does not mean free in 1.6.1)")
    parser.add_argument("--turnout-args", default="",
                        help="extra `turnout up` flags (split among the processes as "
                             "`turnout up` splits them), one shell-quoted string")
    parser.add_argument("--match-dynamo-tokens", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="have Turnout's mocker emit ids in Dynamo's mocker range "
                             f"{DYNAMO_MOCKER_TOKEN_RANGE} (when the vocabulary covers it)")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="start, measure and stop each side this many times (alternating "
                             "which goes first); ratios use the medians")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.skip_turnout and not (args.dynamo or args.floor):
        parser.error("--skip-turnout without --dynamo or --floor leaves nothing to run")
    requests = args.requests or [default_requests(c) for c in args.levels]
    if len(requests) == 1:
        requests = requests * len(args.levels)
    if len(requests) != len(args.levels):
        parser.error("--requests needs one number or one per level")
    model = (args.model or default_model()).resolve()
    ids = prompt_token_ids(model)
    lo, hi = DYNAMO_MOCKER_TOKEN_RANGE
    covers = covers_dynamo_tokens(ids)
    if args.dynamo and not covers:
        log(f"warning: {model} lacks ordinary tokens {lo}..{hi - 1}, which Dynamo's mocker "
            "emits; it streams no chunk for a token that decodes to nothing, so its chunk "
            "counts and ITL will be off (see tokens_per_chunk)")
    if args.match_dynamo_tokens and covers:
        # Same output ids as Dynamo's mocker: both frontends detokenize the same kind of text.
        args.turnout_args = f"--token-range-lo {lo} --token-range-hi {hi} {args.turnout_args}"
    work = Workload(args.levels, requests, args.input_tokens, args.output_tokens, args.warmup,
                    ids, args.seed)
    log(f"model {model}; levels {args.levels}; requests {requests}; "
        f"{args.input_tokens} in / {args.output_tokens} out (ignore_eos)")
    try:
        return run(main_async(args, work, model))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        return 130
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
