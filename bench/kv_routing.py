"""KV-aware routing on a real workload: replay a window of the Mooncake trace, open loop, against
Turnout (router modes kv, round-robin, random) and NVIDIA Dynamo 1.6.1 (kv) in one run.

Owns: turning the trace into token-id prompts (every 512-token hash id stands for the same 512
token ids wherever it appears, so the trace's prefix sharing becomes real prefix sharing at the
engines), the window's cache ceilings (an infinite single cache; engine-sized LRU caches, pooled
or one per worker with ideal prefix routing), starting each deployment fresh (Turnout: the
processes `turnout up --engine mocker` would start with N workers, each through
`turnout.testing.deployment`; Dynamo's frontend with `--router-mode kv` plus one
`python -m dynamo.mocker --num-workers N`), killing every process it started (by process group,
on every exit path), and one JSON line per system with the engine-side prefix-cache hit rate
(Σ usage.prompt_tokens_details.cached_tokens / Σ usage.prompt_tokens), TTFT, E2E and throughput,
then a Turnout-kv / Dynamo-kv comparison line. Does not own the HTTP client
(`bench/load_client.py`) or the model directory (`bench/overhead.py`'s `default_model`).

    python bench/kv_routing.py                         # 2,000 requests, time scale 10, speed-up 4
    python bench/kv_routing.py --window 500            # a quick run
    python bench/kv_routing.py --systems turnout-kv,dynamo-kv,dynamo-round-robin

Both sides get the same model directory (vocabulary 2,048, so Dynamo's mocker output ids 1000-1999
are ordinary tokens), the same prompts, block size 64, 16,384 KV blocks per worker, the same
speed-up and max model length. Progress goes to stderr, JSON lines to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from load_client import (  # noqa: E402  (path set up just above)
    LoadResult,
    Prompt,
    TraceRequest,
    percentile,
    run,
    run_trace,
    served_models,
)
from overhead import (  # noqa: E402
    DYNAMO_MOCKER_TOKEN_RANGE,
    covers_dynamo_tokens,
    default_model,
    prompt_token_ids,
)

from turnout.testing.deployment import Deployment as LocalDeployment  # noqa: E402
from turnout.testing.deployment import scrape_async  # noqa: E402

TRACE = Path("/work/shared/data/mooncake_synthetic_trace.jsonl")
DYNAMO_VENV = Path(os.environ.get("DYNAMO_VENV", "/tmp/dynamo-anchor"))
DYNAMO_INSTALL = Path("/work/shared/anchors/dynamo/install.sh")
TRACE_BLOCK_TOKENS = 512  # tokens per trace hash id
ENGINE_BLOCK_SIZE = 64
ENGINE_NUM_BLOCKS = 16384
DEFAULT_SYSTEMS = ("turnout-kv", "turnout-round-robin", "turnout-random", "dynamo-kv")
ROUTER_MODES = ("kv", "round-robin", "random")
GOAL_HIT_RATE_RATIO = 1.2  # Turnout kv hit rate over Dynamo kv hit rate


def log(msg: str) -> None:
    print(f"[kv_routing {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class TraceRow:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: list[int]


def load_window(path: Path, start: int, window: int) -> list[TraceRow]:
    """Rows start .. start+window-1 of the trace (fewer where the trace ends)."""
    rows: list[TraceRow] = []
    with path.open() as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if len(rows) >= window:
                break
            d = json.loads(line)
            rows.append(TraceRow(float(d["timestamp"]), int(d["input_length"]),
                                 int(d["output_length"]), list(d["hash_ids"])))
    if not rows:
        raise ValueError(f"{path} has no rows from index {start}")
    return rows


class TracePrompts:
    """Token-id prompts of trace rows. Hash id h always means the same 512 token ids, drawn from
    `vocab` by an RNG seeded with (seed, h); a prompt is its blocks in order, the last one cut to
    `input_length`. Prompts are kept as ready-made JSON arrays (`msgspec.Raw`): ~15k tokens a
    request as Python int lists would cost gigabytes for a 2,000-request window."""

    def __init__(self, vocab: Sequence[int], seed: int = 0) -> None:
        self.vocab = list(vocab)
        self.seed = seed
        self._blocks: dict[int, bytes] = {}  # hash id -> b"id,id,...,id" (512 ids)

    @property
    def distinct_blocks(self) -> int:
        return len(self._blocks)

    def block(self, hash_id: int) -> bytes:
        text = self._blocks.get(hash_id)
        if text is None:
            rng = random.Random(self.seed * 1_000_003 + hash_id)
            text = ",".join(map(str, rng.choices(self.vocab, k=TRACE_BLOCK_TOKENS))).encode()
            self._blocks[hash_id] = text
        return text

    def prompt(self, row: TraceRow) -> msgspec.Raw:
        parts: list[bytes] = []
        left = row.input_length
        for h in row.hash_ids:
            if left <= 0:
                break
            text = self.block(h)
            if left < TRACE_BLOCK_TOKENS:
                text = b",".join(text.split(b",", left)[:left])
            parts.append(text)
            left -= TRACE_BLOCK_TOKENS
        if left > 0:
            raise ValueError(f"hash_ids cover {len(row.hash_ids)} blocks, short of "
                             f"input_length {row.input_length}")
        return msgspec.Raw(b"[" + b",".join(parts) + b"]")


def build_trace(rows: Sequence[TraceRow], prompts: TracePrompts,
                time_scale: float) -> list[TraceRequest]:
    """Send offsets (seconds from the window's first request, divided by `time_scale`)."""
    t0 = rows[0].timestamp_ms
    # msgspec writes a Raw prompt verbatim into the request body; load_client's Prompt type does
    # not list it, hence the cast.
    return [TraceRequest((r.timestamp_ms - t0) / 1000.0 / time_scale,
                         cast(Prompt, prompts.prompt(r)), r.output_length) for r in rows]


def infinite_cache_bound(rows: Sequence[TraceRow]) -> dict[str, Any]:
    """Hit rate of one cache that never evicts and sees every request in order: per request,
    the longest prefix (in tokens) some earlier request already had, over all input tokens.
    `hit_rate` counts tokens exactly (a cut last block shares only its cut part);
    `hit_rate_64` rounds each request's hit down to whole 64-token engine blocks, the
    granularity at which engines report cached tokens."""
    seen: dict[int, int] = {}  # chained prefix key -> most tokens of that block seen
    total = hit = hit_64 = 0
    for row in rows:
        key = 0
        prefix = 0
        matching = True
        left = row.input_length
        for h in row.hash_ids:
            if left <= 0:
                break
            n = min(left, TRACE_BLOCK_TOKENS)
            key = hash((key, h))
            have = seen.get(key, 0)
            if matching:
                prefix += min(have, n)
                matching = have >= n
            if n > have:
                seen[key] = n
            left -= n
        total += row.input_length
        hit += prefix
        hit_64 += prefix // ENGINE_BLOCK_SIZE * ENGINE_BLOCK_SIZE
    return {"hit_rate": round(hit / total, 4), "hit_rate_64": round(hit_64 / total, 4),
            "input_tokens": total}


def lru_cache_bounds(rows: Sequence[TraceRow], workers: int,
                     blocks_per_worker: int) -> dict[str, float]:
    """Hit rates of engine-sized LRU caches (64-token blocks; no load, no in-flight pinning,
    so ceilings rather than predictions). `pooled_lru`: one cache of the fleet's whole capacity,
    as if the workers shared their KV. `routed_lru`: one cache per worker, each request sent to
    the cache holding its longest prefix (the next in turn when none holds any): what KV-aware
    routing reaches when load never outweighs overlap."""
    pooled: OrderedDict[int, None] = OrderedDict()
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(workers)]
    total = pooled_hit = routed_hit = 0
    for i, row in enumerate(rows):
        keys: list[int] = []
        key = 0
        left = row.input_length
        for h in row.hash_ids:
            n = min(left, TRACE_BLOCK_TOKENS)
            for j in range(n // ENGINE_BLOCK_SIZE):
                key = hash((key, h, j))
                keys.append(key)
            left -= n
            if n < TRACE_BLOCK_TOKENS or left <= 0:
                break
        total += row.input_length
        pooled_hit += _lru_visit(pooled, keys, workers * blocks_per_worker)
        overlaps = [_prefix_in(c, keys) for c in caches]
        best = max(range(workers), key=lambda w: overlaps[w])
        if overlaps[best] == 0:
            best = i % workers
        routed_hit += _lru_visit(caches[best], keys, blocks_per_worker)
    return {"pooled_lru_hit_rate": round(pooled_hit * ENGINE_BLOCK_SIZE / total, 4),
            "routed_lru_hit_rate": round(routed_hit * ENGINE_BLOCK_SIZE / total, 4)}


def _prefix_in(cache: OrderedDict[int, None], keys: list[int]) -> int:
    n = 0
    for k in keys:
        if k not in cache:
            break
        n += 1
    return n


def _lru_visit(cache: OrderedDict[int, None], keys: list[int], capacity: int) -> int:
    """Blocks of `keys`' prefix found in `cache`; then all of `keys` become most recent."""
    hit = _prefix_in(cache, keys)
    for k in keys:
        cache[k] = None
        cache.move_to_end(k)
    while len(cache) > capacity:
        cache.popitem(last=False)
    return hit


# ---------------------------------------------------------------------------------------------
# Deployments
# ---------------------------------------------------------------------------------------------


class Deployment:
    """Processes started for one system, each in its own process group (not a session: see
    turnout/up.py on autogroup scheduling), and a URL."""

    def __init__(self, name: str, port: int, log_dir: Path) -> None:
        self.name = name
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        path = self.log_dir / f"{label}.log"
        log(f"{self.name}: starting {shlex.join(cmd)} (log {path})")
        with path.open("wb") as out:
            self.procs.append(subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=str(REPO), process_group=0))

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    async def start(self, timeout_s: float) -> str:
        """Start, wait until every worker serves; the model name to send."""
        raise NotImplementedError

    async def extra_metrics(self) -> dict[str, Any]:
        return {}

    async def stop(self) -> None:
        """SIGTERM every process group and every descendant, then SIGKILL what is left."""
        doomed: list[psutil.Process] = []
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(p.pid)
                doomed += [top, *top.children(recursive=True)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)  # process_group=0: pgid == pid
            for q in doomed:
                with contextlib.suppress(psutil.Error):
                    q.send_signal(sig)
            if await _all_gone(doomed, within_s=10.0):
                break
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1.0)  # reap; they are dead by now

    def tail_logs(self, lines: int = 20) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path} ---\n" + "\n".join(tail))
        return "\n".join(out)


