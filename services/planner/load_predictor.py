"""Predictors of the next adjustment interval's value of one load series, and their error.

The planner keeps one predictor per series (request rate, mean input length, mean output
length). Each sees one observation per interval (`observe`) and answers `predict()`, the value it
expects next interval, or None before its first observation. An interval with nothing to observe
(no request finished, so no mean length) is simply not observed: the prediction carries over.
`TrackedPredictor` wraps any of them and scores each prediction against the observation that
follows it, for the planner's metrics.

Owns the arithmetic only. Does not own where observations come from or what a prediction is used
for (`main`, `replica_planner`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from typing import Any, Protocol

log = logging.getLogger("turnout.planner")

PREDICTORS = ["constant", "moving-average", "kalman", "arima"]


class LoadPredictor(Protocol):
    def observe(self, value: float) -> None: ...

    def predict(self) -> float | None: ...


class ConstantPredictor:
    """Next interval looks like the last one."""

    def __init__(self) -> None:
        self.last: float | None = None

    def observe(self, value: float) -> None:
        self.last = value

    def predict(self) -> float | None:
        return self.last


class MovingAveragePredictor:
    """Mean of the last `window` observations."""

    def __init__(self, window: int = 6) -> None:
        if window < 1:
            raise ValueError(f"moving-average window must be at least 1, got {window}")
        self.values: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self.values.append(value)

    def predict(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None


class KalmanPredictor:
    """A local-level Kalman filter: the series is a level that drifts as a random walk (variance
    `process_noise` per interval) seen through measurement noise (`measurement_noise`).

    Only the ratio of the two matters once the filter settles (it sets the steady-state gain), so
    the same settings suit a rate of 3 req/s and a length of 3,000 tokens. A step change is
    tracked within a few intervals; single-interval spikes are damped.
    """

    def __init__(self, process_noise: float = 0.5, measurement_noise: float = 1.0) -> None:
        if process_noise <= 0 or measurement_noise <= 0:
            raise ValueError("Kalman noise variances must be positive")
        self.q = process_noise
        self.r = measurement_noise
        self.level: float | None = None
        self.variance = 0.0

    def observe(self, value: float) -> None:
        if self.level is None:  # the first observation is the whole of our knowledge
            self.level = value
            self.variance = self.r
            return
        prior = self.variance + self.q
        gain = prior / (prior + self.r)
        self.level += gain * (value - self.level)
        self.variance = (1.0 - gain) * prior

    def predict(self) -> float | None:
        # A random walk's best guess for the next interval is its current level.
        return self.level

    @property
    def gain(self) -> float:
        """The gain the next observation will get (for tests and diagnostics)."""
        prior = self.variance + self.q
        return prior / (prior + self.r)


def parse_arima_order(text: str) -> tuple[int, int, int]:
    """`p,d,q` (e.g. "1,1,1") as three small non-negative integers."""
    parts = text.replace(" ", "").split(",")
    try:
        order = tuple(int(x) for x in parts)
    except ValueError:
        order = ()
    if len(order) != 3 or any(x < 0 or x > 5 for x in order) or order[0] + order[2] == 0:
        raise ValueError(f"ARIMA order must be p,d,q with each 0..5 and p + q >= 1, got {text!r}")
    return order  # type: ignore[return-value]


def arima_min_observations(order: tuple[int, int, int]) -> int:
    """Observations before an ARIMA of `order` is fitted (and the least window it may have)."""
    return max(8, 2 * sum(order) + 2)


class ArimaPredictor:
    """ARIMA(p, d, q) refitted by statsmodels on the last `window` observations at each one.

    Until the window holds `min_observations` values, and whenever a fit fails or forecasts
    something not finite, it predicts the last observation (as the constant predictor would). A
    window of identical values is that value (no fit: there is nothing to model). Loads are never
    negative, so neither is a prediction. A fit takes tens of milliseconds: the planner runs
    `observe` off its event loop.
    """

    def __init__(self, order: tuple[int, int, int] = (1, 1, 1), window: int = 60,
                 min_observations: int | None = None) -> None:
        try:
            from statsmodels.tsa.arima.model import ARIMA
        except ImportError as exc:
            raise ValueError("the arima load predictor needs statsmodels: pip install "
                             "'turnout[planner]'") from exc
        self._arima: Any = ARIMA
        self.order = order
        self.min_observations = min_observations or arima_min_observations(order)
        if window < self.min_observations:
            raise ValueError(f"ARIMA window must be at least {self.min_observations} for order "
                             f"{order}, got {window}")
        self.values: deque[float] = deque(maxlen=window)
        self.prediction: float | None = None
        self.failed_fits = 0

    def observe(self, value: float) -> None:
        self.values.append(value)
        self.prediction = max(0.0, self._forecast())

    def predict(self) -> float | None:
        return self.prediction

    def _forecast(self) -> float:
        last = self.values[-1]
        if len(self.values) < self.min_observations or min(self.values) == max(self.values):
            return last
        try:
            with warnings.catch_warnings():  # convergence chatter on short, noisy series
                warnings.simplefilter("ignore")
                fitted = self._arima(list(self.values), order=self.order).fit()
                value = float(fitted.forecast(1)[0])
        except (ValueError, ArithmeticError, IndexError) as exc:  # LinAlgError is a ValueError
            self._failed(str(exc))
            return last
        if not math.isfinite(value):
            self._failed("forecast is not finite")
            return last
        return value

    def _failed(self, why: str) -> None:
        if not self.failed_fits:
            log.warning("ARIMA fit failed; predicting the last value", extra={"fields": {
                "order": ",".join(map(str, self.order)), "error": why}})
        self.failed_fits += 1


class TrackedPredictor:
    """A predictor and the error of its predictions against the observation that follows each.

    `abs_error` is the last |predicted - observed|; `error_ratio` is Σ|predicted - observed| /
    Σ|observed| over the last `window` scored intervals (0 is perfect; robust to zero loads).
    """

    def __init__(self, inner: LoadPredictor, window: int = 12) -> None:
        self.inner = inner
        self.abs_error: float | None = None
        self._errors: deque[tuple[float, float]] = deque(maxlen=window)  # (|error|, |observed|)

    def observe(self, value: float) -> None:
        predicted = self.inner.predict()
        if predicted is not None:
            self.abs_error = abs(predicted - value)
            self._errors.append((self.abs_error, abs(value)))
        self.inner.observe(value)

    def predict(self) -> float | None:
        return self.inner.predict()

    @property
    def error_ratio(self) -> float | None:
        if not self._errors:
            return None
        errors = sum(e for e, _ in self._errors)
        observed = sum(o for _, o in self._errors)
        if observed > 0:
            return errors / observed
        return 0.0 if errors == 0 else math.inf


def make_predictor(name: str, window: int = 6, process_noise: float = 0.5,
                   measurement_noise: float = 1.0, arima_order: str = "1,1,1",
                   arima_window: int = 60) -> LoadPredictor:
    if name == "constant":
        return ConstantPredictor()
    if name == "moving-average":
        return MovingAveragePredictor(window)
    if name == "kalman":
        return KalmanPredictor(process_noise, measurement_noise)
    if name == "arima":
        return ArimaPredictor(parse_arima_order(arima_order), arima_window)
    raise ValueError(f"unknown load predictor {name!r}; expected one of {PREDICTORS}")
