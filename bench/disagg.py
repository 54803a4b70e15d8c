"""Disaggregated serving, measured: Turnout aggregated, disaggregated (1 prefill + 1 decode) and
conditional against NVIDIA Dynamo 1.6.1 aggregated and disaggregated, on the same seeded
open-loop workloads in one run.

Owns: the workloads (Poisson arrivals of prompts of 1,000-1,800 random token ids with 100-200
output tokens, ignore_eos, at each `--rates`, other lengths through `--prompt-tokens` and
`--output-tokens`; and a shared-prefix workload from the Mooncake
trace, its prompts built block by block as `bench/kv_routing.py` builds them, cut to
`--prefix-max-tokens`, its arrivals rescaled to `--prefix-rate`), starting every system fresh
per workload (Turnout through `turnout.testing.deployment` as `turnout up` would start it;
Dynamo through `/work/shared/anchors/dynamo/start_disagg.sh`), killing everything it started,
and one JSON line per system and workload (TTFT and ITL percentiles, the ITL p99 without each
stream's first gap and that first gap's median (where a hand-off at the first token shows),
goodput: requests with TTFT <= 200 ms and every inter-token gap <= 20 ms), then the goal
lines:

- Turnout disaggregated at 8 req/s (a line each for turnout-disagg and turnout-conditional):
  ITL p99 <= Dynamo disaggregated's and TTFT p99 <= Dynamo aggregated's;
- conditional on the shared-prefix workload: goodput >= 1.2x the better of Turnout's own
  aggregated and always-disaggregated modes.

Every system runs two mocker workers at speed-up 1 with the KV transfer modelled at
`--kv-gbps` (25) GB/s and `--kv-bytes-per-token` (128 KiB). The routers of turnout-disagg and
turnout-conditional are given the targets they are judged on: on the shared-prefix workload
the goodput bounds (`--disagg-ttft-target-ms 200 --disagg-itl-target-ms 20`); on the random
ones, judged on p99s, `PERCENTILE_ARGS` (an ITL target of one decode step, 7 ms, and an ITL miss
budget of 0.7% spent on the TTFT tail). Both get `--disagg-hold-first-token`: conditional
prices its paths with the targets, and both hold a first token back for the decode worker's
when the hand-off gap would miss the ITL target. `--turnout-args` come last and win. Does not
own the HTTP client (`bench/load_client.py`) or the deployments' plumbing
(`bench/kv_routing.py`).

    python bench/disagg.py                              # everything (~20 minutes)
    python bench/disagg.py --requests 60 --systems turnout-agg,turnout-disagg   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from kv_routing import (  # noqa: E402  (path set up just above)
    DYNAMO_VENV,
    TRACE,
    Deployment,
    TracePrompts,
    TurnoutDeployment,
    load_window,
    probe,
)
from load_client import LoadResult, TraceRequest, percentile, run, run_trace  # noqa: E402
from overhead import default_model, prompt_token_ids  # noqa: E402

from turnout.testing.deployment import scrape_async  # noqa: E402

START_DISAGG = Path("/work/shared/anchors/dynamo/start_disagg.sh")
SYSTEMS = ("turnout-agg", "turnout-disagg", "turnout-conditional", "dynamo-agg",
           "dynamo-disagg")
PREFIX_SYSTEMS = ("turnout-agg", "turnout-disagg", "turnout-conditional")
GOOD_TTFT_S = 0.200
GOOD_ITL_S = 0.020
GOAL_GOODPUT_RATIO = 1.2
# The random workloads are judged on p99s against Dynamo's: the router's ITL target is a decode
# step's p99 at that load (7 ms: every hand-off gap longer than a step is held into TTFT), and
# 0.7% of the gaps may be stretched, only for requests in the TTFT tail: local prefills when the
# prefill pool is 1.3x slower, first tokens sent at once.
PERCENTILE_ARGS = ["--disagg-itl-target-ms", "7", "--disagg-itl-miss-budget", "0.007",
                   "--disagg-local-gain-ratio", "1.3"]


def log(msg: str) -> None:
    print(f"[disagg {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def random_workload(n: int, rate: float, vocab: Sequence[int], seed: int,
                    prompt_tokens: tuple[int, int] = (1000, 1800),
                    output_tokens: tuple[int, int] = (100, 200)) -> list[TraceRequest]:
    """`n` requests, Poisson arrivals at `rate`/s, prompts of `prompt_tokens` (default
    1,000-1,800) random ids (no shared prefixes), `output_tokens` (100-200) output tokens; the
    same for every system. The defaults keep the seeded draws of earlier runs."""
    rng = random.Random(f"{seed}:{rate}")
    at = 0.0
    out = []
    for _ in range(n):
        at += rng.expovariate(rate)
        prompt = rng.choices(vocab, k=rng.randint(*prompt_tokens))
        out.append(TraceRequest(at, prompt, rng.randint(*output_tokens)))
    return out


def token_range(text: str) -> tuple[int, int]:
    """`LO-HI` (inclusive, LO >= 1) as given to `--prompt-tokens` and `--output-tokens`."""
    lo, sep, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI, e.g. 1000-1800; got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI; got {text!r}")
    return a, b


def prefix_workload(start: int, n: int, rate: float, max_tokens: int, vocab: Sequence[int],
                    seed: int) -> list[TraceRequest]:
    """`n` rows of the Mooncake trace from `start`: shared prefixes as in the trace, prompts
    cut to `max_tokens`, outputs capped at 200, arrivals rescaled to a mean of `rate`/s."""
    rows = load_window(TRACE, start, n)
    for row in rows:
        row.input_length = min(row.input_length, max_tokens)
        row.output_length = max(1, min(row.output_length, 200))
    prompts = TracePrompts(vocab, seed)
    t0, t1 = rows[0].timestamp_ms, rows[-1].timestamp_ms
    scale = (len(rows) / rate) / max((t1 - t0) / 1000.0, 1e-9)
    return [TraceRequest((r.timestamp_ms - t0) / 1000.0 * scale,
                         prompts.prompt(r), r.output_length)  # type: ignore[arg-type]
            for r in rows]


# ---------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------


class TurnoutSystem(TurnoutDeployment):
    """Two mocker workers: aggregated, or one prefill + one decode (always or conditional)."""

    def __init__(self, kind: str, port: int, log_dir: Path, model: Path, args: argparse.Namespace,
                 max_model_len: int, percentiles: bool) -> None:
        """`percentiles`: the workloads are judged on TTFT and ITL p99 (the random ones), not
        on goodput (the shared-prefix one)."""
        extra = ["--kv-transfer-gbps", f"{args.kv_gbps:g}",
                 "--kv-bytes-per-token", str(args.kv_bytes_per_token)]
        if kind == "disagg":
            extra += ["--disagg-mode", "always"]
        if kind != "agg":
            # The router prices paths and hand-offs against the targets it is measured on, and
            # (both split modes) a hand-off past the ITL target moves into the first token
            # (`--disagg-hold-first-token`).
            extra += ["--disagg-ttft-target-ms", f"{GOOD_TTFT_S * 1000:g}",
                      "--disagg-itl-target-ms", f"{GOOD_ITL_S * 1000:g}",
                      "--disagg-hold-first-token"]
            if percentiles:
                extra += PERCENTILE_ARGS
            extra += shlex.split(args.turnout_args)
        super().__init__("kv", port, log_dir, 2, model, args.speedup, max_model_len, extra)
        self.name = f"turnout-{kind}"
        self.split = kind != "agg"

    async def start(self, timeout_s: float) -> str:
        if self.split:
            self.local.start_up(self.flags, 0, port=self.port, timeout=timeout_s,
                                prefill_workers=1, decode_workers=1)
        else:
            self.local.start_up(self.flags, 2, port=self.port, timeout=timeout_s)
        return (await _models(self.base_url))[0]

    async def extra_metrics(self) -> dict[str, Any]:
        try:
            m = await scrape_async(self.local.router.metrics_url())
        except (LookupError, OSError, httpx.HTTPError, ValueError) as exc:
            return {"router_metrics_error": f"{type(exc).__name__}: {exc}"}
        handoff = m.histogram("turnout_router_disagg_handoff_seconds")
        return {
            "prefill_paths": {f"{s.labels['path']}/{s.labels['reason']}": int(s.value)
                              for s in m.samples("turnout_router_disagg_decisions_total")},
            "handoffs": int(handoff.count),
            **{f"first_tokens_{o}": int(m.value("turnout_router_disagg_handoffs_total",
                                                outcome=f"first_token_{o}"))
               for o in ("held", "tail", "late")},
            "handoff_ms_mean": None if handoff.mean is None else round(handoff.mean * 1000, 2),
            "migrations": int(m.value("turnout_router_migrations_total")),
        }


class DynamoSystem(Deployment):
    """Dynamo's frontend (kv router) and two mockers, started by the anchor's script."""

    def __init__(self, kind: str, port: int, log_dir: Path, model: Path,
                 args: argparse.Namespace) -> None:
        super().__init__(f"dynamo-{kind}", port, log_dir)
        self.cmd = ["bash", str(START_DISAGG), str(model), str(port), kind, f"{args.speedup:g}",
                    "--kv-transfer-bandwidth", f"{args.kv_gbps:g}",
                    "--kv-bytes-per-token", str(args.kv_bytes_per_token)]
        self.pids: list[int] = []

    async def start(self, timeout_s: float) -> str:
        env = {**os.environ, "DYNAMO_VENV": str(DYNAMO_VENV), "DYNAMO_LOGS": str(self.log_dir),
               "DYN_FILE_KV": str(self.log_dir / "file-kv")}
        log(f"{self.name}: {' '.join(self.cmd)} (logs {self.log_dir})")
        script = self._launch(env)
        self.procs.append(script)  # its group holds every process it started
        out, _ = await asyncio.to_thread(script.communicate, None, timeout_s)
        self.pids = [int(p) for p in out.split()]
        if script.returncode != 0:
            raise RuntimeError(f"{self.name}: start_disagg.sh failed ({script.returncode})")
        await asyncio.sleep(2.0)  # the frontend connects to the workers it discovered
        return (await _models(self.base_url))[0]

    def _launch(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        # A process group, not a session: every system then shares this process's scheduling
        # group (autogroup), as Turnout's services do (turnout.testing.deployment).
        with (self.log_dir / "start.log").open("wb") as err:
            return subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, env=env, cwd=str(REPO), process_group=0)

    def alive(self) -> bool:
        return bool(self.pids) and all(_pid_alive(p) for p in self.pids)

    async def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            for _ in range(100):
                if not any(_pid_alive(p) for p in self.pids):
                    break
                await asyncio.sleep(0.1)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1.0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    return True


async def _models(base_url: str) -> list[str]:
    from load_client import served_models

    return await served_models(base_url)


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def result_line(system: str, workload: str, result: LoadResult,
                trace: Sequence[TraceRequest]) -> dict[str, Any]:
    s = result.summary()
    ok = [r for r in result.records if r.ok]
    good = [r for r in ok if r.ttft is not None and r.ttft <= GOOD_TTFT_S
            and max(r.itl, default=0.0) <= GOOD_ITL_S]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    lag = result.send_lags(trace)
    # Without each stream's first gap: what a hand-off at the first token adds to the tail.
    later = [gap for r in ok for gap in r.itl[1:]]
    line = {
        "bench": "disagg", "workload": workload, "system": system,
        "requests": s["requests"], "completed": s["completed"], "errors": s["errors"],
        "ttft_ms_p50": s["ttft_ms_p50"], "ttft_ms_p99": s["ttft_ms_p99"],
        "itl_ms_p50": s["itl_ms_p50"], "itl_ms_p99": s["itl_ms_p99"],
        "itl_ms_p99_after_first": _ms_or_none(percentile(later, 99)),
        "first_gap_ms_p50": _ms_or_none(percentile([r.itl[0] for r in ok if r.itl], 50)),
        "e2e_ms_p50": s["e2e_ms_p50"], "req_s": s["req_s"], "output_tok_s": s["output_tok_s"],
        "goodput_requests": len(good),
        "goodput_req_s": round(len(good) / result.duration, 3) if result.duration else None,
        "hit_rate": round(cached / prompt, 4) if prompt else None,
        "send_lag_ms_p99": round((percentile(lag, 99) or 0.0) * 1000.0, 1),
    }
    if s["errors"]:
        line["error_kinds"] = s["error_kinds"]
    return line


def write_records(path: Path, result: LoadResult, trace: Sequence[TraceRequest]) -> None:
    """One JSON line per request (`--records`): when it was due, its prompt and output
    lengths, TTFT, every inter-chunk gap (ms) and its error, to see which requests make a tail."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r, t in zip(result.records, trace, strict=True):
            f.write(json.dumps({
                "at_s": round(t.at, 4), "prompt": len(t.prompt), "max_tokens": t.max_tokens,
                "ttft_ms": _ms_or_none(r.ttft), "itl_ms": [round(g * 1000.0, 3) for g in r.itl],
                "error": r.error}) + "\n")
    log(f"records: {path}")


