"""The fast reactive rule: each worker's predicted latency from its live load, add or remove.

Every few seconds (`--reactive-interval-s`), between the predictive intervals, the planner looks at
each worker's latest load report (prompt tokens still to prefill, sequences running, KV blocks in
use) and asks the performance model, corrected by what clients saw, what a request sent there
now would get:

- TTFT: the steps to prefill what is queued plus one mean prompt, `--max-step-tokens` at a time,
  each beside the running decodes;
- ITL: the mean gap between a stream's tokens, which is what the SLO bounds: a step decoding the
  running sequences plus the new one, plus the prefill that lands between a stream's tokens,
  spread over one mean answer's gaps (output tokens - 1; at most one chunk per gap): what is
  queued now, and on a worker that prefills its own prompts (aggregated) the prompts of as many
  requests as are running (by Little's law, as many as arrive during one stream's life). Each
  chunk delays one gap of a stream, not all of them: judging by the next step alone would count
  a decode worker's KV hand-off or an aggregated worker's one queued prompt as if every gap paid
  it (and add a worker the mean latency never needed), while judging by decode steps alone
  misses how far a busy aggregated worker's prefill stretches every stream.

A worker's *pressure* is the larger of TTFT / TTFT SLO and ITL / ITL SLO (above 1: over target);
a prefill worker is judged by TTFT alone (it never decodes a stream), a decode worker by ITL
alone (the prompts it serves were prefilled elsewhere).
Add workers when every worker is over target: as many as it takes for the same total load, spread
over them, to be back under (`needed`; the caller bounds it and raises it to what the live
arrival rate needs: at a burst's onset the queue is short of what the arrivals will build).
While workers are starting, add more only when the load spread over all of them, those
starting included, is still over target, or the arrival rate needs more than were asked for
(a burst that outgrows the first answer is not made to wait for it to serve). Remove
one only when, with the same total load spread over one worker fewer, each would stay under
`margin` (e.g. half) of both SLOs: the gap between 1 and the margin is the hysteresis that
keeps add and remove from alternating. Cooldown, bounds, budget and stuck starts are the
caller's (`main`, `replica_planner`, `readiness`).

Owns the estimate and the rule. Does not own where loads come from or acting on the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.planner.performance_model import PerformanceModel
from services.planner.replica_planner import (
    ROLE_AGGREGATED,
    ROLE_DECODE,
    ROLE_PREFILL,
    EngineLimits,
    Slo,
    step_chunks,
)


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    prefill_tokens: float  # prompt tokens waiting or being prefilled
    running: float  # sequences in the running batch
    kv_used_blocks: float
    kv_total_blocks: float


@dataclass(frozen=True, slots=True)
class Corrections:
    ttft: float = 1.0
    itl: float = 1.0


@dataclass(frozen=True, slots=True)
class Outlook:
    """What a worker's load is judged against: the next request's expected size (the predicted
    means), the engine's limits, the targets and the latency corrections."""

    prompt_tokens: float
    output_tokens: float
    limits: EngineLimits
    slo: Slo
    corrections: Corrections = Corrections()


def predicted_latency(model: PerformanceModel, load: WorkerLoad, outlook: Outlook,
                      role: str = ROLE_AGGREGATED) -> tuple[float, float]:
    """(TTFT ms, mean ITL ms) of one more request sent to a worker of `role` with `load`."""
    budget = max(1, outlook.limits.max_step_tokens)
    usage = min(1.0, load.kv_used_blocks / load.kv_total_blocks) if load.kv_total_blocks else 0.0
    decoding = max(0.0, load.running)
    queued = max(0.0, load.prefill_tokens)
    full, rest = divmod(queued + max(1.0, outlook.prompt_tokens), budget)
    ttft = full * model.step_ms(budget, decoding, usage)
    if rest > 0:
        ttft += model.step_ms(rest, decoding, usage)
    gaps = max(1.0, outlook.output_tokens - 1)
    landing = [(1.0, c) for c in step_chunks(queued, budget)]  # (how many, tokens) between tokens
    if role == ROLE_AGGREGATED:  # the running streams' prompts are prefilled here too
        landing += [(decoding, c) for c in step_chunks(outlook.prompt_tokens, budget)]
    count = sum(n for n, _ in landing)
    if not landing or count <= 0:
        per_gap = 0.0
    elif count >= gaps:  # a chunk beside every gap
        per_gap = model.prefill_ms(max(c for _, c in landing))
    else:
        per_gap = sum(n * model.prefill_ms(c) for n, c in landing) / gaps
    itl = model.step_ms(0, decoding + 1, usage) + per_gap
    return outlook.corrections.ttft * ttft, outlook.corrections.itl * itl


def pressure(model: PerformanceModel, load: WorkerLoad, outlook: Outlook,
             role: str = ROLE_AGGREGATED) -> float:
    ttft, itl = predicted_latency(model, load, outlook, role)
    slo = outlook.slo
    if role == ROLE_PREFILL:
        return ttft / slo.ttft_ms
    if role == ROLE_DECODE:
        return itl / slo.itl_ms
    return max(ttft / slo.ttft_ms, itl / slo.itl_ms)


def spread(loads: list[WorkerLoad], workers: int) -> WorkerLoad:
    """The mean load per worker if `loads` were shared by `workers` workers."""
    kv_total = min(w.kv_total_blocks for w in loads)
    return WorkerLoad(sum(w.prefill_tokens for w in loads) / workers,
                      sum(w.running for w in loads) / workers,
                      sum(w.kv_used_blocks for w in loads) / workers, kv_total)


def needed(model: PerformanceModel, loads: list[WorkerLoad], outlook: Outlook, fewest: int,
           most: int, role: str = ROLE_AGGREGATED) -> int:
    """The fewest workers, from `fewest` up to `most`, over which the live load spread evenly
    is back under target (`most` when none is)."""
    for workers in range(fewest, most):
        if pressure(model, spread(loads, workers), outlook, role) <= 1.0:
            return workers
    return max(most, fewest)


def reactive_step(model: PerformanceModel, loads: list[WorkerLoad], outlook: Outlook,
                  margin: float, role: str = ROLE_AGGREGATED) -> tuple[int, float]:
    """(+1 add a worker, -1 remove one, 0 hold; the least pressure of any worker now), for
    workers of `role` (aggregated, prefill or decode)."""
    if not loads:
        return 0, math.nan
    least = min(pressure(model, w, outlook, role) for w in loads)
    if least > 1.0:
        return 1, least
    if len(loads) >= 2:
        fewer = spread(loads, len(loads) - 1)
        if pressure(model, fewer, outlook, role) < margin:
            return -1, least
    return 0, least
