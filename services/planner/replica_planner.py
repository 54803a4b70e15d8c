"""Replica targets: how many prefill, decode (or aggregated) workers the predicted load needs.

For the next interval's predicted request rate λ, mean input length I (uncached prompt tokens a
worker computes) and mean output length O:

- prefill capacity of one replica: the tokens-per-step T (at least one prompt's worth, at most the
  engine's step budget) with the best throughput T / step_ms(T) whose step time fits the TTFT
  SLO; prefill demand is λ·I tokens/s.
- decode capacity of one replica: the batch n (bounded by the engine's batch limit and by KV
  space for n sequences of I + O/2 tokens each) with the best throughput n / step_ms(n, u) whose
  step time fits the ITL SLO; decode demand is λ·O tokens/s.
- disaggregated: prefill replicas = ⌈λ·I / prefill capacity⌉, decode = ⌈λ·O / decode capacity⌉.
- aggregated workers time-share both, and the share matters to latency, not only to throughput:
  a stream's gap is a decode step, stretched by the prefill chunks that run beside it. With
  per-worker rate r, prefill time per request P (its chunks) and decode step d (at the batch r
  keeps running, by Little's law), the prefill busy share is f = r·P and the mean gap
  d / (1 - f); a stream of O tokens meets its target when that gap plus one more chunk than
  average (chunks land whole on a short stream's O - 1 gaps) fits the ITL SLO, and its first
  token when P, its chunks' decode steps and the mean wait for the prefill queue (M/D/1:
  f / (2(1 - f)) · P) fit the TTFT SLO. The most requests per second one worker serves so
  (bisected) gives replicas = ⌈λ / that⌉, never fewer than the plain time-sharing sum
  ⌈λ·I / prefill cap + λ·O / decode cap⌉.

The model is corrected with what clients saw: a latency correction (smoothed observed / model
latency at the observed operating point) scales the model's step times, so observed TTFT or ITL
worse than the model predicts means less capacity per replica, hence more replicas. The model's
TTFT at the observed point (`model_ttft`) is what the capacity plans: for aggregated workers it
includes the mean wait for the prefill queue at the interval's per-worker rate (a correction
that carried queueing would count it twice, once in the factor and once in the queue the
capacity plans for, and hold replicas long after a peak); a disaggregated prefill pool is
planned without a queue, so there the correction carries it.

Targets are clamped to [min, max]. Scaling up happens at once; scaling down waits until the last
scale-up (or start) is a cooldown old, and goes only to the highest target recommended within
the cooldown window, so a dip between two peaks does not flap the fleet. A scale-down does not
restart the wait: the window alone paces the next one, so a fleet steps down as the load's
recommendations leave it rather than one worker per cooldown. Changes made by the reactive loop
or by hand count as scaling actions (`note_change`).

A GPU budget (`max_gpus`, each role's workers costing `gpus_per_worker`) caps the sum over roles:
targets over it are cut in proportion, never below `min_replicas`, and the GPUs left over go one
worker at a time to the roles cut the most.

Owns the arithmetic and the damping. Does not own measuring load (`main`), fitting step times
(`performance_model`) or starting/stopping workers (`connectors`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.planner.performance_model import PerformanceModel

ROLE_AGGREGATED = "aggregated"
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"

_GRID_POINTS = 48  # prefill tokens-per-step candidates between one prompt and the step budget


@dataclass(frozen=True, slots=True)
class LoadForecast:
    request_rate: float  # requests/s
    input_tokens: float  # mean uncached prompt tokens per request
    output_tokens: float  # mean generated tokens per request


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_ms: float
    itl_ms: float


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What one worker can batch; KV geometry comes from the workers when they report it."""

    max_step_tokens: int = 8192
    max_batch: int = 256
    kv_total_blocks: int = 16384
    block_size: int = 64
    kv_usage_limit: float = 0.9  # plan decode batches that leave this much KV headroom


@dataclass(frozen=True, slots=True)
class Capacity:
    tokens_per_s: float  # of one replica at its operating point, corrected
    operating_point: float  # prefill tokens per step, or decode batch size
    step_ms: float  # corrected step time at that point
    attainable: bool  # False: even the smallest step misses the SLO


@dataclass(frozen=True, slots=True)
class ReplicaNeeds:
    """Fractional replicas each role needs (before rounding, clamping and damping)."""

    needs: dict[str, float]
    prefill: Capacity | None
    decode: Capacity | None


