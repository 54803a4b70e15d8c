"""The layout as commands for one machine: a `turnout up` line, or `turnout worker` lines where
one `up` cannot say it.

`turnout up` gives every worker the same worker and engine flags, so a disaggregated layout whose
prefill and decode workers differ in parallelism gets one `turnout worker` command per pool
(beside a router and a frontend) instead. `up` does not divide the host's GPUs between its
workers: with more than one worker, each engine would see every GPU; the note says so, and the
k8s overlay and compose override give each worker its own devices.
"""

from __future__ import annotations

import shlex

from turnout.configure.layout import Layout
from turnout.configure.worker_flags import engine_args, worker_flags


def commands(layout: Layout) -> tuple[list[str], list[str]]:
    """(shell command lines, notes): one `turnout up` line, or every process's line."""
    model = ["--model", layout.request.model]
    notes: list[str] = []
    workers = sum(p.workers for p in layout.pools)
    if workers > 1:
        notes.append(f"`turnout up` runs all {workers} workers on this host without dividing "
                     f"the GPUs between them; give each worker its own devices "
                     "(CUDA_VISIBLE_DEVICES), or use the k8s overlay or compose override")
    backend = layout.request.backend
    flavours = {engine_args(backend, p) for p in layout.pools}
    if len(flavours) == 1:
        argv = ["turnout", "up", "--engine", backend, *model]
        if layout.mode == "aggregated":
            argv += ["--workers", str(layout.pools[0].workers)]
        else:
            pools = {p.role: p for p in layout.pools}
            argv += ["--prefill-workers", str(pools["prefill"].workers),
                     "--decode-workers", str(pools["decode"].workers)]
        batch = [p.batch for p in layout.pools if p.role != "prefill"]
        argv += ["--max-num-seqs", str(max(batch))]
        if layout.mode == "disaggregated":
            notes.append(f"`turnout up` caps the prefill workers at --max-num-seqs {max(batch)} "
                         "too (the decode batch); the k8s overlay and compose override leave "
                         "them uncapped")
        extra = flavours.pop()
        if extra:
            argv += ["--engine-args", extra]
        return [shlex.join(argv)], notes
    notes.append("its prefill and decode workers differ in parallelism, which one `turnout up` "
                 "cannot express: one command per pool (and a router and a frontend)")
    discovery = ["--discovery", "file:/tmp/turnout-discovery"]
    lines = [shlex.join(["turnout", "router", *discovery])]
    for pool in layout.pools:
        line = shlex.join(["turnout", "worker", *discovery, *model, *worker_flags(layout, pool)])
        lines += [line] * pool.workers
    lines.append(shlex.join(["turnout", "frontend", *discovery, *model, "--port", "8000"]))
    return lines, notes