async def _all_gone(procs: Sequence[psutil.Process], within_s: float) -> bool:
    for _ in range(int(within_s * 10)):
        if not any(_running(p) for p in procs):
            return True
        await asyncio.sleep(0.1)
    return not any(_running(p) for p in procs)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class TurnoutDeployment(Deployment):
    def __init__(self, mode: str, port: int, log_dir: Path, workers: int, model: Path,
                 speedup: float, max_model_len: int, extra_args: list[str]) -> None:
        super().__init__(f"turnout-{mode}", port, log_dir)
        self.mode = mode
        self.workers = workers
        # One log per process in log_dir; the services' own default lease, as `turnout up`.
        self.local = LocalDeployment(log_dir, lease_ttl_s=None)
        lo, hi = DYNAMO_MOCKER_TOKEN_RANGE
        self.flags = ["--engine", "mocker", "--speedup-ratio", f"{speedup:g}",
                      "--router-mode", mode, "--model", str(model),
                      "--block-size", str(ENGINE_BLOCK_SIZE),
                      "--num-blocks", str(ENGINE_NUM_BLOCKS),
                      "--max-model-len", str(max_model_len), *extra_args]
        if covers_dynamo_tokens(prompt_token_ids(model)):
            # Same output ids as Dynamo's mocker, so both frontends detokenize alike.
            self.flags += ["--token-range-lo", str(lo), "--token-range-hi", str(hi)]

    async def start(self, timeout_s: float) -> str:
        log(f"{self.name}: starting with up-style flags {shlex.join(self.flags)} "
            f"(logs {self.log_dir})")
        # Returns once the frontend is healthy and the router knows every worker: the router
        # must know them all before the first trace request.
        self.local.start_up(self.flags, self.workers, port=self.port, timeout=timeout_s)
        return (await served_models(self.base_url))[0]

    def alive(self) -> bool:
        return bool(self.local.services) and all(s.alive() for s in self.local.services)

    async def stop(self) -> None:
        self.local.stop(grace_s=10)

    def tail_logs(self, lines: int = 20) -> str:
        return self.local.logs(tail_chars=lines * 160)

    async def extra_metrics(self) -> dict[str, Any]:
        """The router's own view: predicted overlap of its decisions, KV events indexed."""
        try:
            m = await scrape_async(self.local.router.metrics_url())
        except (LookupError, OSError, httpx.HTTPError, ValueError) as exc:
            return {"router_metrics_error": f"{type(exc).__name__}: {exc}"}
        overlap = m.histogram("turnout_router_predicted_overlap_ratio")
        return {
            "router_predicted_overlap_mean": (None if overlap.mean is None
                                              else round(overlap.mean, 4)),
            "router_kv_decisions": int(overlap.count),
            "router_kv_events_applied": int(m.value("turnout_router_kv_events_applied_total")),
            "router_kv_resyncs": int(m.value("turnout_router_kv_resyncs_total")),
            "router_event_gaps": int(m.value("turnout_router_event_gaps_total")),
            "router_kv_index_blocks": int(m.value("turnout_router_kv_index_blocks")),
            "routers": len(self.local.by_role("router")),
            **self.balance(),
        }

    def balance(self) -> dict[str, Any]:
        """Load balance across workers: prefill work (prompt tokens computed) and requests
        admitted per worker, as max over mean (1.0: even). With router replicas this is
        what replica sync is for."""
        prefill, admitted = [], []
        for worker in self.local.workers():
            m = worker.metrics()
            prefill.append(m.value("turnout_worker_prefill_tokens_total"))
            admitted.append(sum(m.by_label("turnout_worker_requests_total", "outcome").values()))

        def skew(xs: list[float]) -> float | None:
            return round(max(xs) * len(xs) / sum(xs), 3) if xs and sum(xs) else None

        return {"worker_prefill_max_over_mean": skew(prefill),
                "worker_requests_max_over_mean": skew(admitted)}


