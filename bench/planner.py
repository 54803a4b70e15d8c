"""The SLA planner against static layouts, under time-varying load, in one run.

Owns: the load shapes (a sinusoid between `--low-rate` and `--high-rate`, then a step burst
`--burst-low-rate` -> 16x -> low), replayed open loop against mocker workers (prompts of `--isl`
random token ids, `--osl` output tokens, `ignore_eos`); one fresh deployment per system through
`turnout.testing.deployment` (router, frontend, workers or a planner that starts them; file
discovery on 127.0.0.1), always reaped; and one JSON line per system and phase plus a goal
line. Systems, all with the same peak budget of `--budget` workers:

- `planner`: `turnout planner --planner-mode disaggregated` with the local connector, between 1
  and `budget - 1` workers per pool and `--max-gpus budget` overall, seeded with the mocker's
  step-time profile (model time; its latency correction learns the slowed-down clock);
- `planner-agg`: `turnout planner --planner-mode aggregated`, the same but one pool of between 1
  and `budget` aggregated workers (no prefill -> decode hand-off);
- `static-agg`: `budget` aggregated workers;
- `static-<P>p<D>d`: every split P + D = budget (`--disagg-mode always`).

The mockers run at `--speedup-ratio` 0.1 (ten times slower than the modelled GPU, so a few
requests per second load a worker while the 2-core machine still has CPU for frontend, router
and client) with 1,024-token prefill chunks, 16 sequences per batch and 2,048 KV blocks;
the targets are in that slowed clock (TTFT 1,500 ms, ITL 150 ms by default).

Per system and phase (`sinusoid`, `burst`, `all`): SLO attainment (share of requests with TTFT
within the target and mean inter-token latency (E2E - TTFT)/(tokens - 1) within the target),
goodput (such requests per second), worker-seconds (static: workers x the phase's wall time;
planner: the live worker processes it started, sampled every 0.25 s, integrated), goodput per
worker-second, and aborted requests (an error or fewer tokens than asked for). For the planner
also: how long after the burst started its worker target reached the highest it set during the
burst (`burst_answer_s`; 0 when it was there already, with `target_at_burst` and
`target_peak_in_burst` beside it). The goal line judges each planner system that ran (its mode,
ratio, attainment, burst answer and aborted requests, and whether it meets every goal) against
the best static layout: attainment >= 99% during the sinusoid, goodput per worker-second >= 1.3x
the best static layout's (over both phases), the burst answered within two adjustment
intervals, nothing aborted. `meets_goal` is true when at least one planner system meets them
all; `planners_meeting_goal` names which.

    python bench/planner.py            # 6 systems, ~11 minutes on 2 cores (estimated)
    python bench/planner.py --quick    # budget 3 (5 systems), shorter phases: ~4 minutes

Does not own the HTTP client (`bench/load_client.py`) or process plumbing (the harness).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from load_client import LoadResult, RequestRecord, TraceRequest, run_trace  # noqa: E402

from common.prometheus_text import Metrics  # noqa: E402
from turnout.testing.deployment import Deployment, Service, scrape_async  # noqa: E402

GOAL_ATTAINMENT = 0.99
GOAL_RATIO = 1.3
GOAL_BURST_INTERVALS = 2
BURST_FACTOR = 16
# The mocker's step-time polynomials (services/worker/engines/mocker/timing.py) in model time:
# the planner's profile, as `turnout profile` writes it.
MOCKER_PROFILE = {"prefill_ms": [4.209989e-7, 0.01518344, 16.50142],
                  "decode_ms": [5.74, 0.0, 54.01, -25.74], "block_size": 64}


def log(msg: str) -> None:
    print(f"[planner-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Load shapes
# ---------------------------------------------------------------------------------------------


def arrivals(rate_at: Any, duration_s: float) -> list[float]:
    """Send times over `duration_s` for the rate function `rate_at(t)` (req/s): one request each
    time the integrated rate crosses a whole number (even spacing, no Poisson noise, so short
    runs compare systems on the very same schedule)."""
    out, acc, t, dt = [], 0.0, 0.0, 0.01
    while t < duration_s:
        acc += rate_at(t) * dt
        t += dt
        if acc >= 1.0:
            acc -= 1.0
            out.append(t)
    return out


def sinusoid(low: float, high: float, period_s: float, duration_s: float) -> list[float]:
    """Starts at `low`, peaks at `high` half a period later."""
    return arrivals(lambda t: low + (high - low) * (1 - math.cos(2 * math.pi * t / period_s)) / 2,
                    duration_s)


def burst(low: float, before_s: float, during_s: float, after_s: float) -> list[float]:
    def rate(t: float) -> float:
        return low * BURST_FACTOR if before_s <= t < before_s + during_s else low
    return arrivals(rate, before_s + during_s + after_s)


def trace(times: Sequence[float], isl: int, osl: int, rng: random.Random) -> list[TraceRequest]:
    # Distinct random prompts: nothing is prefix-cached, every prompt costs its full prefill.
    return [TraceRequest(t, [rng.randrange(32, 127) for _ in range(isl)], osl) for t in times]


# ---------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------


PLANNER_MODES = {"planner": "disaggregated", "planner-agg": "aggregated"}


def systems(budget: int) -> list[str]:
    return [*PLANNER_MODES, "static-agg",
            *(f"static-{p}p{budget - p}d" for p in range(1, budget))]


def worker_args(args: argparse.Namespace) -> list[str]:
    return ["--engine", "mocker", "--speedup-ratio", f"{args.speedup:g}",
            "--max-num-batched-tokens", str(args.step_tokens), "--max-num-seqs", str(args.batch),
            "--num-blocks", str(args.blocks), "--drain-grace-s", "60",
            "--kv-pull-timeout-ms", "10000"]


class System:
    """One deployment under test; `workers_now()` counts the workers it pays for."""

    def __init__(self, name: str, workdir: Path, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        self.dep = Deployment(workdir)
        self.planner: Service | None = None
        self.static_workers = 0

    def start(self) -> None:
        a, dep = self.args, self.dep
        mode = PLANNER_MODES.get(self.name)
        disagg = self.name != "static-agg" and mode != "aggregated"
        dep.start_router(*(["--disagg-mode", "always"] if disagg else []),
                         *shlex.split(a.router_args))
        if mode is not None:
            profile = self.dep.workdir / "mocker-profile.json"
            profile.write_text(json.dumps(MOCKER_PROFILE))
            # Disaggregated: both pools need one worker, so each holds at most budget - 1.
            most = a.budget - 1 if mode == "disaggregated" else a.budget
            self.planner = dep.start_planner(
                "--planner-id", "bench", "--planner-mode", mode,
                "--profile", str(profile), "--min-replicas", "1",
                "--max-replicas", str(most), "--max-gpus", str(a.budget),
                "--adjustment-interval-s", f"{a.interval:g}",
                "--reactive-interval-s", f"{a.interval / 4:g}",
                "--scale-down-cooldown-s", f"{a.cooldown:g}",
                "--ttft-slo-ms", f"{a.ttft_ms:g}", "--itl-slo-ms", f"{a.itl_ms:g}",
                "--max-step-tokens", str(a.step_tokens), "--max-batch", str(a.batch),
                "--worker-args", " ".join(worker_args(a)), "--log-level", "info")
        elif self.name == "static-agg":
            for _ in range(a.budget):
                dep.start_worker(*worker_args(a))
            self.static_workers = a.budget
        else:
            p, d = (int(x) for x in self.name[len("static-"):-1].split("p"))
            for i in range(p):
                dep.start_worker("--worker-mode", "prefill", *worker_args(a), worker_id=f"p{i}")
            for i in range(d):
                dep.start_worker("--worker-mode", "decode", *worker_args(a), worker_id=f"d{i}")
            self.static_workers = p + d
        dep.start_frontend()
        dep.wait_healthy(120)
        dep.wait_routable(self.static_workers or (2 if disagg else 1), 120)

    def workers_now(self) -> int:
        if self.planner is None:
            return self.static_workers
        try:  # started, serving or draining: every process it started costs until it exits
            kids = psutil.Process(self.planner.pid).children()
            return sum(1 for k in kids if k.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return 0

    def stop(self) -> None:
        self.dep.stop(grace_s=70.0 if self.planner is not None else 5.0)


class Sampler:
    """Samples the system's workers (and the planner's target) every `every_s` seconds."""

    def __init__(self, system: System, every_s: float = 0.25) -> None:
        self.system = system
        self.every_s = every_s
        self.samples: list[tuple[float, int, int | None]] = []  # (time, workers, target)

    async def run(self) -> None:
        url = None
        if self.system.planner is not None:
            url = self.system.planner.metrics_url()
        while True:
            target = None
            if url is not None:
                try:
                    m: Metrics = await scrape_async(url, within_s=1.0)
                    target = int(m.value("turnout_planner_target_replicas"))  # every role
                except Exception:  # a missed sample is a gap, not a failure
                    target = None
            self.samples.append((time.perf_counter(), self.system.workers_now(), target))
            await asyncio.sleep(self.every_s)

    def worker_seconds(self, start: float, end: float) -> float:
        """∫ workers dt over [start, end], each sample held until the next."""
        total = 0.0
        pts = self.samples
        for (t0, n, _), (t1, _, _) in itertools.pairwise(pts):
            lo, hi = max(t0, start), min(t1, end)
            if hi > lo:
                total += n * (hi - lo)
        return total

    def target_at(self, at: float) -> int | None:
        before = [tg for t, _, tg in self.samples if t <= at and tg is not None]
        return before[-1] if before else None

    def answer_after(self, at: float, until: float) -> float | None:
        """Seconds from `at` until the planner's target first reached the highest target it
        set between `at` and `until` (0: it was there already); None without samples."""
        window = [(t, tg) for t, _, tg in self.samples if at < t <= until and tg is not None]
        start = self.target_at(at)
        if start is None or not window:
            return None
        peak = max(tg for _, tg in window)
        if start >= peak:
            return 0.0
        return next(t - at for t, tg in window if tg >= peak)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def aborted(r: RequestRecord, osl: int) -> bool:
    return not r.ok or r.output_tokens != osl


def within_slo(r: RequestRecord, args: argparse.Namespace) -> bool:
    if aborted(r, args.osl) or r.ttft is None or r.e2e is None:
        return False
    itl = (r.e2e - r.ttft) / (args.osl - 1) if args.osl > 1 else 0.0
    return r.ttft * 1000 <= args.ttft_ms and itl * 1000 <= args.itl_ms


def phase_line(system: System, phase: str, records: list[RequestRecord], start: float,
               end: float, sampler: Sampler, args: argparse.Namespace) -> dict[str, Any]:
    wall = max(1e-9, end - start)
    good = sum(1 for r in records if within_slo(r, args))
    worker_s = sampler.worker_seconds(start, end)
    ttft = sorted(r.ttft for r in records if r.ttft is not None)
    line: dict[str, Any] = {
        "bench": "planner", "system": system.name, "phase": phase, "requests": len(records),
        "slo_attainment": round(good / len(records), 4) if records else None,
        "goodput_req_s": round(good / wall, 4),
        "worker_seconds": round(worker_s, 1),
        "goodput_per_worker_s": round(good / worker_s, 5) if worker_s else None,
        "aborted": sum(1 for r in records if aborted(r, args.osl)),
        "wall_s": round(wall, 1),
        "mean_workers": round(worker_s / wall, 2),
        "ttft_ms_p50": round(ttft[len(ttft) // 2] * 1000, 1) if ttft else None,
        "ttft_ms_p99": round(ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))] * 1000, 1)
        if ttft else None,
    }
    errors = [r.error for r in records if r.error]
    if errors:
        line["first_errors"] = errors[:3]
    return line


async def queued_moves(system: System) -> float:
    """Requests the router moved before their first token to a worker that joined (0 when its
    metrics cannot be read)."""
    try:
        m = await scrape_async(system.dep.router.metrics_url(), within_s=2.0)
    except Exception:  # a missed figure, not a failed run
        return 0.0
    return m.value("turnout_router_queued_moves_total")


async def run_system(system: System, phases: list[tuple[str, list[TraceRequest]]],
                     args: argparse.Namespace) -> list[dict[str, Any]]:
    sampler = Sampler(system)
    sampling = asyncio.create_task(sampler.run())
    lines = []
    spans: list[tuple[float, float, list[RequestRecord]]] = []
    try:
        for phase, items in phases:
            moves_before = await queued_moves(system)
            start = time.perf_counter()
            result: LoadResult = await run_trace(system.dep.url, "mock", items,
                                                 request_timeout=args.request_timeout)
            end = time.perf_counter()
            line = phase_line(system, phase, result.records, start, end, sampler, args)
            line["queued_moves"] = await queued_moves(system) - moves_before
            if phase == "burst" and system.planner is not None:
                # The burst starts `--burst-before-s` into the phase.
                at = start + args.burst_before_s
                answer = sampler.answer_after(at, at + args.burst_during_s)
                line["burst_answer_s"] = None if answer is None else round(answer, 2)
                line["target_at_burst"] = sampler.target_at(at)
                line["target_peak_in_burst"] = max(
                    (tg for t, _, tg in sampler.samples
                     if at < t <= at + args.burst_during_s and tg is not None), default=None)
            spans.append((start, end, result.records))
            lines.append(line)
            print(json.dumps(line), flush=True)
            log(f"{system.name} {phase}: attainment {line['slo_attainment']}, goodput/worker-s "
                f"{line['goodput_per_worker_s']}, mean workers {line['mean_workers']}, "
                f"aborted {line['aborted']}")
    finally:
        sampling.cancel()
    records = [r for _, _, recs in spans for r in recs]
    good = sum(1 for r in records if within_slo(r, args))
    worker_s = sum(sampler.worker_seconds(s, e) for s, e, _ in spans)
    wall = sum(e - s for s, e, _ in spans)
    total = {"bench": "planner", "system": system.name, "phase": "all",
             "requests": len(records),
             "slo_attainment": round(good / len(records), 4) if records else None,
             "goodput_req_s": round(good / wall, 4) if wall else None,
             "worker_seconds": round(worker_s, 1),
             "goodput_per_worker_s": round(good / worker_s, 5) if worker_s else None,
             "aborted": sum(1 for r in records if aborted(r, args.osl))}
    print(json.dumps(total), flush=True)
    lines.append(total)
    return lines


def goal_line(lines: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Each planner system that ran against the best static layout, goal by goal."""
    by = {(x["system"], x["phase"]): x for x in lines}
    statics = [x for (s, p), x in by.items() if s not in PLANNER_MODES and p == "all"
               and x.get("goodput_per_worker_s") is not None]
    best = max(statics, key=lambda x: x["goodput_per_worker_s"], default=None)
    limit = GOAL_BURST_INTERVALS * args.interval
    planners = []
    for name, mode in PLANNER_MODES.items():
        total = by.get((name, "all"))
        if total is None:
            continue  # not run
        ratio = (round(total["goodput_per_worker_s"] / best["goodput_per_worker_s"], 3)
                 if best and best["goodput_per_worker_s"] and total.get("goodput_per_worker_s")
                 else None)
        attainment = by.get((name, "sinusoid"), {}).get("slo_attainment")
        answer = by.get((name, "burst"), {}).get("burst_answer_s")
        checks = {"attainment": attainment is not None and attainment >= GOAL_ATTAINMENT,
                  "ratio": ratio is not None and ratio >= GOAL_RATIO,
                  "burst_answer": answer is not None and answer <= limit,
                  "aborted": total.get("aborted", 0) == 0}
        planners.append({
            "system": name, "planner_mode": mode, "sinusoid_attainment": attainment,
            "goodput_per_worker_s_ratio_vs_best_static": ratio, "burst_answer_s": answer,
            "aborted": total.get("aborted", 0),
            "missed": [goal for goal, ok in checks.items() if not ok],
            "meets_goal": all(checks.values())})
    meeting = [x["system"] for x in planners if x["meets_goal"]]
    return {"bench": "planner", "goal": f"each planner: sinusoid attainment >= "
            f"{GOAL_ATTAINMENT}, goodput/worker-s >= {GOAL_RATIO}x best static, burst answered "
            f"within {GOAL_BURST_INTERVALS} intervals, none aborted",
            "best_static": best["system"] if best else None,
            "best_static_goodput_per_worker_s": best["goodput_per_worker_s"] if best else None,
            "static_aborted": sum(x.get("aborted", 0) for x in statics),
            "burst_answer_limit_s": limit, "planners": planners,
            "planners_meeting_goal": meeting, "meets_goal": bool(meeting)}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    phases = [
        ("sinusoid", trace(sinusoid(args.low_rate, args.high_rate, args.period_s,
                                    args.sinusoid_s), args.isl, args.osl, rng)),
        ("burst", trace(burst(args.burst_low_rate, args.burst_before_s, args.burst_during_s,
                              args.burst_after_s), args.isl, args.osl, rng)),
    ]
    names = args.systems.split(",") if args.systems else systems(args.budget)
    unknown = set(names) - set(systems(args.budget))
    if unknown:
        raise SystemExit(f"unknown systems for --budget {args.budget}: {sorted(unknown)}")
    root = Path(tempfile.mkdtemp(prefix="planner-bench-"))
    log(f"logs under {root}; {len(phases[0][1])} + {len(phases[1][1])} requests per system; "
        "the machine is shared: figures are noisy")
    lines: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        workdir = root / f"{i}-{name}"
        workdir.mkdir()
        system = System(name, workdir, args)
        try:
            t = time.monotonic()
            await asyncio.to_thread(system.start)
            log(f"{name} serving after {time.monotonic() - t:.1f}s")
            lines += await run_system(system, phases, args)
        finally:
            await asyncio.to_thread(system.stop)
    print(json.dumps(goal_line(lines, args)), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="budget 3, 20 s phases, 1 s planner interval (~3 minutes)")
    parser.add_argument("--systems", default="",
                        help="comma-separated subset of planner (disaggregated), planner-agg, "
                        "static-agg, static-<P>p<D>d")
    parser.add_argument("--budget", type=int, default=4, help="peak workers of every system")
    parser.add_argument("--router-args", default="",
                        help="extra router flags for every system "
                             "(--router-args=--no-rebalance-on-join)")
    parser.add_argument("--isl", type=int, default=1000)
    parser.add_argument("--osl", type=int, default=20)
    parser.add_argument("--ttft-ms", type=float, default=1500.0)
    parser.add_argument("--itl-ms", type=float, default=150.0)
    parser.add_argument("--low-rate", type=float, default=0.5, help="sinusoid low, req/s")
    parser.add_argument("--high-rate", type=float, default=5.0, help="sinusoid high, req/s")
    parser.add_argument("--period-s", type=float, default=50.0)
    parser.add_argument("--sinusoid-s", type=float, default=50.0)
    parser.add_argument("--burst-low-rate", type=float, default=0.35,
                        help=f"burst: low rate, req/s ({BURST_FACTOR}x during the burst)")
    parser.add_argument("--burst-before-s", type=float, default=10.0)
    parser.add_argument("--burst-during-s", type=float, default=15.0)
    parser.add_argument("--burst-after-s", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=2.0,
                        help="planner: --adjustment-interval-s")
    parser.add_argument("--cooldown", type=float, default=10.0,
                        help="planner: --scale-down-cooldown-s")
    parser.add_argument("--speedup", type=float, default=0.1, help="mocker --speedup-ratio")
    parser.add_argument("--step-tokens", type=int, default=1024,
                        help="mocker --max-num-batched-tokens (planner --max-step-tokens)")
    parser.add_argument("--batch", type=int, default=16,
                        help="mocker --max-num-seqs (planner --max-batch)")
    parser.add_argument("--blocks", type=int, default=2048, help="mocker --num-blocks")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.quick:
        args.budget = 3
        args.period_s = args.sinusoid_s = 20.0
        args.burst_before_s, args.burst_during_s, args.burst_after_s = 4.0, 8.0, 8.0
        args.cooldown = 6.0
        args.interval = 1.0
    if args.budget < 2 or args.osl < 2 or args.isl < 1:
        parser.error("need --budget >= 2, --osl >= 2 and --isl >= 1")
    from load_client import run

    return run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
