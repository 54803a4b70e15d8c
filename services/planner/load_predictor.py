"""Predictors of the next adjustment interval's value of one load series.

The planner keeps one predictor per series (request rate, mean input length, mean output
length). Each sees one observation per interval (`observe`) and answers `predict()`, the value it
expects next interval, or None before its first observation. An interval with nothing to observe
(no request finished, so no mean length) is simply not observed: the prediction carries over.

Owns the arithmetic only. Does not own where observations come from or what a prediction is used
for (`main`, `replica_planner`).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

PREDICTORS = ["constant", "moving-average", "kalman"]


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


def make_predictor(name: str, window: int = 6, process_noise: float = 0.5,
                   measurement_noise: float = 1.0) -> LoadPredictor:
    if name == "constant":
        return ConstantPredictor()
    if name == "moving-average":
        return MovingAveragePredictor(window)
    if name == "kalman":
        return KalmanPredictor(process_noise, measurement_noise)
    raise ValueError(f"unknown load predictor {name!r}; expected one of {PREDICTORS}")
