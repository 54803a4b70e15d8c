"""The planner's performance model: how long an engine step takes, fitted from forward passes.

One least-squares fit over every recent step (`ForwardPass` records from the `fpm` topic) of

    step_ms = P·(a·t² + b·t + c) + D·(e + f·n + g·u + h·u²)

where t is the step's prefill tokens, n its decode tokens (one per decoding sequence, so the
decode batch), u the KV usage fraction, P = 1 when the step prefilled and D = 1 when it decoded.
A joint fit is what lets mixed steps (chunked prefill beside running decodes) teach the model as
much as pure ones. From it: prefill time (so throughput) against tokens per step, and decode step
time against batch size and KV usage.

A profile (`--profile PATH`, JSON; `turnout profile` writes one from a sweep) seeds the model:
coefficients used until the observed steps identify a part, and/or sample steps kept in every
fit:

    {"prefill_ms": [a, b, c], "decode_ms": [e, f, g, h], "kv_total_blocks": 16384,
     "block_size": 64, "forward_passes": [{"prefill_tokens": 512, "decode_tokens": 0,
                                            "kv_usage": 0.1, "duration_ms": 24.4}, ...]}

Owns the fit and the predictions. Does not own where records come from or how many replicas they
imply (`main`, `replica_planner`).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.messages import ForwardPass

PREFILL_TERMS = 3  # a, b, c
DECODE_TERMS = 4  # e, f, g, h
_RIDGE = 1e-10  # relative to the scaled Gram matrix's diagonal: only breaks exact ties
_DISTINCT = 3  # a part is identified once it has seen this many distinct operating points


@dataclass(frozen=True, slots=True)
class StepSample:
    prefill_tokens: int
    decode_tokens: int
    kv_usage: float
    duration_ms: float


@dataclass(frozen=True, slots=True)
class FitReport:
    samples: int
    prefill_samples: int
    decode_samples: int
    r2: float | None  # over the samples in the fit; None before any fit
    rmse_ms: float | None
    prefill_source: str  # "fit" | "profile" | "none"
    decode_source: str


def features(prefill_tokens: float, decode_tokens: float, kv_usage: float) -> list[float]:
    p = 1.0 if prefill_tokens > 0 else 0.0
    d = 1.0 if decode_tokens > 0 else 0.0
    t, n, u = float(prefill_tokens), float(decode_tokens), kv_usage
    return [p * t * t, p * t, p, d, d * n, d * u, d * u * u]


def least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Coefficients minimising the squared error of `rows · coef` against `targets`.

    Columns are scaled to unit RMS (t² and 1 differ by eight orders of magnitude); an all-zero
    column gets coefficient 0; a whisker of ridge keeps collinear columns solvable (it splits
    their weight instead of failing). Normal equations in plain Python: a handful of columns.
    """
    k = len(rows[0]) if rows else 0
    m = len(rows)
    scale = [math.sqrt(sum(r[j] * r[j] for r in rows) / m) if m else 0.0 for j in range(k)]
    live = [j for j in range(k) if scale[j] > 0]
    q = len(live)
    gram = [[0.0] * q for _ in range(q)]
    rhs = [0.0] * q
    for row, y in zip(rows, targets, strict=True):
        x = [row[j] / scale[j] for j in live]
        for i in range(q):
            xi = x[i]
            if xi == 0.0:
                continue
            rhs[i] += xi * y
            g = gram[i]
            for j in range(i, q):
                g[j] += xi * x[j]
    for i in range(q):
        for j in range(i):
            gram[i][j] = gram[j][i]
    ridge = _RIDGE * max((gram[i][i] for i in range(q)), default=0.0)
    for i in range(q):
        gram[i][i] += ridge
    solution = _solve(gram, rhs)
    coef = [0.0] * k
    for idx, j in enumerate(live):
        coef[j] = solution[idx] / scale[j]
    return coef


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (a is small and, with the ridge, regular)."""
    n = len(b)
    a = [row[:] for row in a]
    b = b[:]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if a[pivot][col] == 0.0:
            continue
        a[col], a[pivot] = a[pivot], a[col]
        b[col], b[pivot] = b[pivot], b[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            if f:
                for c in range(col, n):
                    a[r][c] -= f * a[col][c]
                b[r] -= f * b[col]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        if a[r][r] == 0.0:
            continue
        x[r] = (b[r] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


class PerformanceModel:
    def __init__(self, window: int = 4096, min_samples: int = 16) -> None:
        self.samples: deque[StepSample] = deque(maxlen=window)
        self.seed: list[StepSample] = []  # from a profile: in every fit, never aged out
        self.min_samples = min_samples
        self.profile_prefill: tuple[float, ...] | None = None
        self.profile_decode: tuple[float, ...] | None = None
        self.kv_total_blocks: int | None = None  # from a profile, until workers report theirs
        self.block_size: int | None = None
        self.prefill: tuple[float, ...] | None = None  # a, b, c in use
        self.decode: tuple[float, ...] | None = None  # e, f, g, h in use
        self.report = FitReport(0, 0, 0, None, None, "none", "none")

    # -- input ---------------------------------------------------------------------------------

    def observe(self, record: ForwardPass, kv_total_blocks: int) -> None:
        """One engine step of a worker whose KV pool holds `kv_total_blocks` blocks."""
        if record.duration_ms <= 0 or (record.prefill_tokens <= 0 and record.decode_tokens <= 0):
            return  # an empty step says nothing about cost
        usage = record.kv_used_blocks / kv_total_blocks if kv_total_blocks > 0 else 0.0
        self.samples.append(StepSample(record.prefill_tokens, record.decode_tokens,
                                       min(1.0, usage), record.duration_ms))

    def load_profile(self, path: str | Path) -> None:
        """Seed from a profile JSON (see the module docstring); ValueError when malformed."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"profile {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"profile {str(path)!r}: expected a JSON object")
        self.profile_prefill = _coefficients(data, "prefill_ms", PREFILL_TERMS, path)
        self.profile_decode = _coefficients(data, "decode_ms", DECODE_TERMS, path)
        for key in ("kv_total_blocks", "block_size"):
            value = data.get(key)
            if value is not None:
                if not isinstance(value, int) or value <= 0:
                    raise ValueError(f"profile {str(path)!r}: {key} must be a positive integer")
                setattr(self, key, value)
        seed = data.get("forward_passes", [])
        if not isinstance(seed, list):
            raise ValueError(f"profile {str(path)!r}: forward_passes must be a list")
        try:
            self.seed = [StepSample(int(s["prefill_tokens"]), int(s["decode_tokens"]),
                                    float(s.get("kv_usage", 0.0)), float(s["duration_ms"]))
                         for s in seed]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"profile {str(path)!r}: bad forward_passes entry: {exc}") from exc
        self.fit()

    # -- fitting -------------------------------------------------------------------------------

    def fit(self) -> FitReport:
        """Refit from the seed and the recent samples; parts too thinly observed fall back to
        the profile's coefficients (or stay unknown)."""
        data = [*self.seed, *self.samples]
        prefill = [s for s in data if s.prefill_tokens > 0]
        decode = [s for s in data if s.decode_tokens > 0]
        prefill_ok = _identified(prefill, self.min_samples,
                                 lambda s: (s.prefill_tokens,))
        decode_ok = _identified(decode, self.min_samples,
                                lambda s: (s.decode_tokens, round(s.kv_usage, 3)))
        r2 = rmse = None
        coef: list[float] = []
        if prefill_ok or decode_ok:
            rows = [features(s.prefill_tokens, s.decode_tokens, s.kv_usage) for s in data]
            targets = [s.duration_ms for s in data]
            coef = least_squares(rows, targets)
            r2, rmse = _quality(rows, targets, coef)
        self.prefill = tuple(coef[:PREFILL_TERMS]) if prefill_ok else self.profile_prefill
        self.decode = tuple(coef[PREFILL_TERMS:]) if decode_ok else self.profile_decode
        self.report = FitReport(
            len(data), len(prefill), len(decode), r2, rmse,
            "fit" if prefill_ok else "profile" if self.profile_prefill else "none",
            "fit" if decode_ok else "profile" if self.profile_decode else "none")
        return self.report

    # -- predictions ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.prefill is not None and self.decode is not None

    def prefill_ms(self, tokens: float) -> float:
        """Time of a step that prefills `tokens` (uncached) tokens and decodes nothing."""
        if self.prefill is None:
            raise LookupError("no prefill model yet (no profile, too few prefill steps seen)")
        a, b, c = self.prefill
        return a * tokens * tokens + b * tokens + c

    def decode_ms(self, batch: float, kv_usage: float) -> float:
        """Time of a step that decodes `batch` sequences at KV usage fraction `kv_usage`."""
        if self.decode is None:
            raise LookupError("no decode model yet (no profile, too few decode steps seen)")
        e, f, g, h = self.decode
        return e + f * batch + g * kv_usage + h * kv_usage * kv_usage

    def step_ms(self, prefill_tokens: float, decode_tokens: float, kv_usage: float) -> float:
        ms = 0.0
        if prefill_tokens > 0:
            ms += self.prefill_ms(prefill_tokens)
        if decode_tokens > 0:
            ms += self.decode_ms(decode_tokens, kv_usage)
        return ms


