"""Images in chat, measured: Turnout with an encode pool against aggregated workers that encode
in-line, on mocker workers with a simulated encode time per image, in one run.

Owns the workload and the comparison. The workload is an open-loop chat trace (Poisson
arrivals at `--rate`, seeded): each request asks a different question (so no two prompts share
a prefix past the chat template), and `--image-share` of them carry one 224x224 image (64
placeholder tokens) after the question. Of the images, `--repeat-share` are drawn from a small
hot set (`--hot-images`, like product photos); the rest are each seen once. Systems, each
started fresh (router, workers, frontend as separate processes, `turnout.testing.deployment`),
each stopped on every exit path:

- `inline`: `--llm-workers` aggregated workers, no encode worker: every image is encoded by the
  LLM worker serving it, in its engine step (it is skipped only when its placeholders are all in
  that worker's prefix cache, which the varied questions prevent);
- `pool`: the same `--llm-workers` aggregated workers plus `--encode-workers` encode workers
  (embedding cache by image hash, the router's image affinity);
- `inline-total` (with `--same-total`): `inline` with `--llm-workers` + `--encode-workers`
  aggregated workers, the same process count as `pool`.

One JSON line per system (TTFT p50/p99, throughput, images sent, encoder runs, encoder work
avoided = 1 - runs / images), then the goal line: with the pool, encoder work >= 45 % lower than
encoding every image, and TTFT p99 >= 1.5x better than `inline` (the same LLM workers encoding
in-line); with `--same-total` the ratio against `inline-total` is reported too.

    python bench/multimodal.py                             # ~2.5 minutes on 2 cores
    python bench/multimodal.py --duration 30 --same-total  # shorter, plus inline-total
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from load_client import LoadResult, TraceRequest, run, run_trace  # noqa: E402
from PIL import Image  # noqa: E402

from turnout.testing.deployment import Deployment  # noqa: E402

GOAL_AVOIDED = 0.45
GOAL_TTFT_P99_RATIO = 1.5


def log(msg: str) -> None:
    print(f"[multimodal {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def image_uri(rng: random.Random, size: int = 224) -> str:
    """A distinct PNG: a random colour with a random rectangle on it."""
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + size // 3, y + size // 3))
    out = io.BytesIO()
    img.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def workload(args: argparse.Namespace) -> tuple[list[TraceRequest], int]:
    """The trace, and how many of its requests carry an image."""
    rng = random.Random(args.seed)
    hot = [image_uri(rng) for _ in range(args.hot_images)]
    trace: list[TraceRequest] = []
    at = 0.0
    images = 0
    n = int(args.rate * args.duration)
    for i in range(n):
        at += rng.expovariate(args.rate)
        question = f"question {i}: what is shown here, and what colour is it? " \
                   f"({rng.randrange(10**9)})"
        content: list[dict[str, Any]] = [{"type": "text", "text": question}]
        if rng.random() < args.image_share:
            images += 1
            uri = rng.choice(hot) if rng.random() < args.repeat_share else image_uri(rng)
            content.append({"type": "image_url", "image_url": {"url": uri}})
        trace.append(TraceRequest(at, [{"role": "user", "content": content}], args.max_tokens))
    return trace, images


def shape(system: str, args: argparse.Namespace) -> tuple[int, int]:
    """(aggregated LLM workers, encode workers) of a system."""
    if system == "pool":
        return args.llm_workers, args.encode_workers
    if system == "inline-total":
        return args.llm_workers + args.encode_workers, 0
    return args.llm_workers, 0


def start(system: str, workdir: Path, args: argparse.Namespace, port: int) -> Deployment:
    dep = Deployment(workdir, lease_ttl_s=None)
    mocker = ["--speedup-ratio", "1", "--encode-ms-per-image", f"{args.encode_ms:g}"]
    dep.start_router()
    llm, encoders = shape(system, args)
    for i in range(encoders):
        dep.start_worker("--worker-mode", "encode", *mocker, worker_id=f"enc{i + 1}")
    for i in range(llm):
        dep.start_worker(*mocker, worker_id=f"llm{i + 1}")
    dep.start_frontend(port=port)
    dep.wait_healthy(60)
    dep.wait_routable(llm + encoders, 60)
    return dep


def counts(dep: Deployment) -> dict[str, float]:
    """Encoder runs (encode workers' misses + LLM workers' in-line encodes), cache hits."""
    out = {"encoder_runs": 0.0, "embedding_cache_hits": 0.0, "inline_encodes": 0.0}
    for worker in dep.workers():
        m = worker.metrics()
        out["encoder_runs"] += m.value("turnout_worker_embedding_cache_misses_total")
        out["embedding_cache_hits"] += m.value("turnout_worker_embedding_cache_hits_total")
        inline = m.value("turnout_worker_images_total", source="inline")
        out["encoder_runs"] += inline
        out["inline_encodes"] += inline
    return out


def measure(system: str, args: argparse.Namespace, trace: list[TraceRequest], images: int,
            port: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-mm-{system}-") as tmp:
        dep = start(system, Path(tmp), args, port)
        try:
            log(f"{system}: {len(trace)} requests over {args.duration:g} s")
            result: LoadResult = run(run_trace(dep.url, "mock", trace, chat=True,
                                               request_timeout=120))
            summary = result.summary()
            work = counts(dep)
        finally:
            dep.stop()
    llm, encoders = shape(system, args)
    return {
        "system": system, "llm_workers": llm, "encode_workers": encoders,
        "requests": summary["requests"], "errors": summary["errors"],
        "ttft_ms_p50": summary["ttft_ms_p50"], "ttft_ms_p99": summary["ttft_ms_p99"],
        "itl_ms_p99": summary["itl_ms_p99"], "req_s": summary["req_s"],
        "output_tok_s": summary["output_tok_s"], "images": images,
        "encoder_runs": int(work["encoder_runs"]),
        "embedding_cache_hits": int(work["embedding_cache_hits"]),
        "inline_encodes": int(work["inline_encodes"]),
        "encoder_work_avoided": round(1 - work["encoder_runs"] / images, 4) if images else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=12.0, help="mean requests per second")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of arrivals")
    parser.add_argument("--image-share", type=float, default=0.8)
    parser.add_argument("--repeat-share", type=float, default=0.5,
                        help="share of images drawn from the hot set")
    parser.add_argument("--hot-images", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--encode-ms", type=float, default=150.0,
                        help="the mocker's encode time per image")
    parser.add_argument("--llm-workers", type=int, default=2)
    parser.add_argument("--encode-workers", type=int, default=2)
    parser.add_argument("--same-total", action="store_true",
                        help="also run inline-total: as many aggregated workers as pool has "
                             "processes")
    parser.add_argument("--port", type=int, default=18700)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.llm_workers < 1 or args.encode_workers < 1:
        parser.error("--llm-workers and --encode-workers must be at least 1")
    trace, images = workload(args)
    systems = ["inline", "pool", *(["inline-total"] if args.same_total else [])]
    lines = {}
    for i, system in enumerate(systems):
        lines[system] = line = measure(system, args, trace, images, args.port + i)
        print(json.dumps(line), flush=True)
    inline, pool = lines["inline"], lines["pool"]
    ratio = (round(inline["ttft_ms_p99"] / pool["ttft_ms_p99"], 3)
             if inline["ttft_ms_p99"] and pool["ttft_ms_p99"] else None)
    goal = {"goal": "multimodal", "encoder_work_avoided": pool["encoder_work_avoided"],
            "encoder_work_avoided_goal": GOAL_AVOIDED,
            "ttft_p99_inline_over_pool": ratio, "ttft_p99_ratio_goal": GOAL_TTFT_P99_RATIO,
            "met": bool(pool["encoder_work_avoided"] is not None
                        and pool["encoder_work_avoided"] >= GOAL_AVOIDED
                        and ratio is not None and ratio >= GOAL_TTFT_P99_RATIO)}
    if "inline-total" in lines and lines["inline-total"]["ttft_ms_p99"] and pool["ttft_ms_p99"]:
        goal["ttft_p99_inline_total_over_pool"] = round(
            lines["inline-total"]["ttft_ms_p99"] / pool["ttft_ms_p99"], 3)
    print(json.dumps(goal), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