class DynamoDeployment(Deployment):
    def __init__(self, mode: str, port: int, log_dir: Path, workers: int, model: Path,
                 speedup: float, max_model_len: int) -> None:
        super().__init__(f"dynamo-{mode}", port, log_dir)
        self.workers = workers
        self.file_kv = log_dir / "file-kv"
        python = str(DYNAMO_VENV / "bin" / "python")
        self.frontend_cmd = [python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
                             "--http-port", str(port), "--router-mode", mode]
        # Decode is divided by speedup * decode-speedup (default 1): the same as Turnout's.
        self.mocker_cmd = [python, "-m", "dynamo.mocker", "--model-path", str(model),
                           "--num-workers", str(workers), "--speedup-ratio", f"{speedup:g}",
                           "--block-size", str(ENGINE_BLOCK_SIZE),
                           "--num-gpu-blocks-override", str(ENGINE_NUM_BLOCKS),
                           "--max-num-seqs", "256", "--max-num-batched-tokens", "8192",
                           "--max-model-len", str(max_model_len)]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "DYN_DISCOVERY_BACKEND": "file",
                "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq",
                "DYN_FILE_KV": str(self.file_kv)}

    def _registered_workers(self) -> int:
        """Generate endpoints in the file discovery store (one per mocker worker)."""
        instances = self.file_kv / "v1" / "instances"
        if not instances.is_dir():
            return 0
        return sum(1 for p in instances.iterdir()
                   if p.name.startswith("dynamo%2Fbackend%2Fgenerate%2F"))

    async def start(self, timeout_s: float) -> str:
        self.file_kv.mkdir(parents=True, exist_ok=True)
        env = self._env()
        self.spawn("dynamo-frontend", self.frontend_cmd, env)
        self.spawn("dynamo-mocker", self.mocker_cmd, env)
        deadline = time.monotonic() + timeout_s
        while True:
            models: list[str] = []
            with contextlib.suppress(OSError, ConnectionError, TimeoutError, ValueError):
                models = await served_models(self.base_url)
            if models and self._registered_workers() >= self.workers:
                break
            if time.monotonic() > deadline or not self.alive():
                raise RuntimeError(f"{self.name}: not up ({len(models)} models, "
                                   f"{self._registered_workers()}/{self.workers} workers)")
            await asyncio.sleep(0.25)
        # The frontend watches the same store; give it a moment to connect to every worker.
        await asyncio.sleep(2.0)
        return models[0]