def _coefficients(data: dict[str, object], key: str, terms: int,
                  path: str | Path) -> tuple[float, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != terms
            or not all(isinstance(v, int | float) for v in value)):
        raise ValueError(f"profile {str(path)!r}: {key} must be a list of {terms} numbers")
    return tuple(float(v) for v in value)


def _identified(samples: list[StepSample], min_samples: int,
                point: Callable[[StepSample], tuple[float, ...]]) -> bool:
    if len(samples) < min_samples:
        return False
    seen: set[tuple[float, ...]] = set()
    for s in samples:
        seen.add(point(s))
        if len(seen) >= _DISTINCT:
            return True
    return False


def _quality(rows: Iterable[Sequence[float]], targets: Sequence[float],
             coef: Sequence[float]) -> tuple[float | None, float | None]:
    """R² and RMSE of the fit; R² is None when the targets do not vary."""
    n = len(targets)
    if n == 0:
        return None, None
    mean = sum(targets) / n
    sse = sst = 0.0
    for row, y in zip(rows, targets, strict=True):
        pred = sum(x * c for x, c in zip(row, coef, strict=True))
        sse += (y - pred) ** 2
        sst += (y - mean) ** 2
    r2 = 1.0 - sse / sst if sst > 0 else None
    return r2, math.sqrt(sse / n)