class LatencyCorrection:
    """Smoothed ratio of observed to model latency; multiplies the model's step times."""

    def __init__(self, smoothing: float = 0.5, lo: float = 0.01, hi: float = 100.0) -> None:
        self.smoothing = smoothing
        self.lo = lo
        self.hi = hi
        self.factor = 1.0
        self.observed = False

    def observe(self, observed_ms: float, predicted_ms: float) -> None:
        if observed_ms <= 0 or predicted_ms <= 0:
            return
        ratio = min(self.hi, max(self.lo, observed_ms / predicted_ms))
        if not self.observed:
            self.factor, self.observed = ratio, True
        else:
            self.factor += self.smoothing * (ratio - self.factor)


def prefill_capacity(model: PerformanceModel, input_tokens: float, ttft_slo_ms: float,
                     correction: float, limits: EngineLimits) -> Capacity:
    budget = limits.max_step_tokens
    smallest = max(1.0, min(input_tokens, budget))
    # A prompt longer than the step budget takes several (chunked) steps before its first token.
    chunks = max(1, math.ceil(input_tokens / budget))
    best: Capacity | None = None
    fallback: Capacity | None = None
    for tokens in _geometric(smallest, budget, _GRID_POINTS):
        ms = correction * model.prefill_ms(tokens)
        if ms <= 0:
            continue  # a fit that goes negative out here is not to be trusted
        cap = Capacity(tokens / ms * 1000.0, tokens, ms, True)
        if fallback is None:
            fallback = cap
        if ms * chunks <= ttft_slo_ms and (best is None or cap.tokens_per_s > best.tokens_per_s):
            best = cap
    if best is not None:
        return best
    if fallback is None:
        raise LookupError("the prefill model predicts no positive step time")
    return Capacity(fallback.tokens_per_s, fallback.operating_point, fallback.step_ms, False)


