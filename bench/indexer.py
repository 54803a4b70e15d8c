"""The router KV index benchmark: event throughput, lookup latency and memory at fleet scale.

Owns a synthetic, seeded fleet workload (shared system-prompt prefixes, a few thousand 512-block
documents each cached, partly evicted, on a few random workers; stored events of
`--event-blocks` blocks; a churn phase of tail evictions and refills; 512-block queries that hit,
half-hit or miss) and running it, for each worker count, against Turnout's `KvIndex` and, when
/tmp/dynamo-anchor/bin/python exists, NVIDIA Dynamo's `dynamo._core.RadixTree` fed the very same
events (regenerated from the seed in a child process on Dynamo's interpreter). Each side runs in
its own child process so peak RSS is its own. Does not own the index (`services/router/kv_index`).

    python bench/indexer.py [--workers 8,64,256] [--blocks 1000000] [--no-dynamo]

One JSON line per worker count to stdout (both systems and their ratios), progress to stderr.
Only the standard library is imported at module level: the Dynamo child runs this file too.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DYNAMO_PYTHON = Path(os.environ.get("DYNAMO_ANCHOR_PYTHON", "/tmp/dynamo-anchor/bin/python"))
CHILD_TIMEOUT_S = 1800


def log(msg: str) -> None:
    print(f"[indexer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Workload: identical on both sides for the same arguments.
# ---------------------------------------------------------------------------------------------

# An event: (worker index, kind, block hashes, parent hash). kind: "stored" | "removed".
Event = tuple[int, str, list[int], int | None]


@dataclass
class Workload:
    build: list[Event] = field(default_factory=list)
    churn: list[Event] = field(default_factory=list)
    queries: list[tuple[str, list[int]]] = field(default_factory=list)  # (kind, hashes)
    entries: int = 0  # (worker, block) pairs after the build phase


def make_workload(args: argparse.Namespace, workers: int) -> Workload:
    rng = random.Random(f"{args.seed}/{workers}")
    doc_len, chunk = args.doc_blocks, args.event_blocks
    prefixes = [[rng.getrandbits(63) for _ in range(rng.randint(8, 128))] for _ in range(64)]
    w = Workload()
    docs: list[tuple[list[int], int]] = []  # (hashes, prefix length)
    held_prefix: list[dict[int, int]] = [{} for _ in range(workers)]  # prefix id -> blocks held
    holdings: list[tuple[int, int, int]] = []  # (worker, doc, blocks held)

    def store(worker: int, hashes: list[int], start: int, end: int) -> None:
        for i in range(start, end, chunk):
            j = min(i + chunk, end)
            w.build.append((worker, "stored", hashes[i:j], hashes[i - 1] if i else None))

    while w.entries < args.blocks:
        pid = rng.randrange(len(prefixes))
        prefix = prefixes[pid]
        hashes = prefix + [rng.getrandbits(63) for _ in range(doc_len - len(prefix))]
        docs.append((hashes, len(prefix)))
        for worker in rng.sample(range(workers), min(workers, rng.choice((1, 1, 2, 3, 4)))):
            # Half the copies are complete; the rest lost a tail to eviction.
            length = doc_len if rng.random() < 0.5 else rng.randint(1, doc_len)
            length = min(length, args.blocks - w.entries + held_prefix[worker].get(pid, 0))
            start = min(held_prefix[worker].get(pid, 0), length)
            if length <= start:
                continue
            store(worker, hashes, start, length)
            w.entries += length - start
            held = held_prefix[worker]
            held[pid] = max(held.get(pid, 0), min(length, len(prefix)))
            holdings.append((worker, len(docs) - 1, length))
            if w.entries >= args.blocks:
                break

    # Churn: evict a holding's tail (never its shared prefix), then refill it.
    for _ in range(args.churn):
        worker, d, length = holdings[rng.randrange(len(holdings))]
        hashes, plen = docs[d]
        k = min(chunk, length - plen - 1)
        if k <= 0:
            continue
        tail = hashes[length - k : length]
        w.churn.append((worker, "removed", tail, None))
        w.churn.append((worker, "stored", tail, hashes[length - k - 1]))

    for _ in range(args.queries):
        r = rng.random()
        if r < 0.5:
            w.queries.append(("hit", docs[rng.randrange(len(docs))][0]))
        elif r < 0.75:
            prefix = prefixes[rng.randrange(len(prefixes))]
            fresh = [rng.getrandbits(63) for _ in range(doc_len - len(prefix))]
            w.queries.append(("prefix", prefix + fresh))
        else:
            w.queries.append(("miss", [rng.getrandbits(63) for _ in range(doc_len)]))
    return w


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc."""
    cur = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return round(cur, 1), round(peak, 1)