# ---------------------------------------------------------------------------------------------
# One system, measured
# ---------------------------------------------------------------------------------------------


async def probe(base_url: str, model: str, vocab: Sequence[int], timeout_s: float) -> None:
    """One 1-token request of a few random tokens (cached nowhere the trace goes), until it
    succeeds: a listed model does not mean a routable worker yet."""
    rng = random.Random(-1)
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        prompt = [rng.choice(vocab) for _ in range(16)]
        res = await run_trace(base_url, model, [TraceRequest(0.0, prompt, 1)],
                              request_timeout=10.0)
        if res.records[0].error is None:
            return
        last = res.records[0].error
        await asyncio.sleep(0.5)
    raise RuntimeError(f"probe request kept failing: {last}")


def result_line(name: str, result: LoadResult, trace: Sequence[TraceRequest],
                rows: Sequence[TraceRow]) -> dict[str, Any]:
    s = result.summary()
    ok = [r for r in result.records if r.ok]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    expected = sum(row.input_length for row, r in zip(rows, result.records, strict=True) if r.ok)
    # How late the client sent each request against its schedule: the client's own health.
    lag = result.send_lags(trace)
    system, _, mode = name.partition("-")
    line = {
        "bench": "kv_routing", "system": system, "router_mode": mode,
        "requests": s["requests"], "completed": s["completed"], "errors": s["errors"],
        "hit_rate": round(cached / prompt, 4) if prompt else None,
        # Unweighted mean over requests: compare with the router's predicted overlap ratio.
        "hit_rate_request_mean": (
            round(sum((r.cached_tokens or 0) / r.prompt_tokens for r in ok if r.prompt_tokens)
                  / len(ok), 4) if ok else None),
        "cached_tokens": cached, "prompt_tokens": prompt,
        "ttft_ms_p50": s["ttft_ms_p50"], "ttft_ms_p99": s["ttft_ms_p99"],
        "e2e_ms_p50": s["e2e_ms_p50"], "e2e_ms_p99": s["e2e_ms_p99"],
        "req_s": s["req_s"], "output_tok_s": s["output_tok_s"], "duration_s": s["duration_s"],
        "send_lag_ms_p99": round((percentile(lag, 99) or 0.0) * 1000.0, 1),
    }
    if prompt != expected:
        line["prompt_tokens_expected"] = expected  # the server counted other tokens than sent
    if s["errors"]:
        line["error_kinds"] = s["error_kinds"]
    return line