def decode_capacity(model: PerformanceModel, input_tokens: float, output_tokens: float,
                    itl_slo_ms: float, correction: float, limits: EngineLimits) -> Capacity:
    # A sequence holds its prompt and, on average over its life, half its output.
    ctx_blocks = max(1, math.ceil((input_tokens + output_tokens / 2) / limits.block_size))
    fits = int(limits.kv_usage_limit * limits.kv_total_blocks // ctx_blocks)
    largest = max(1, min(limits.max_batch, fits))
    best: Capacity | None = None
    fallback: Capacity | None = None
    for batch in range(1, largest + 1):
        usage = min(1.0, batch * ctx_blocks / limits.kv_total_blocks)
        ms = correction * model.decode_ms(batch, usage)
        if ms <= 0:
            continue
        cap = Capacity(batch / ms * 1000.0, batch, ms, True)
        if fallback is None:
            fallback = cap
        if ms <= itl_slo_ms and (best is None or cap.tokens_per_s > best.tokens_per_s):
            best = cap
    if best is not None:
        return best
    if fallback is None:
        raise LookupError("the decode model predicts no positive step time")
    return Capacity(fallback.tokens_per_s, fallback.operating_point, fallback.step_ms, False)


def queued_ttft(prefill_ms: float, chunks: int, beside_ms: float, busy: float) -> float:
    """TTFT of a prompt whose chunks take `prefill_ms` in all, each step also running
    `beside_ms` of decode, behind a prefill queue busy a `busy` share of the time (M/D/1)."""
    return prefill_ms + chunks * beside_ms + busy / (2.0 * (1.0 - busy)) * prefill_ms


def step_chunks(tokens: float, budget: int) -> list[float]:
    """`tokens` of prefill in the pieces steps of `budget` tokens take them in."""
    full, rest = divmod(max(0.0, tokens), budget)
    return [float(budget)] * int(full) + ([rest] if rest > 0 else [])


def prompt_chunks(input_tokens: float, limits: EngineLimits) -> list[float]:
    """The step-sized pieces one prompt is prefilled in."""
    return step_chunks(max(1.0, input_tokens), max(1, limits.max_step_tokens))


def aggregated_rate(model: PerformanceModel, input_tokens: float, output_tokens: float,
                    slo: Slo, ttft_correction: float, itl_correction: float,
                    limits: EngineLimits) -> float:
    """Most requests/s one aggregated worker serves within both targets (see the module
    docstring); 0 when even a trickle misses them."""
    chunks = prompt_chunks(input_tokens, limits)
    chunk_ms = [ttft_correction * model.prefill_ms(c) for c in chunks]
    if any(ms <= 0 for ms in chunk_ms):
        raise LookupError("the prefill model predicts no positive step time")
    prefill = sum(chunk_ms)  # P, wall ms
    gaps = max(1.0, output_tokens - 1)
    ctx_blocks = max(1, math.ceil((input_tokens + output_tokens / 2) / limits.block_size))
    most = max(1, min(limits.max_batch,
                      int(limits.kv_usage_limit * limits.kv_total_blocks // ctx_blocks)))

    def meets(rate: float) -> bool:
        busy = rate * prefill / 1000.0
        if busy >= 1.0:
            return False
        gap = itl_correction * model.decode_ms(1, ctx_blocks / limits.kv_total_blocks)
        for _ in range(8):  # the batch the rate keeps running, and the gap at that batch
            batch = max(1.0, rate * gaps * gap / (1000.0 * (1.0 - busy)))
            if batch > most:
                return False
            usage = min(1.0, batch * ctx_blocks / limits.kv_total_blocks)
            gap = itl_correction * model.decode_ms(batch, usage)
        if gap <= 0:
            return False
        itl = gap / (1.0 - busy) + max(chunk_ms) / gaps
        ttft = queued_ttft(prefill, len(chunks), gap, busy)
        return itl <= slo.itl_ms and ttft <= slo.ttft_ms

    lo, hi = 0.0, 1000.0 / prefill
    if not meets(hi * 1e-6):
        return 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


def _geometric(lo: float, hi: float, points: int) -> list[float]:
    if hi <= lo:
        return [lo]
    ratio = (hi / lo) ** (1.0 / (points - 1))
    return [lo * ratio**i for i in range(points - 1)] + [float(hi)]


class ReplicaPlanner:
    def __init__(self, slo: Slo, limits: EngineLimits, disaggregated: bool = False,
                 min_replicas: int = 1, max_replicas: int = 8,
                 scale_down_cooldown_s: float = 60.0, max_gpus: int = 0,
                 gpus_per_worker: dict[str, int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if min_replicas < 0 or max_replicas < max(1, min_replicas):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{min_replicas}..{max_replicas}")
        self.slo = slo
        self.limits = limits
        self.disaggregated = disaggregated
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.cooldown_s = scale_down_cooldown_s
        self.clock = clock
        self.ttft_correction = LatencyCorrection()
        self.itl_correction = LatencyCorrection()
        self._recommended: dict[str, deque[tuple[float, int]]] = {}
        self._last_change: dict[str, float] = {}
        self._started = clock()
        self.max_gpus = max_gpus
        self.gpus_per_worker = {role: 1 for role in self.roles} | (gpus_per_worker or {})
        if any(g < 1 for g in self.gpus_per_worker.values()):
            raise ValueError(f"GPUs per worker must be at least 1, got {self.gpus_per_worker}")
        floor = min_replicas * sum(self.gpus_per_worker[r] for r in self.roles)
        if max_gpus < 0 or (max_gpus and max(floor, min(self.gpus_per_worker.values()))
                            > max_gpus):
            raise ValueError(f"a GPU budget of {max_gpus} cannot hold min_replicas={min_replicas} "
                             f"of each role at {self.gpus_per_worker} GPUs per worker")

    @property
    def roles(self) -> list[str]:
        return [ROLE_PREFILL, ROLE_DECODE] if self.disaggregated else [ROLE_AGGREGATED]

    def correct(self, observed_ttft_ms: float | None, model_ttft_ms: float | None,
                observed_itl_ms: float | None, model_itl_ms: float | None) -> None:
        """Fold one interval's observed latencies (against the model's) into the corrections."""
        if observed_ttft_ms is not None and model_ttft_ms is not None:
            self.ttft_correction.observe(observed_ttft_ms, model_ttft_ms)
        if observed_itl_ms is not None and model_itl_ms is not None:
            self.itl_correction.observe(observed_itl_ms, model_itl_ms)

    def model_ttft(self, model: PerformanceModel, input_tokens: float,
                   rate_per_worker: float) -> float | None:
        """The model's TTFT (its own clock) for a mean prompt, as the capacity plans it.
        Aggregated, at `rate_per_worker` requests/s on each worker: the prompt's chunks beside
        one decode step each and the mean wait for the prefill queue, whose busy share is taken
        at the current correction (None when that share is 1 or more: an overloaded interval
        says how long the queue grew, not how long a step takes). Disaggregated: one step of
        the whole prompt, as `prefill_capacity` plans a prefill worker with no queue; there the
        correction carrying the queue's wait is what sizes the pool for it."""
        if self.disaggregated:
            return model.prefill_ms(input_tokens)
        chunks = prompt_chunks(input_tokens, self.limits)
        prefill = sum(model.prefill_ms(c) for c in chunks)
        if prefill <= 0:
            return None
        busy = max(0.0, rate_per_worker) * self.ttft_correction.factor * prefill / 1000.0
        if busy >= 1.0:
            return None
        beside = model.decode_ms(1, 0.0) if model.decode is not None else 0.0
        return queued_ttft(prefill, len(chunks), beside, busy)

    def needs(self, forecast: LoadForecast, model: PerformanceModel) -> ReplicaNeeds:
        """Fractional replicas per role; LookupError when the model cannot answer yet."""
        rate = max(0.0, forecast.request_rate)
        isl = max(0.0, forecast.input_tokens)
        osl = max(0.0, forecast.output_tokens)
        prefill = prefill_capacity(model, isl, self.slo.ttft_ms, self.ttft_correction.factor,
                                   self.limits)
        decode = decode_capacity(model, isl, osl, self.slo.itl_ms, self.itl_correction.factor,
                                 self.limits)
        prefill_need = rate * isl / prefill.tokens_per_s
        decode_need = rate * osl / decode.tokens_per_s
        if self.disaggregated:
            needs = {ROLE_PREFILL: prefill_need, ROLE_DECODE: decode_need}
        else:
            per_worker = aggregated_rate(model, isl, osl, self.slo, self.ttft_correction.factor,
                                         self.itl_correction.factor, self.limits)
            shared = prefill_need + decode_need
            needs = {ROLE_AGGREGATED: max(shared, rate / per_worker) if per_worker > 0
                     else shared}
        return ReplicaNeeds(needs, prefill, decode)

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))

    def decide(self, role: str, need: float | None, current: int) -> int:
        """The replica count to apply for `role` now, given its fractional need (None: no
        estimate yet, so hold) and the replicas running or starting."""
        target = self.propose(role, need, current)
        self.commit(role, current, target)
        return target

    def commit(self, role: str, current: int, target: int) -> None:
        """Record that `target` is applied (after anything that cut a proposal): a scale-up
        starts the cooldown."""
        if target > current:
            self._last_change[role] = self.clock()

    def propose(self, role: str, need: float | None, current: int, floor: int = 0) -> int:
        """What `decide` would apply, remembering the recommendation but not acting on it;
        `floor`: recommend at least this many (within `max_replicas`)."""
        now = self.clock()
        raw = current if need is None else math.ceil(need - 1e-9)
        recommended = self.clamp(max(raw, floor))
        history = self._recommended.setdefault(role, deque())
        history.append((now, recommended))
        while history and history[0][0] < now - self.cooldown_s:
            history.popleft()
        if recommended >= current:
            target = recommended
        elif current > self.max_replicas:
            target = self.max_replicas  # a lowered ceiling applies at once
        elif now - self._last_change.get(role, self._started) < self.cooldown_s:
            target = current
        else:
            target = min(current, max(r for _, r in history))
        return target

    def note_change(self, role: str, replicas: int) -> None:
        """A change made outside `decide` (the reactive loop, a hand-made one): it restarts the
        cooldown and counts as recommended, so a scale-down waits a cooldown before undoing it."""
        now = self.clock()
        self._last_change[role] = now
        self._recommended.setdefault(role, deque()).append((now, replicas))

    def may_scale_down(self, role: str, to: int) -> bool:
        """Whether `role` may go down to `to` now: the cooldown is over and nothing recommended
        within it was higher."""
        now = self.clock()
        if to < self.min_replicas or now - self._last_change.get(role, self._started) \
                < self.cooldown_s:
            return False
        recent = [r for t, r in self._recommended.get(role, ()) if t >= now - self.cooldown_s]
        return all(r <= to for r in recent)

    def gpus(self, replicas: dict[str, int]) -> int:
        return sum(n * self.gpus_per_worker[role] for role, n in replicas.items())

    def fits_budget(self, replicas: dict[str, int]) -> bool:
        return not self.max_gpus or self.gpus(replicas) <= self.max_gpus

    def fit_budget(self, targets: dict[str, int]) -> dict[str, int]:
        """`targets` cut to the GPU budget (see the module docstring); unchanged when they fit."""
        if self.fits_budget(targets):
            return dict(targets)
        cost = self.gpus_per_worker
        scale = self.max_gpus / self.gpus(targets)
        fitted = {r: min(t, max(self.min_replicas, math.floor(t * scale)))
                  for r, t in targets.items()}
        while self.gpus(fitted) > self.max_gpus:  # the floors pushed it over: trim the largest
            role = max((r for r in fitted if fitted[r] > self.min_replicas),
                       key=lambda r: fitted[r] * cost[r])
            fitted[role] -= 1
        while True:
            spare = self.max_gpus - self.gpus(fitted)
            short = [r for r, t in targets.items() if fitted[r] < t and cost[r] <= spare]
            if not short:
                return fitted
            role = max(short, key=lambda r: (targets[r] - fitted[r]) / targets[r])
            fitted[role] += 1
