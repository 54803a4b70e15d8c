"""The fast reactive rule: each worker's predicted latency from its live load, add or remove one.

Every few seconds (`--reactive-interval-s`), between the predictive intervals, the planner looks at
each worker's latest load report (prompt tokens still to prefill, sequences running, KV blocks in
use) and asks the performance model, corrected by what clients saw, what a request sent there
now would get:

- TTFT: the steps to prefill what is queued plus one mean prompt, `--max-step-tokens` at a time,
  each beside the running decodes;
- ITL: one step decoding the running sequences plus the new one, beside a chunk of the queued
  prefill.

A worker's *pressure* is the larger of TTFT / TTFT SLO and ITL / ITL SLO (above 1: over target);
a prefill worker is judged by TTFT alone (it never decodes a stream), a decode worker by ITL
alone (the prompts it serves were prefilled elsewhere).
Add one worker when every worker is over target. Remove one only when, with the same total load
spread over one worker fewer, each would stay under `margin` (e.g. half) of both SLOs: the gap
between 1 and the margin is the hysteresis that keeps add and remove from alternating. Cooldown,
bounds, budget and stuck starts are the caller's (`main`, `replica_planner`, `readiness`).

Owns the estimate and the rule. Does not own where loads come from or acting on the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.planner.performance_model import PerformanceModel
from services.planner.replica_planner import ROLE_DECODE, ROLE_PREFILL, EngineLimits, Slo


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


def predicted_latency(model: PerformanceModel, load: WorkerLoad, prompt_tokens: float,
                      limits: EngineLimits, corrections: Corrections) -> tuple[float, float]:
    """(TTFT ms, ITL ms) of one more request of `prompt_tokens` sent to a worker with `load`."""
    budget = max(1, limits.max_step_tokens)
    usage = min(1.0, load.kv_used_blocks / load.kv_total_blocks) if load.kv_total_blocks else 0.0
    decoding = max(0.0, load.running)
    work = max(0.0, load.prefill_tokens) + max(1.0, prompt_tokens)
    full, rest = divmod(work, budget)
    ttft = full * model.step_ms(budget, decoding, usage)
    if rest > 0:
        ttft += model.step_ms(rest, decoding, usage)
    chunk = min(budget, max(0.0, load.prefill_tokens))
    itl = model.step_ms(chunk, decoding + 1, usage)
    return corrections.ttft * ttft, corrections.itl * itl


def pressure(model: PerformanceModel, load: WorkerLoad, prompt_tokens: float,
             limits: EngineLimits, slo: Slo, corrections: Corrections,
             role: str = "aggregated") -> float:
    ttft, itl = predicted_latency(model, load, prompt_tokens, limits, corrections)
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


def reactive_step(model: PerformanceModel, loads: list[WorkerLoad], prompt_tokens: float,
                  limits: EngineLimits, slo: Slo, corrections: Corrections,
                  margin: float, role: str = "aggregated") -> tuple[int, float]:
    """(+1 add a worker, -1 remove one, 0 hold; the least pressure of any worker now), for
    workers of `role` (aggregated, prefill or decode)."""
    if not loads:
        return 0, math.nan
    least = min(pressure(model, w, prompt_tokens, limits, slo, corrections, role)
                for w in loads)
    if least > 1.0:
        return 1, least
    if len(loads) >= 2:
        fewer = spread(loads, len(loads) - 1)
        if pressure(model, fewer, prompt_tokens, limits, slo, corrections, role) < margin:
            return -1, least
    return 0, least