def pct(sorted_ns: list[int], q: float) -> float:
    return round(sorted_ns[int(q * (len(sorted_ns) - 1))] / 1000, 2)  # µs


def time_queries(find: Any, queries: list[tuple[str, list[int]]]) -> dict[str, Any]:
    """Latency of `find(hashes) -> [(worker index, overlap)]` per query, and a digest of every
    answer so both systems can be checked to agree."""
    for _, hashes in queries[:100]:
        find(hashes)  # warm-up
    clock = time.perf_counter_ns
    by_kind: dict[str, list[int]] = {}
    answers = hashlib.sha256()
    overlap_sum = 0
    for kind, hashes in queries:
        t0 = clock()
        answer = find(hashes)
        dt = clock() - t0
        by_kind.setdefault(kind, []).append(dt)
        answer.sort()
        answers.update(repr(answer).encode())
        overlap_sum += sum(n for _, n in answer)
    every = sorted(ns for lst in by_kind.values() for ns in lst)
    out: dict[str, Any] = {"find_p50_us": pct(every, 0.5), "find_p99_us": pct(every, 0.99)}
    for kind, lst in sorted(by_kind.items()):
        out[f"find_{kind}_p50_us"] = pct(sorted(lst), 0.5)
    out["queries"] = len(every)
    out["mean_overlap_sum"] = round(overlap_sum / len(every), 1)
    out["answers_digest"] = answers.hexdigest()[:16]
    return out


def blocks_in(events: list[Event]) -> int:
    return sum(len(e[2]) for e in events)


# ---------------------------------------------------------------------------------------------
# The two systems (each runs in its own child process)
# ---------------------------------------------------------------------------------------------


