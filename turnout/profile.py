"""`turnout profile`: sweep one worker over prompt lengths and batch sizes and write the
performance file the planner reads with `--profile`.

It starts a private deployment on 127.0.0.1 (its own temporary file discovery): one
`turnout worker` with every worker and engine flag given here (the mocker by default; any
engine the worker runs), a router and a frontend. For each point of the grid (prompt length L x
batch size B) it sends B requests at once, each a fresh random prompt of L token ids (nothing
prefix-cached) generating `--decode-tokens` tokens (`ignore_eos`), and collects the engine steps
the worker publishes on its event plane (`fpm`: prefill tokens, decode batch, KV blocks in use,
duration), showing progress on stderr. Failure detection is relaxed in this private deployment
(the worker heartbeats every 500 ms unless `--heartbeat-interval-ms` says otherwise; eight
missed before a verdict), so a busy host's stalls do not fail the sweep. Then it fits the
planner's own step-time model (`services/planner/performance_model.py`) to every step and writes

    {"prefill_ms": [a, b, c], "decode_ms": [e, f, g, h], "kv_total_blocks": ..., "block_size": ...,
     "forward_passes": [...], "fit": {...}, "sweep": {...}}

(the first five keys are what the planner reads; `fit` and `sweep` say how good the fit is and
what was run). Durations are the engine's own step times (the mocker's are modelled time, not
divided by `--speedup-ratio`; use `--speedup-ratio 0` to sweep it without waiting).

Owns the sweep, its processes and the file. Does not own the fit (`performance_model`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import zmq

from common.config import flag_given, on_command_line, opt, parse_configs, to_argv
from common.discovery import open_discovery
from common.event_plane import EventSubscriber
from common.free_port import free_port
from common.malformed import MALFORMED
from common.messages import (
    ROLE_WORKER,
    TOPIC_FPM,
    TOPIC_LOAD,
    ForwardPass,
    Instance,
    fpm_decoder,
    load_decoder,
)
from services.planner.performance_model import PerformanceModel
from services.worker.args import WorkerConfig
from services.worker.engines import engine_config_classes

MAX_SAVED_STEPS = 4096  # steps kept in the file (the planner keeps them in every fit)
SWEEP_HEARTBEAT_MS = 500  # the worker's heartbeat unless --heartbeat-interval-ms says otherwise
MISSED_HEARTBEATS = 8


@dataclasses.dataclass
class ProfileConfig:
    """Profile sweep."""

    output: str = opt("profile.json", help="where to write the performance file")
    prompt_lengths: str = opt("128,512,2048,8192", help="prompt lengths to sweep, tokens "
                                                         "(comma-separated)")
    batch_sizes: str = opt("1,4,16,64", help="requests sent at once at each prompt length "
                                             "(comma-separated)")
    decode_tokens: int = opt(16, help="tokens each request generates")
    token_ids: str = opt("", help="LO:HI, the token id range prompts are drawn from (default: "
                                  "32:127 for the built-in byte model; for --model DIR: 100 up "
                                  "to its config.json vocab_size - 100)")
    seed: int = opt(0, help="random prompts' seed")
    profile_timeout_s: float = opt(600.0, help="most seconds to wait for the deployment to start "
                                               "and for each point")


@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    prompt_tokens: int
    batch: int


def parse_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what}: need positive integers, got {text!r}")
    return sorted(set(values))


def grid(cfg: ProfileConfig) -> list[Point]:
    """Every prompt length x batch size, shortest and smallest first."""
    lengths = parse_list(cfg.prompt_lengths, "--prompt-lengths")
    batches = parse_list(cfg.batch_sizes, "--batch-sizes")
    return [Point(n, b) for n in lengths for b in batches]


def token_range(cfg: ProfileConfig, model: str) -> tuple[int, int]:
    if cfg.token_ids:
        lo, sep, hi = cfg.token_ids.partition(":")
        try:
            low, high = int(lo), int(hi)
        except ValueError:
            low = high = -1
        if not sep or low < 0 or high <= low:
            raise ValueError(f"--token-ids: expected LO:HI with 0 <= LO < HI, got "
                             f"{cfg.token_ids!r}")
        return low, high
    if not model:
        return 32, 127
    config = Path(model) / "config.json"
    try:
        vocab = int(json.loads(config.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot tell the token ids of {model!r} ({exc}): give "
                         f"--token-ids LO:HI") from exc
    if vocab <= 300:
        raise ValueError(f"{config}: vocab_size {vocab} is too small; give --token-ids LO:HI")
    return 100, vocab - 100


def profile_document(records: Sequence[ForwardPass], kv_total_blocks: int, block_size: int,
                     sweep: dict[str, Any]) -> dict[str, Any]:
    """The performance file for these steps; ValueError when they cannot identify both the
    prefill and the decode part of the model."""
    # A sweep is controlled: a few distinct operating points identify a part.
    model = PerformanceModel(window=max(1, len(records)), min_samples=4)
    for record in records:
        model.observe(record, kv_total_blocks)
    report = model.fit()
    if report.prefill_source != "fit" or report.decode_source != "fit":
        raise ValueError(f"too few distinct steps to fit (prefill: {report.prefill_samples} "
                         f"steps, decode: {report.decode_samples}); sweep more prompt lengths "
                         f"and batch sizes")
    assert model.prefill is not None and model.decode is not None
    steps = list(model.samples)[-MAX_SAVED_STEPS:]
    return {
        "prefill_ms": list(model.prefill),
        "decode_ms": list(model.decode),
        "kv_total_blocks": kv_total_blocks,
        "block_size": block_size,
        "forward_passes": [{"prefill_tokens": s.prefill_tokens, "decode_tokens": s.decode_tokens,
                            "kv_usage": round(s.kv_usage, 6), "duration_ms": s.duration_ms}
                           for s in steps],
        "fit": {"steps": report.samples, "prefill_steps": report.prefill_samples,
                "decode_steps": report.decode_samples, "r2": report.r2,
                "rmse_ms": report.rmse_ms},
        "sweep": sweep,
    }


def say(text: str) -> None:
    print(f"turnout profile: {text}", file=sys.stderr, flush=True)


class Sweep:
    """The private deployment and the requests that drive it."""

    def __init__(self, cfg: ProfileConfig, worker: WorkerConfig, engine_argv: list[str],
                 workdir: Path) -> None:
        self.cfg = cfg
        self.worker = worker
        self.engine_argv = engine_argv
        self.workdir = workdir
        self.discovery = f"file:{workdir / 'discovery'}"
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.records: list[ForwardPass] = []
        self.kv_total = 0
        self.loads_seen = 0
        self.worker_id = worker.worker_id or "profile-worker"

    # -- processes -----------------------------------------------------------------------------

    def start(self) -> None:
        # A private deployment need not detect failures fast: router and frontend wait out a
        # host that stalls for seconds rather than fail the sweep.
        hb = str(self.worker.heartbeat_interval_ms)
        patient = ["--heartbeat-interval-ms", hb, "--missed-heartbeats", str(MISSED_HEARTBEATS)]
        common = ["--discovery", self.discovery, "--lease-ttl-s", "5",
                  "--log-level", self.worker.log_level, *patient]
        model = []
        if self.worker.model:
            model += ["--model", self.worker.model]
        if self.worker.served_model_name:
            model += ["--served-model-name", self.worker.served_model_name]
        w = dataclasses.replace(self.worker, discovery=self.discovery, worker_id=self.worker_id)
        py = [sys.executable, "-m", "turnout"]
        timeout_ms = max(3000, self.worker.heartbeat_interval_ms * MISSED_HEARTBEATS)
        self._spawn("router", [*py, "router", *common, "--frontend-timeout-ms", str(timeout_ms)])
        self._spawn("worker", [*py, "worker", *to_argv(w), *self.engine_argv])
        self._spawn("frontend", [*py, "frontend", *common, *model, "--port", str(self.port)])

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "ab") as out:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                process_group=0, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the {name} exited with code {proc.returncode}; its last "
                                   f"output:\n{tail}")

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- the sweep -----------------------------------------------------------------------------

    async def run(self, points: list[Point], tokens: tuple[int, int]) -> dict[str, Any]:
        ctx = zmq.Context()
        subscriber = EventSubscriber(ctx, [TOPIC_FPM, TOPIC_LOAD])
        discovery = open_discovery(self.discovery)
        listening: asyncio.Task[None] | None = None
        try:
            inst = await self._wait_worker(discovery)
            subscriber.connect(inst.endpoints["events"])
            listening = asyncio.create_task(self._listen(subscriber))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}",
                                         timeout=self.cfg.profile_timeout_s) as http:
                model = await self._wait_frontend(http)
                await self._wait(lambda: self.kv_total > 0, "the worker's first load report")
                rng = random.Random(self.cfg.seed)
                started = time.monotonic()
                for i, point in enumerate(points, 1):
                    t = time.monotonic()
                    seen = len(self.records)
                    await asyncio.gather(*(self._request(http, model, point, tokens, rng)
                                           for _ in range(point.batch)))
                    # The point's steps went out with the first heartbeat after its last
                    # response; a heartbeat sends its load report before its steps, so the
                    # second load report after that response comes after them.
                    loads = self.loads_seen
                    await self._wait(lambda n=loads: self.loads_seen >= n + 2,
                                     f"the steps of point {i}")
                    steps = self.records[seen:]
                    decode = [r.duration_ms for r in steps
                              if r.decode_tokens and not r.prefill_tokens]
                    say(f"[{i}/{len(points)}] prompt {point.prompt_tokens} x batch "
                        f"{point.batch}: {len(steps)} steps in {time.monotonic() - t:.1f} s"
                        + (f", decode step {sum(decode) / len(decode):.2f} ms" if decode
                           else "")
                        + f" (elapsed {time.monotonic() - started:.0f} s)")
            block_size = inst.metadata.get("block_size")
            return {"kv_total_blocks": self.kv_total,
                    "block_size": block_size if isinstance(block_size, int) else 0,
                    "engine": inst.metadata.get("engine", ""), "model": model}
        finally:
            if listening is not None:
                listening.cancel()
            subscriber.close()
            ctx.destroy(linger=0)
            await discovery.close()

    async def _listen(self, subscriber: EventSubscriber) -> None:
        while True:
            topic, env = await subscriber.recv()
            if env.publisher_id != self.worker_id:
                continue
            try:
                if topic == TOPIC_LOAD:
                    self.kv_total = load_decoder.decode(env.payload).kv_total_blocks
                    self.loads_seen += 1
                elif topic == TOPIC_FPM:
                    self.records.extend(fpm_decoder.decode(env.payload).records)
            except MALFORMED:
                continue

    async def _request(self, http: httpx.AsyncClient, model: str, point: Point,
                       tokens: tuple[int, int], rng: random.Random) -> None:
        prompt = [rng.randrange(*tokens) for _ in range(point.prompt_tokens)]
        resp = await http.post("/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": self.cfg.decode_tokens,
            "ignore_eos": True})
        if resp.status_code != 200:
            raise RuntimeError(f"prompt of {point.prompt_tokens} tokens: HTTP "
                               f"{resp.status_code}: {resp.text[:300]}")

    async def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.cfg.profile_timeout_s
        while not ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {self.cfg.profile_timeout_s:g} s waiting "
                                   f"for {what}")
            await asyncio.sleep(0.05)

    async def _wait_worker(self, discovery: Any) -> Instance:
        found: list[Instance] = []

        async def poll() -> None:
            found[:] = [i for i in await discovery.list(role=ROLE_WORKER)
                        if i.id == self.worker_id]

        say("starting a worker, a router and a frontend ...")
        deadline = time.monotonic() + self.cfg.profile_timeout_s
        while not found:
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for the worker to register")
            await poll()
            if not found:
                await asyncio.sleep(0.2)
        return found[0]

    async def _wait_frontend(self, http: httpx.AsyncClient) -> str:
        async def models() -> list[str]:
            try:
                resp = await http.get("/v1/models")
                return [m["id"] for m in resp.json()["data"]] if resp.status_code == 200 else []
            except (httpx.HTTPError, ValueError, KeyError):
                return []

        found: list[str] = []

        async def poll() -> bool:
            found[:] = await models()
            return bool(found)

        deadline = time.monotonic() + self.cfg.profile_timeout_s
        while not await poll():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for the frontend to serve the model")
            await asyncio.sleep(0.2)
        return found[0]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    engine_classes = engine_config_classes()
    cfg, *engines, worker = parse_configs([ProfileConfig, *engine_classes, WorkerConfig], args,
                                          prog="turnout profile",
                                          description=__doc__.split("\n\n")[0])
    if on_command_line(args, "discovery"):
        raise SystemExit("turnout profile: it runs its own private deployment; --discovery "
                         "does not apply")
    if not flag_given(args, "heartbeat_interval_ms"):
        # Slow enough that a worker on a busy host is not taken for dead (at 100 ms a 1 s
        # stall makes it drop its requests); its steps still arrive within a second.
        worker.heartbeat_interval_ms = SWEEP_HEARTBEAT_MS
    if worker.worker_mode != "aggregated":
        raise SystemExit("turnout profile: it sweeps whole requests on one aggregated worker; "
                         "leave --worker-mode out")
    try:
        points = grid(cfg)
        tokens = token_range(cfg, worker.model)
    except ValueError as exc:
        raise SystemExit(f"turnout profile: {exc}") from exc
    if cfg.decode_tokens < 2:
        raise SystemExit("turnout profile: --decode-tokens must be at least 2 (a decode step "
                         "follows the first token)")
    engine_argv: list[str] = []
    for engine in engines:
        engine_argv += to_argv(engine)
    workdir = Path(tempfile.mkdtemp(prefix="turnout-profile-"))
    (workdir / "discovery").mkdir()
    sweep = Sweep(cfg, worker, engine_argv, workdir)
    say(f"{len(points)} points (prompt lengths {cfg.prompt_lengths} x batch sizes "
        f"{cfg.batch_sizes}), {cfg.decode_tokens} tokens each; logs under {workdir}")
    ok = False
    try:
        sweep.start()
        info = asyncio.run(sweep.run(points, tokens))
        doc = profile_document(sweep.records, info["kv_total_blocks"], info["block_size"], {
            "engine": info["engine"], "model": info["model"],
            "prompt_lengths": sorted({p.prompt_tokens for p in points}),
            "batch_sizes": sorted({p.batch for p in points}),
            "decode_tokens": cfg.decode_tokens, "argv": args})
        Path(cfg.output).write_text(json.dumps(doc, indent=1) + "\n")
        fit = doc["fit"]
        say(f"wrote {cfg.output}: {fit['steps']} steps, R² {fit['r2']:.4f}, RMSE "
            f"{fit['rmse_ms']:.3f} ms; use it with `turnout planner --profile {cfg.output}`")
        ok = True
    except (RuntimeError, ValueError, OSError) as exc:
        raise SystemExit(f"turnout profile: {exc}") from exc
    except KeyboardInterrupt:
        raise SystemExit("turnout profile: interrupted") from None
    finally:
        sweep.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
