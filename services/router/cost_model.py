"""The router's cost model: predicted milliseconds to a request's first token on a worker,
learnt online from the workers' forward-pass records (`fpm`), one fit per served model.

An engine step costs

    step_ms = P·(a·t² + b·t + c) + D·(e + f·n + g·u + h·u²)

(t prefill tokens in the step, n decoding sequences, u KV usage fraction, P / D: the step
prefilled / decoded), the planner's form (`services/planner/performance_model.py`), so that one
fit serves mixed steps too. Here it is fitted incrementally, cheaply enough for the router's
event loop: exponentially forgetting normal equations (O(k²) per record, a 7x7 solve when a
prediction needs fresh coefficients) that also hold a prior as a few pseudo-records spread over
the operating range, so that before any record arrives, and where the records say nothing (no
long prompt seen yet: the cost of a full chunk), the prior answers. A fitted prefill curvature
or slope below zero is refitted at zero: a cost that shrinks with more tokens would invite piling
work on one worker, and send a request away from the worker that caches its prefix (seen with a
few noisy steps of a CPU engine, where short steps happened to run slowest).

Time to first token on a worker, under first-come-first-served chunked prefill with a per-step
token budget B (learnt as the largest step seen; its decode tokens take their share): the
queued prefill tokens Q ahead of the request and its own uncached tokens U go through in
S = ceil((Q + U) / (B - n)) steps, each paying the prefill time of its chunk (superlinear within a
chunk) plus a decode pass while sequences decode beside it:

    ttft_ms = (S - 1)·prefill(B - n) + prefill(rest) + S·decode(n, u)     [decode only if n > 0]

Routing on TTFT alone is greedy: a request that skips a busy worker holding its prefix saves
itself some queueing but adds a full recompute to the fleet's work, which delays everyone after
it, and duplicates the prefix in a second cache. `RouteCost` prices that externality with the
fleet's own queueing pressure:

    cost(w) = ttft_ms(w) + pressure · work_ms(w)

where work_ms(w) is the request's prefill time alone at w's overlap and pressure is the measured
ratio of mean queueing delay (the predicted time to clear each worker's queued prefill, averaged
over the fleet) to mean work per request, both smoothed over recent decisions. For a queue that
ratio is what one more millisecond of work costs the requests behind it (Little's law: u/(1-u)
at utilisation u of an M/M/1 queue). An idle fleet has pressure 0: pure TTFT, so load spreads
freely; as queues build, cache hits (less work) win over shorter queues, which is what keeps a
loaded fleet stable.

Pure: no clock, no I/O; the router feeds records and loads, asks for quotes and
says which quotes it acted on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.messages import ForwardPass

# Feature scales: coefficients are fitted on t/1024, n/64 so the normal equations stay well
# conditioned (raw t² and 1 differ by eight orders of magnitude).
_T = 1024.0
_N = 64.0
_TERMS = 7
_A, _B, _C, _E, _F, _G, _H = range(_TERMS)


@dataclass(frozen=True, slots=True)
class StepCoefficients:
    """step_ms = P·(a·t² + b·t + c) + D·(e + f·n + g·u + h·u²), in natural units."""

    a: float
    b: float
    c: float
    e: float
    f: float
    g: float
    h: float

    def prefill_ms(self, tokens: float) -> float:
        if tokens <= 0:
            return 0.0
        return max(0.0, self.a * tokens * tokens + self.b * tokens + self.c)

    def decode_ms(self, batch: float, kv_usage: float) -> float:
        if batch <= 0:
            return 0.0
        return max(0.0, self.e + self.f * batch + self.g * kv_usage + self.h * kv_usage * kv_usage)

    def as_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c, "e": self.e, "f": self.f, "g": self.g,
                "h": self.h}


# The prior: a vLLM-like engine on one modern GPU (Dynamo's mocker polynomials, which Turnout's
# mocker shares). Any engine's records overrule it within a few hundred steps.
DEFAULT_PRIOR = StepCoefficients(a=4.209989e-7, b=0.01518344, c=16.50142,
                                 e=5.74, f=0.0, g=54.01, h=-25.74)
DEFAULT_CHUNK_TOKENS = 8192
# Decode-only steps come one per generated token (at batch 1, one per token of every stream):
# fitting each cost the router ~12% of its CPU. One in this many is fitted, weighted as the
# steps it stands for; steps that prefill are rarer and always fitted.
DECODE_SAMPLE = 8  # vLLM's usual max_num_batched_tokens, until a step shows more


def _features(prefill_tokens: float, decode_tokens: float, kv_usage: float) -> list[float]:
    p = 1.0 if prefill_tokens > 0 else 0.0
    d = 1.0 if decode_tokens > 0 else 0.0
    t = prefill_tokens / _T
    n = decode_tokens / _N
    return [p * t * t, p * t, p, d, d * n, d * kv_usage, d * kv_usage * kv_usage]


# Where the prior speaks: prefill steps of several sizes, decode steps of several batches and
# KV usages (enough distinct points to pin every coefficient).
_PRIOR_POINTS = ((64, 0, 0.0), (512, 0, 0.0), (2048, 0, 0.0), (8192, 0, 0.0),
                 (0, 1, 0.0), (0, 16, 0.25), (0, 64, 0.5), (0, 128, 0.75), (0, 256, 1.0))


def _accumulate(gram: list[list[float]], rhs: list[float], x: list[float], y: float,
                weight: float, decay: float) -> None:
    """Decay the normal equations, then add one weighted record (upper triangle only)."""
    for i in range(_TERMS):
        xi = x[i] * weight
        row = gram[i]
        rhs[i] = rhs[i] * decay + xi * y
        for j in range(i, _TERMS):
            row[j] = row[j] * decay + xi * x[j]


def _from_scaled(x: list[float]) -> StepCoefficients:
    return StepCoefficients(x[_A] / (_T * _T), x[_B] / _T, x[_C], x[_E], x[_F] / _N, x[_G],
                            x[_H])


class StepCostModel:
    """One served model's step-time fit and the TTFT prediction built on it.

    `half_life_steps`: a record's weight halves after this many newer records (engines change
    little, but a fleet may be re-deployed on other hardware under the same model name).
    `prior_weight`: how many records the prior is worth, spread over prefill sizes up to 8,192
    tokens and decode batches up to 256 at every KV usage. Little: any data overrule it where
    they speak (its points carry a full chunk's milliseconds, which weigh heavily in squares).
    """

    def __init__(self, prior: StepCoefficients = DEFAULT_PRIOR, prior_weight: float = 0.25,
                 half_life_steps: float = 4096.0,
                 chunk_tokens_prior: int = DEFAULT_CHUNK_TOKENS) -> None:
        if prior_weight <= 0:
            raise ValueError(f"prior_weight must be > 0, got {prior_weight}")
        if half_life_steps <= 0:
            raise ValueError(f"half_life_steps must be > 0, got {half_life_steps}")
        if chunk_tokens_prior <= 0:
            raise ValueError(f"chunk_tokens_prior must be > 0, got {chunk_tokens_prior}")
        self.prior = prior
        self.prior_weight = prior_weight
        self.decay = 0.5 ** (1.0 / half_life_steps)
        self.chunk_tokens_prior = chunk_tokens_prior
        # The prior as `prior_weight` records spread over the operating range, never decayed.
        self._prior_gram = [[0.0] * _TERMS for _ in range(_TERMS)]
        self._prior_rhs = [0.0] * _TERMS
        w = prior_weight / len(_PRIOR_POINTS)
        for t, n, u in _PRIOR_POINTS:
            _accumulate(self._prior_gram, self._prior_rhs, _features(t, n, u),
                        prior.prefill_ms(t) + prior.decode_ms(n, u), w, 1.0)
        self._gram = [[0.0] * _TERMS for _ in range(_TERMS)]  # upper triangle used
        self._rhs = [0.0] * _TERMS
        self.records = 0  # records observed (not decayed)
        self.prefill_records = 0
        self.decode_records = 0
        self.max_step_tokens = 0  # largest prefill step seen (its decode tokens included)
        self._coef: StepCoefficients = prior
        self._stale = False
        self._decode_skipped = 0  # decode-only steps since the last one fitted
        self._sample_decay = self.decay ** DECODE_SAMPLE

    # -- input ---------------------------------------------------------------------------------

    def observe(self, record: ForwardPass, kv_total_blocks: int) -> None:
        """One engine step of a worker whose KV pool holds `kv_total_blocks` blocks."""
        if record.duration_ms <= 0 or (record.prefill_tokens <= 0 and record.decode_tokens <= 0):
            return  # an idle step says nothing about cost
        self.records += 1
        weight, decay = 1.0, self.decay
        if record.prefill_tokens <= 0:
            self.decode_records += 1
            self._decode_skipped += 1
            if self._decode_skipped < DECODE_SAMPLE:
                return
            self._decode_skipped = 0
            weight, decay = float(DECODE_SAMPLE), self._sample_decay
        usage = min(1.0, record.kv_used_blocks / kv_total_blocks) if kv_total_blocks > 0 else 0.0
        _accumulate(self._gram, self._rhs,
                    _features(record.prefill_tokens, record.decode_tokens, usage),
                    record.duration_ms, weight, decay)
        if record.prefill_tokens > 0:
            self.prefill_records += 1
            self.max_step_tokens = max(self.max_step_tokens,
                                       record.prefill_tokens + record.decode_tokens)
            if record.decode_tokens > 0:
                self.decode_records += 1
        self._stale = True

    def observe_all(self, records: Iterable[ForwardPass], kv_total_blocks: int) -> None:
        for r in records:
            self.observe(r, kv_total_blocks)

    # -- the fit -------------------------------------------------------------------------------

    @property
    def coefficients(self) -> StepCoefficients:
        """The current fit (the prior before any record)."""
        if self._stale:
            self._coef = self._solve()
            self._stale = False
        return self._coef

    def _solve(self) -> StepCoefficients:
        free = list(range(_TERMS))
        fixed: dict[int, float] = {}
        x = self._solve_free(free)
        # No negative curvature or slope: refit with the term at zero (twice at most each).
        while (term := next((t for t in (_A, _B) if t in free and x[t] < 0), None)) is not None:
            free.remove(term)
            fixed[term] = 0.0
            x = self._solve_free(free, fixed)
        return _from_scaled(x)

    def _solve_free(self, free: list[int], fixed: dict[int, float] | None = None) -> list[float]:
        """Least squares over the records and the prior's records together, the free
        coefficients only (what the fixed ones explain is taken out first)."""
        fixed = fixed or {}

        def gram(i: int, j: int) -> float:
            i, j = min(i, j), max(i, j)
            return self._gram[i][j] + self._prior_gram[i][j]

        m = [[gram(i, j) for j in free] for i in free]
        for k in range(len(free)):  # a whisker of ridge: collinear columns split their weight
            m[k][k] *= 1.0 + 1e-9
        b = [self._rhs[i] + self._prior_rhs[i] - sum(gram(i, k) * v for k, v in fixed.items())
             for i in free]
        sol = _cholesky_solve(m, b)
        out = [0.0] * _TERMS
        for k, v in fixed.items():
            out[k] = v
        for idx, i in enumerate(free):
            out[i] = sol[idx]
        return out

    @property
    def chunk_tokens(self) -> int:
        """Tokens one step computes at most: the largest prefill step seen, else the prior."""
        return self.max_step_tokens or self.chunk_tokens_prior

    # -- predictions ---------------------------------------------------------------------------

    def prefill_ms(self, tokens: float) -> float:
        """One step that prefills `tokens` and decodes nothing."""
        return self.coefficients.prefill_ms(tokens)

    def decode_ms(self, batch: float, kv_usage: float) -> float:
        """One step that decodes `batch` sequences at KV usage fraction `kv_usage`."""
        return self.coefficients.decode_ms(batch, kv_usage)

    def ttft_ms(self, queued_tokens: float, new_tokens: float, decoding: float = 0.0,
                kv_usage: float = 0.0) -> float:
        """Predicted time until a request's first token on a worker with `queued_tokens` of
        prefill ahead of it and `decoding` sequences decoding at KV usage `kv_usage`, when
        `new_tokens` of its prompt are not cached there (see the module docstring)."""
        coef = self.coefficients
        total = max(0.0, queued_tokens) + max(0.0, new_tokens)
        if total <= 0:
            return 0.0
        decoding = max(0.0, decoding)
        chunk = max(1.0, self.chunk_tokens - decoding)
        steps = math.ceil(total / chunk)
        rest = total - (steps - 1) * chunk
        ms = (steps - 1) * coef.prefill_ms(chunk) + coef.prefill_ms(rest)
        if decoding > 0:
            ms += steps * coef.decode_ms(decoding, min(1.0, max(0.0, kv_usage)))
        return ms


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What the router knows of one worker when it places a request."""

    queued_tokens: float  # prefill tokens queued or being prefilled there
    decoding: float  # sequences decoding there
    kv_usage: float  # fraction of its KV blocks in use


@dataclass(frozen=True, slots=True)
class Quote:
    """The costs of one decision's candidates, and the fleet's state they were priced at."""

    costs: list[float]
    mean_wait_ms: float  # mean over the candidates of the time to clear their queued prefill
    work_ms: float  # the request's prefill time alone, on the candidate where it is least


class RouteCost:
    """Costs of sending one request to each candidate worker (see the module docstring).

    `quote` is pure (a preview may ask); `observe` folds a placed request's quote into the
    pressure, whose averages follow roughly the last `smoothing_decisions` placements.
    """

    def __init__(self, steps: StepCostModel, smoothing_decisions: float = 64.0) -> None:
        if smoothing_decisions < 1:
            raise ValueError(f"smoothing_decisions must be >= 1, got {smoothing_decisions}")
        self.steps = steps
        self._alpha = 1.0 / smoothing_decisions
        self.wait_ms = 0.0  # smoothed mean over the fleet of the time to clear its queue
        self.work_ms = 0.0  # smoothed prefill time of a request alone, where it is cheapest
        self.decisions = 0

    @property
    def pressure(self) -> float:
        return self.wait_ms / self.work_ms if self.work_ms > 0 else 0.0

    def quote(self, loads: Sequence[WorkerLoad], uncached_tokens: Sequence[float]) -> Quote:
        """cost(w) for each candidate; `uncached_tokens[i]`: the request's tokens (prompt and
        anything generated before a migration) that candidate i does not cache."""
        if len(loads) != len(uncached_tokens):
            raise ValueError(f"{len(loads)} loads for {len(uncached_tokens)} candidates")
        steps = self.steps
        pressure = self.pressure
        costs: list[float] = []
        wait_sum = 0.0
        best_work = math.inf
        for load, new in zip(loads, uncached_tokens, strict=True):
            ttft = steps.ttft_ms(load.queued_tokens, new, load.decoding, load.kv_usage)
            work = steps.ttft_ms(0.0, new)
            costs.append(ttft + pressure * work)
            wait_sum += steps.ttft_ms(load.queued_tokens, 0.0, load.decoding, load.kv_usage)
            best_work = min(best_work, work)
        if not costs:
            return Quote([], 0.0, 0.0)
        return Quote(costs, wait_sum / len(costs), best_work)

    def observe(self, quote: Quote) -> None:
        """A request was placed at `quote`: its fleet state counts towards the pressure."""
        if not quote.costs:
            return
        a = self._alpha if self.decisions else 1.0
        self.wait_ms += a * (quote.mean_wait_ms - self.wait_ms)
        self.work_ms += a * (quote.work_ms - self.work_ms)
        self.decisions += 1


class HandoffCostModel:
    """Milliseconds from a prefill worker's first token to the decode worker's first token (the
    first inter-token gap of a disaggregated stream), against the prompt tokens whose KV the
    decode worker pulls:

        handoff_ms = fixed + per_token · pulled_tokens

    (fixed: the router's and the workers' hops, the wait for the decode worker's step in
    progress and one decode step; per_token: bytes per token over the link's bandwidth), fitted
    from observed hand-offs by exponentially forgetting least squares over a prior worth
    `prior_weight` hand-offs at 0 and `_PRIOR_SPAN` pulled tokens. The prior (5 ms + 128 KiB per
    token at 25 GB/s) answers until hand-offs are seen; a fitted slope below zero is refitted
    at zero (a gap that shrinks with more to move would invite moving more). `upper` adds
    `sigmas` standard deviations of the residuals seen (decayed alike): a target on every gap
    is missed by the gaps above the mean, not by the mean.
    """

    _PRIOR_SPAN = 4096.0

    def __init__(self, fixed_ms: float = 5.0, per_token_ms: float = 131072 / 25e9 * 1e3,
                 prior_weight: float = 2.0, half_life: float = 256.0) -> None:
        if fixed_ms < 0 or per_token_ms < 0:
            raise ValueError("the hand-off prior must be >= 0")
        if prior_weight <= 0 or half_life <= 0:
            raise ValueError("prior_weight and half_life must be > 0")
        self.decay = 0.5 ** (1.0 / half_life)
        w = prior_weight / 2
        x1 = self._PRIOR_SPAN / _T
        y0, y1 = fixed_ms, fixed_ms + per_token_ms * self._PRIOR_SPAN
        # Normal equations of [1, x] (x: pulled tokens / 1024), prior included, never decayed.
        self._prior = (2 * w, w * x1, w * x1 * x1, w * (y0 + y1), w * x1 * y1)
        self._sums = [0.0] * 5
        self.observations = 0
        self._coef = (fixed_ms, per_token_ms * _T)
        self._sq_residuals = 0.0  # decayed sum of squared residuals (before each refit)
        self._weight = 0.0  # decayed count of observations

    def observe(self, pulled_tokens: float, handoff_ms: float) -> None:
        if handoff_ms < 0:
            return
        x = max(0.0, pulled_tokens) / _T
        d = self.decay
        residual = handoff_ms - self.predict(pulled_tokens)
        self._sq_residuals = self._sq_residuals * d + residual * residual
        self._weight = self._weight * d + 1.0
        s = self._sums
        for i, v in enumerate((1.0, x, x * x, handoff_ms, x * handoff_ms)):
            s[i] = s[i] * d + v
        self.observations += 1
        n, sx, sxx, sy, sxy = (a + b for a, b in zip(self._prior, s, strict=True))
        det = n * sxx - sx * sx
        slope = (n * sxy - sx * sy) / det if det > 0 else 0.0
        if slope < 0:
            slope = 0.0
        self._coef = ((sy - slope * sx) / n, slope)

    def predict(self, pulled_tokens: float) -> float:
        fixed, slope = self._coef
        return max(0.0, fixed + slope * max(0.0, pulled_tokens) / _T)

    @property
    def spread_ms(self) -> float:
        """Standard deviation of the observed gaps around the fit (0 before any)."""
        return math.sqrt(self._sq_residuals / self._weight) if self._weight > 0 else 0.0

    def upper(self, pulled_tokens: float, sigmas: float = 2.0) -> float:
        return self.predict(pulled_tokens) + sigmas * self.spread_ms


class CostModels:
    """One `RouteCost` (over one `StepCostModel`) per served model, created on first use."""

    def __init__(self, prior: StepCoefficients = DEFAULT_PRIOR, prior_weight: float = 0.25,
                 half_life_steps: float = 4096.0,
                 chunk_tokens_prior: int = DEFAULT_CHUNK_TOKENS,
                 smoothing_decisions: float = 64.0) -> None:
        self._settings = (prior, prior_weight, half_life_steps, chunk_tokens_prior)
        self._smoothing = smoothing_decisions
        RouteCost(StepCostModel(*self._settings), smoothing_decisions)  # validate now
        self.models: dict[str, RouteCost] = {}

    def get(self, model: str) -> RouteCost:
        m = self.models.get(model)
        if m is None:
            m = self.models[model] = RouteCost(StepCostModel(*self._settings), self._smoothing)
        return m


def _cholesky_solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a·x = b for symmetric positive definite a (the prior's ridge makes it so)."""
    n = len(b)
    low = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            s = a[i][j] - sum(low[i][k] * low[j][k] for k in range(j))
            if i == j:
                low[i][i] = math.sqrt(max(s, 1e-300))
            else:
                low[i][j] = s / low[j][j]
    y = [0.0] * n
    for i in range(n):
        y[i] = (b[i] - sum(low[i][k] * y[k] for k in range(i))) / low[i][i]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        x[i] = (y[i] - sum(low[k][i] * x[k] for k in range(i + 1, n))) / low[i][i]
    return x