def run_turnout(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from common.messages import (
        KvBlockRemoved,
        KvBlockStored,
        KvEventBatch,
        encoder,
        kv_batch_decoder,
    )
    from services.router.kv_index import KvIndex

    t0 = time.perf_counter()
    wl = make_workload(args, workers)
    names = [f"worker-{i}" for i in range(workers)]

    def to_batch(e: Event) -> KvEventBatch:
        worker, kind, hashes, parent = e
        if kind == "stored":
            ev: Any = KvBlockStored(hashes, parent, [], args.block_size)
        else:
            ev = KvBlockRemoved(hashes)
        return KvEventBatch(names[worker], [ev])

    # Wire form: what arrives on the event plane (token ids omitted on both sides).
    build_wire = [(names[e[0]], encoder.encode(to_batch(e))) for e in wl.build]
    churn_wire = [(names[e[0]], encoder.encode(to_batch(e))) for e in wl.churn]
    log(f"turnout w={workers}: workload ready in {time.perf_counter() - t0:.1f}s "
        f"({len(wl.build)} build events, {blocks_in(wl.build)} blocks)")
    gc.collect()
    rss_before, _ = rss_mb()

    index = KvIndex()
    decode = kv_batch_decoder.decode
    t0 = time.perf_counter()
    for name, raw in build_wire:
        index.apply(name, decode(raw))
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_after, _ = rss_mb()
    out: dict[str, Any] = {
        "num_entries": index.num_entries(),
        "num_blocks": index.num_blocks(),
        "build_events": len(wl.build),
        "build_block_events_per_s_wire": round(blocks_in(wl.build) / build_s),
        "index_mb": round(rss_after - rss_before, 1),
    }

    def find(hashes: list[int]) -> list[tuple[int, int]]:
        return [(int(w[7:]), n) for w, n in index.find_matches(hashes).items()]

    out.update(time_queries(find, wl.queries))

    t0 = time.perf_counter()
    for name, raw in churn_wire:
        index.apply(name, decode(raw))
    churn_s = time.perf_counter() - t0
    out["churn_block_events_per_s_wire"] = round(blocks_in(wl.churn) / churn_s)
    out["entries_after_churn"] = index.num_entries()

    # Apply alone, from already-decoded batches, into a fresh index.
    del index
    gc.collect()
    decoded = [(name, decode(raw)) for name, raw in build_wire]
    index = KvIndex()
    t0 = time.perf_counter()
    for name, batch in decoded:
        index.apply(name, batch)
    out["build_block_events_per_s_apply"] = round(blocks_in(wl.build) / (time.perf_counter() - t0))
    out["peak_rss_mb"] = rss_mb()[1]
    return out


def run_dynamo(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    from dynamo._core import RadixTree

    t0 = time.perf_counter()
    wl = make_workload(args, workers)
    dumps = json.dumps

    def to_json(e: Event, event_id: int) -> bytes:
        _, kind, hashes, parent = e
        if kind == "stored":
            blocks = [{"block_hash": h, "tokens_hash": h} for h in hashes]
            data: Any = {"stored": {"parent_hash": parent, "blocks": blocks}}
        else:
            data = {"removed": {"block_hashes": hashes}}
        return dumps({"event_id": event_id, "data": data}).encode()

    build_wire = [(e[0], to_json(e, i)) for i, e in enumerate(wl.build)]
    churn_wire = [(e[0], to_json(e, i)) for i, e in enumerate(wl.churn, len(wl.build))]
    log(f"dynamo w={workers}: workload ready in {time.perf_counter() - t0:.1f}s")
    gc.collect()
    rss_before, _ = rss_mb()

    tree = RadixTree()
    errors = 0
    t0 = time.perf_counter()
    for worker, raw in build_wire:
        try:
            tree.apply_event(worker, raw)
        except (RuntimeError, ValueError):
            errors += 1
    tree.find_matches([0])  # barrier: the tree's thread has applied everything before this
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_after, _ = rss_mb()
    out: dict[str, Any] = {
        "build_events": len(wl.build),
        "build_block_events_per_s_wire": round(blocks_in(wl.build) / build_s),
        "index_mb": round(rss_after - rss_before, 1),
    }

    def find(hashes: list[int]) -> list[tuple[int, int]]:
        return [(w, n) for (w, _dp), n in tree.find_matches(hashes).scores.items()]

    out.update(time_queries(find, wl.queries))

    t0 = time.perf_counter()
    for worker, raw in churn_wire:
        try:
            tree.apply_event(worker, raw)
        except (RuntimeError, ValueError):
            errors += 1
    tree.find_matches([0])
    out["churn_block_events_per_s_wire"] = round(blocks_in(wl.churn) / (time.perf_counter() - t0))
    out["apply_errors"] = errors
    out["peak_rss_mb"] = rss_mb()[1]
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def child(python: str, system: str, args: argparse.Namespace, workers: int) -> dict[str, Any]:
    cmd = [python, __file__, "--child", system, "--workers", str(workers),
           "--blocks", str(args.blocks), "--doc-blocks", str(args.doc_blocks),
           "--event-blocks", str(args.event_blocks), "--queries", str(args.queries),
           "--churn", str(args.churn), "--seed", str(args.seed),
           "--block-size", str(args.block_size)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=CHILD_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{system} child exited {proc.returncode}")
    return json.loads(lines[-1])


def ratios(t: dict[str, Any], d: dict[str, Any]) -> dict[str, float]:
    """> 1 means Turnout is faster / smaller."""
    out = {}
    for key in ("build_block_events_per_s_wire", "churn_block_events_per_s_wire"):
        out[f"speedup_{key.removesuffix('_per_s_wire')}"] = round(t[key] / d[key], 2)
    for key in ("find_p50_us", "find_p99_us"):
        out[f"speedup_{key.removesuffix('_us')}"] = round(d[key] / t[key], 2)
    out["memory_dynamo_over_turnout"] = round(d["index_mb"] / max(t["index_mb"], 0.1), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="8,64,256", help="comma-separated worker counts")
    p.add_argument("--blocks", type=int, default=1_000_000, help="(worker, block) entries")
    p.add_argument("--doc-blocks", type=int, default=512, help="blocks per document / query")
    p.add_argument("--event-blocks", type=int, default=16, help="blocks per stored event")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--churn", type=int, default=20000, help="evict+refill pairs after build")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dynamo", action="store_true")
    p.add_argument("--child", choices=("turnout", "dynamo"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        run = run_turnout if args.child == "turnout" else run_dynamo
        print(json.dumps(run(args, int(args.workers))), flush=True)
        return

    for workers in (int(x) for x in args.workers.split(",")):
        line: dict[str, Any] = {"bench": "kv_index", "workers": workers, "blocks": args.blocks,
                                "doc_blocks": args.doc_blocks, "event_blocks": args.event_blocks}
        log(f"turnout, {workers} workers")
        line["turnout"] = turnout = child(sys.executable, "turnout", args, workers)
        if args.no_dynamo:
            line["dynamo"] = "unavailable: --no-dynamo"
        elif not DYNAMO_PYTHON.exists():
            line["dynamo"] = f"unavailable: {DYNAMO_PYTHON} not found"
        else:
            log(f"dynamo RadixTree, {workers} workers")
            try:
                line["dynamo"] = dynamo = child(str(DYNAMO_PYTHON), "dynamo", args, workers)
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                line["dynamo"] = f"unavailable: {e}"
            else:
                line["answers_agree"] = turnout["answers_digest"] == dynamo["answers_digest"]
                line["ratio"] = ratios(turnout, dynamo)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
