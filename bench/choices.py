"""Requests for several completions of one prompt (`n`): what the workers compute, and how long
the requests take, on this build and (with `--baseline-bin`) on another one in the same run.

Owns the workload and the comparison: `--prompts` distinct prompts of about `--prompt-tokens`
tokens (the built-in byte tokenizer: one token per byte), each asked for `--n` completions of
`--tokens` tokens (ignore_eos), `--concurrency` requests at a time, on a fresh deployment per
system (router in kv mode, `--workers` mocker workers at `--speedup`, each through
`turnout.testing.deployment`, always reaped). A system's line: wall time, request latency,
and the prompt tokens the workers were sent, found cached and so computed (their
`turnout_worker_prompt_tokens_total` and `turnout_worker_cached_tokens_total`); with a
baseline, a ratio line. Every completion of a prompt computing that prompt anew is the waste
this measures: the least a fleet can compute is each prompt once.

    .venv/bin/python bench/choices.py
    git worktree add /tmp/base <rev> && printf '#!/bin/sh\\ncd /tmp/base && PYTHONPATH=/tmp/base \\
        exec %s -m turnout "$@"\\n' "$PWD/.venv/bin/python" > /tmp/base.sh && chmod +x /tmp/base.sh
    .venv/bin/python bench/choices.py --baseline-bin /tmp/base.sh
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from turnout.testing.deployment import PYTHON_TURNOUT, Deployment  # noqa: E402

WORDS = "the river runs under the old stone bridge at dawn "


def run_system(name: str, command: list[str], args: argparse.Namespace) -> dict[str, Any]:
    print(f"[choices] {name}: starting {args.workers} workers", file=sys.stderr, flush=True)
    with Deployment(Path(tempfile.mkdtemp(prefix="bench-choices-")), command=command) as dep:
        dep.start(workers=args.workers, worker_args=("--speedup-ratio", str(args.speedup)))
        oai = openai.OpenAI(base_url=dep.url + "/v1", api_key="x", max_retries=0, timeout=300)
        repeat = max(1, args.prompt_tokens // len(WORDS))

        def one(i: int) -> tuple[float, int]:
            started = time.perf_counter()
            done = oai.completions.create(model="mock", prompt=f"[{i}] " + WORDS * repeat,
                                          n=args.n, max_tokens=args.tokens,
                                          extra_body={"ignore_eos": True})
            assert len(done.choices) == args.n and done.usage is not None
            return time.perf_counter() - started, done.usage.prompt_tokens

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.prompts)))
        latencies = sorted(latency for latency, _ in results)
        wall = time.perf_counter() - started
        sent = cached = 0.0
        for worker in dep.workers():
            metrics = dep.metrics_of(worker.name)
            sent += metrics.value("turnout_worker_prompt_tokens_total")
            cached += metrics.value("turnout_worker_cached_tokens_total")
    print(f"[choices] {name}: {wall:.2f} s", file=sys.stderr, flush=True)
    return {"bench": "choices", "system": name, "prompts": args.prompts, "n": args.n,
            "wall_s": round(wall, 3),
            "latency_s_p50": round(latencies[len(latencies) // 2], 3),
            "latency_s_max": round(latencies[-1], 3),
            "prompt_tokens_sent": int(sent), "prompt_tokens_cached": int(cached),
            "prompt_tokens_computed": int(sent - cached),
            # Each prompt once (usage counts a prompt once however many completions it has).
            "least_computable": sum(tokens for _, tokens in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--speedup", type=float, default=1.0)
    parser.add_argument("--baseline-bin", default="",
                        help="a command that runs another build's `turnout` (see above)")
    args = parser.parse_args()
    this = run_system("this", list(PYTHON_TURNOUT), args)
    print(json.dumps(this), flush=True)
    if args.baseline_bin:
        base = run_system("baseline", [args.baseline_bin], args)
        print(json.dumps(base), flush=True)
        print(json.dumps({
            "bench": "choices", "compare": "this/baseline",
            "computed_ratio": round(this["prompt_tokens_computed"]
                                    / max(1, base["prompt_tokens_computed"]), 3),
            "wall_ratio": round(this["wall_s"] / base["wall_s"], 3),
            "latency_p50_ratio": round(this["latency_s_p50"] / base["latency_s_p50"], 3)}),
            flush=True)


if __name__ == "__main__":
    main()