async def run_system(dep: Deployment, trace: Sequence[TraceRequest], rows: Sequence[TraceRow],
                     vocab: Sequence[int], startup_timeout: float,
                     request_timeout: float) -> dict[str, Any]:
    try:
        t_start = time.monotonic()
        try:
            model = await dep.start(startup_timeout)
            await probe(dep.base_url, model, vocab, startup_timeout)
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise RuntimeError(f"{dep.name} failed to start: {exc}\n{dep.tail_logs()}") from exc
        log(f"{dep.name} serving {model!r} after {time.monotonic() - t_start:.1f}s; replaying "
            f"{len(trace)} requests over {trace[-1].at:.1f}s")
        result = await run_trace(dep.base_url, model, trace, request_timeout=request_timeout)
        line = result_line(dep.name, result, trace, rows)
        line.update(await dep.extra_metrics())
        if not dep.alive():
            line["died"] = True
            log(f"{dep.name}: a process exited during the run\n{dep.tail_logs()}")
        log(f"{dep.name}: hit rate {line['hit_rate']}, TTFT p50 {line['ttft_ms_p50']} ms, "
            f"{line['req_s']} req/s, errors {line['errors']}")
        return line
    finally:
        await dep.stop()
        log(f"{dep.name} stopped")


def compare_line(lines: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    t, d = lines.get("turnout-kv"), lines.get("dynamo-kv")
    if t is None or d is None:
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    hit = ratio(t["hit_rate"], d["hit_rate"])
    ttft = ratio(t["ttft_ms_p50"], d["ttft_ms_p50"])
    return {
        "bench": "kv_routing", "compare": "turnout-kv/dynamo-kv",
        "hit_rate_ratio": hit, "ttft_p50_ratio": ttft,
        "turnout_hit_rate": t["hit_rate"], "dynamo_hit_rate": d["hit_rate"],
        "turnout_ttft_ms_p50": t["ttft_ms_p50"], "dynamo_ttft_ms_p50": d["ttft_ms_p50"],
        "goal": f"hit_rate_ratio >= {GOAL_HIT_RATE_RATIO} and ttft_p50_ratio <= 1",
        "meets_goal": (hit is not None and ttft is not None and hit >= GOAL_HIT_RATE_RATIO
                       and ttft <= 1.0),
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def make_deployment(name: str, index: int, args: argparse.Namespace, model: Path,
                    max_model_len: int, log_root: Path) -> Deployment:
    system, _, mode = name.partition("-")
    port = args.port + 10 * index  # a fresh port per deployment: no TIME_WAIT surprises
    log_dir = log_root / name
    log_dir.mkdir(parents=True, exist_ok=True)
    if system == "turnout":
        return TurnoutDeployment(mode, port, log_dir, args.workers, model, args.speedup,
                                 max_model_len, shlex.split(args.turnout_args))
    return DynamoDeployment(mode, port, log_dir, args.workers, model, args.speedup,
                            max_model_len)


async def main_async(args: argparse.Namespace, systems: list[str], model: Path,
                     rows: list[TraceRow], trace: list[TraceRequest], vocab: list[int],
                     max_model_len: int) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # so `finally` kills what we started
    log_root = Path(tempfile.mkdtemp(prefix="kv-routing-"))
    log(f"logs under {log_root}")
    lines: dict[str, dict[str, Any]] = {}
    failed = 0
    try:
        for i, name in enumerate(systems):
            dep = make_deployment(name, i, args, model, max_model_len, log_root)
            try:
                line = await run_system(dep, trace, rows, vocab, args.startup_timeout,
                                        args.request_timeout)
            except RuntimeError as exc:
                log(str(exc))
                failed += 1
                continue
            line.update({"window": len(rows), "start": args.start,
                         "time_scale": args.time_scale, "speedup": args.speedup,
                         "workers": args.workers})
            lines[name] = line
            print(json.dumps(line), flush=True)
    finally:
        if not args.keep_logs and not failed:
            shutil.rmtree(log_root, ignore_errors=True)
    summary = compare_line(lines)
    if summary is not None:
        print(json.dumps(summary), flush=True)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help="comma-separated, run in this order: turnout-MODE or dynamo-MODE "
                             f"with MODE one of {', '.join(ROUTER_MODES)}")
    parser.add_argument("--window", type=int, default=2000, help="requests replayed")
    parser.add_argument("--start", type=int, default=0, help="trace index of the first one")
    parser.add_argument("--time-scale", type=float, default=10.0,
                        help="trace timestamps are divided by this (10: ten times faster)")
    parser.add_argument("--speedup", type=float, default=4.0, help="mocker speed-up ratio")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--model", type=Path, default=None,
                        help="HF model dir for both sides (default: bench/overhead.py's "
                             "2,048-token build of tests/tiny_model.py)")
    parser.add_argument("--port", type=int, default=18300,
                        help="first HTTP port; deployment i uses port + 10*i")
    parser.add_argument("--turnout-args", default="",
                        help="extra `turnout up` flags (split among the processes as "
                             "`turnout up` splits them), one shell-quoted string")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hash-id token blocks")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the deployments' logs (always kept when one fails)")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in systems:
        system, _, mode = name.partition("-")
        if system not in ("turnout", "dynamo") or mode not in ROUTER_MODES:
            parser.error(f"unknown system {name!r}")
    if len(set(systems)) != len(systems):
        parser.error("a system is listed twice")
    dynamo_python = DYNAMO_VENV / "bin" / "python"
    if any(s.startswith("dynamo") for s in systems) and not dynamo_python.exists():
        parser.error(f"Dynamo is not installed in {DYNAMO_VENV}: run bash {DYNAMO_INSTALL}")

    rows = load_window(args.trace, args.start, args.window)
    model = (args.model or default_model()).resolve()
    vocab = prompt_token_ids(model)
    t = time.monotonic()
    prompts = TracePrompts(vocab, args.seed)
    trace = build_trace(rows, prompts, args.time_scale)
    max_model_len = max(r.input_length + r.output_length for r in rows) + ENGINE_BLOCK_SIZE
    bound = infinite_cache_bound(rows)
    bound.update(lru_cache_bounds(rows, args.workers, ENGINE_NUM_BLOCKS))
    n_in = bound["input_tokens"]
    log(f"window {args.start}..{args.start + len(rows) - 1} ({len(rows)} requests, "
        f"{n_in / len(rows):.0f} input tokens mean, "
        f"{sum(r.output_length for r in rows) / len(rows):.0f} output), "
        f"{prompts.distinct_blocks} distinct hash blocks, prompts built in "
        f"{time.monotonic() - t:.1f}s; replay {trace[-1].at:.1f}s per system; model {model}; "
        f"max model len {max_model_len}")
    print(json.dumps({"bench": "kv_routing", "bound": "infinite_single_cache",
                      "window": len(rows), "start": args.start, **bound}), flush=True)
    try:
        return run(main_async(args, systems, model, rows, trace, vocab, max_model_len))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