def _ms_or_none(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


async def run_system(dep: Deployment, workloads: list[tuple[str, list[TraceRequest]]],
                     vocab: Sequence[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start `dep`, replay each workload in turn on it, stop it."""
    lines = []
    try:
        t = time.monotonic()
        try:
            model = await dep.start(args.startup_timeout)
            await probe(dep.base_url, model, vocab, args.startup_timeout)
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"{dep.name} failed to start: {exc}\n{dep.tail_logs()}") from exc
        log(f"{dep.name} serving {model!r} after {time.monotonic() - t:.1f}s")
        for workload, trace in workloads:
            log(f"{dep.name}: {workload}, {len(trace)} requests over {trace[-1].at:.1f}s")
            result = await run_trace(dep.base_url, model, trace,
                                     request_timeout=args.request_timeout)
            line = result_line(dep.name, workload, result, trace)
            line.update(await dep.extra_metrics())
            if not dep.alive():
                line["died"] = True
            log(f"{dep.name} {workload}: TTFT p99 {line['ttft_ms_p99']} ms, ITL p99 "
                f"{line['itl_ms_p99']} ms, goodput {line['goodput_requests']}, errors "
                f"{line['errors']}")
            print(json.dumps(line), flush=True)
            lines.append(line)
            if args.records is not None:
                write_records(args.records / f"{dep.name}-{workload}.jsonl", result, trace)
    finally:
        await dep.stop()
    return lines


def goal_lines(lines: list[dict[str, Any]], rates: Sequence[float]) -> list[dict[str, Any]]:
    by = {(x["system"], x["workload"]): x for x in lines}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    out = []
    top = f"random@{max(rates):g}"
    da, dd = by.get(("dynamo-agg", top)), by.get(("dynamo-disagg", top))
    for name in ("turnout-disagg", "turnout-conditional"):  # both split 1 prefill + 1 decode
        t = by.get((name, top))
        if not (t and da and dd):
            continue
        itl = ratio(t["itl_ms_p99"], dd["itl_ms_p99"])
        ttft = ratio(t["ttft_ms_p99"], da["ttft_ms_p99"])
        out.append({"bench": "disagg", "goal": f"{top}: {name} ITL p99 <= "
                    "dynamo-disagg's and TTFT p99 <= dynamo-agg's",
                    "itl_p99_ratio_vs_dynamo_disagg": itl, "ttft_p99_ratio_vs_dynamo_agg": ttft,
                    "meets_goal": itl is not None and ttft is not None and itl <= 1
                    and ttft <= 1})
    c, a, d = (by.get((s, "prefix")) for s in PREFIX_SYSTEMS[::-1])
    if c and a and d:
        best = max(a["goodput_requests"], d["goodput_requests"])
        r = ratio(c["goodput_requests"], best)
        out.append({"bench": "disagg", "goal": "prefix: turnout-conditional goodput >= "
                    f"{GOAL_GOODPUT_RATIO}x max(turnout-agg, turnout-disagg)",
                    "goodput_ratio": r,
                    "meets_goal": r is not None and r >= GOAL_GOODPUT_RATIO})
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace, systems: list[str]) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    model = (args.model or default_model()).resolve()
    vocab = prompt_token_ids(model)
    rand = [(f"random@{r:g}", random_workload(args.requests, r, vocab, args.seed,
                                              args.prompt_tokens, args.output_tokens))
            for r in args.rates]
    prefix = [("prefix", prefix_workload(args.prefix_start, args.prefix_requests, args.prefix_rate,
                                         args.prefix_max_tokens, vocab, args.seed))
              ] if args.prefix_requests > 0 else []
    max_model_len = max(args.prefix_max_tokens + 512,
                        args.prompt_tokens[1] + args.output_tokens[1] + 64)
    log_root = Path(tempfile.mkdtemp(prefix="disagg-bench-"))
    log(f"logs under {log_root}; model {model}; the machine is shared: figures are noisy")
    lines: list[dict[str, Any]] = []
    failed = 0
    plan = [(s, rand) for s in systems]
    if prefix:
        plan += [(s, prefix) for s in systems if s in PREFIX_SYSTEMS]
    for i, (name, workloads) in enumerate(plan):
        system, _, kind = name.partition("-")
        log_dir = log_root / f"{i}-{name}"
        log_dir.mkdir(parents=True)
        port = args.port + 10 * i
        dep: Deployment = (TurnoutSystem(kind, port, log_dir, model, args, max_model_len,
                                         percentiles=workloads is rand)
                           if system == "turnout" else
                           DynamoSystem(kind, port, log_dir, model, args))
        try:
            lines += await run_system(dep, workloads, vocab, args)
        except RuntimeError as exc:
            log(str(exc))
            failed += 1
    for goal in goal_lines(lines, args.rates):
        print(json.dumps(goal), flush=True)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, in order, from {', '.join(SYSTEMS)}")
    parser.add_argument("--requests", type=int, default=300, help="per random workload")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[2.5, 8.0], help="arrival rates of the random workload, req/s")
    parser.add_argument("--prompt-tokens", type=token_range, default=(1000, 1800),
                        help="prompt lengths of the random workload, LO-HI tokens")
    parser.add_argument("--output-tokens", type=token_range, default=(100, 200),
                        help="output lengths of the random workload, LO-HI tokens")
    parser.add_argument("--prefix-requests", type=int, default=300,
                        help="Mooncake rows of the shared-prefix workload (0: skip it)")
    # Rows 3,600-3,899 share the most: cut to 8,192 tokens, 59% of their prompt tokens repeat
    # a prefix seen earlier in the window (rows 0-299: 6%).
    parser.add_argument("--prefix-start", type=int, default=3600,
                        help="first Mooncake row of the shared-prefix workload")
    parser.add_argument("--prefix-rate", type=float, default=2.0, help="its mean rate, req/s")
    parser.add_argument("--prefix-max-tokens", type=int, default=8192,
                        help="its prompts are cut to this many tokens")
    parser.add_argument("--speedup", type=float, default=1.0, help="mocker speed-up ratio")
    parser.add_argument("--kv-gbps", type=float, default=25.0, help="modelled KV transfer GB/s")
    parser.add_argument("--kv-bytes-per-token", type=int, default=131072)
    parser.add_argument("--model", type=Path, default=None,
                        help="HF model dir for every system (default: the tests' tiny model)")
    parser.add_argument("--turnout-args", default="",
                        help="more `turnout up` flags for turnout-disagg and turnout-conditional "
                             "(--turnout-args='--disagg-itl-miss-budget 0.005')")
    parser.add_argument("--records", type=Path, default=None,
                        help="write each request's TTFT and gaps under this directory, a "
                             "JSON-lines file per system and workload")
    parser.add_argument("--port", type=int, default=18500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems or len(set(systems)) != len(systems):
        parser.error(f"--systems: each of {', '.join(SYSTEMS)} at most once; got {systems}")
    if any(s.startswith("dynamo") for s in systems) and not (
            (DYNAMO_VENV / "bin" / "python").exists() and START_DISAGG.exists()):
        parser.error(f"Dynamo is not installed in {DYNAMO_VENV} (or {START_DISAGG} is missing)")
    if args.requests < 1 or not args.rates or min(args.rates) <= 0:
        parser.error("--requests and every rate must be positive")
    return run(main_async(args, systems))


if __name__ == "__main__":
    sys.exit(main())
