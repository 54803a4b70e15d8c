"""Load predictors on synthetic series: what each one forecasts for the next interval."""

from __future__ import annotations

import itertools
import random

import pytest

from services.planner.load_predictor import (
    ConstantPredictor,
    KalmanPredictor,
    MovingAveragePredictor,
    make_predictor,
)


def test_constant_predicts_the_last_value() -> None:
    p = ConstantPredictor()
    assert p.predict() is None
    for v in (3.0, 7.0, 5.5):
        p.observe(v)
        assert p.predict() == v


def test_moving_average_averages_its_window() -> None:
    p = MovingAveragePredictor(window=3)
    assert p.predict() is None
    for v in (1.0, 2.0, 3.0, 10.0):
        p.observe(v)
    assert p.predict() == pytest.approx((2.0 + 3.0 + 10.0) / 3)
    with pytest.raises(ValueError):
        MovingAveragePredictor(window=0)


def test_kalman_tracks_a_step_change() -> None:
    rng = random.Random(7)
    p = KalmanPredictor()
    for _ in range(30):
        p.observe(10.0 + rng.gauss(0, 0.5))
    before = p.predict()
    assert before is not None and abs(before - 10.0) < 1.0
    predictions: list[float] = []
    for _ in range(15):
        p.observe(50.0 + rng.gauss(0, 0.5))
        x = p.predict()
        assert x is not None
        predictions.append(x)
    assert predictions[0] < 40.0, "one interval is not a trend"
    assert all(abs(x - 50.0) < 3.0 for x in predictions[6:]), predictions
    rising = predictions[:5]
    assert all(x < y for x, y in itertools.pairwise(rising)), f"rises towards the step: {rising}"


def test_kalman_damps_a_single_spike() -> None:
    p = KalmanPredictor()
    for _ in range(20):
        p.observe(10.0)
    p.observe(100.0)
    spiked = p.predict()
    assert spiked is not None and 10.0 < spiked < 70.0
    for _ in range(10):
        p.observe(10.0)
    after = p.predict()
    assert after is not None and abs(after - 10.0) < 1.0


def test_kalman_gain_depends_only_on_the_noise_ratio() -> None:
    a, b = KalmanPredictor(0.5, 1.0), KalmanPredictor(50.0, 100.0)
    series = [3.0, 4.0, 9.0, 2.0, 8.0, 8.0, 1.0]
    for v in series:
        a.observe(v)
        b.observe(v)
        assert a.predict() == pytest.approx(b.predict())
    assert a.gain == pytest.approx(b.gain)


def test_make_predictor_names() -> None:
    assert isinstance(make_predictor("constant"), ConstantPredictor)
    assert isinstance(make_predictor("moving-average", window=4), MovingAveragePredictor)
    assert isinstance(make_predictor("kalman"), KalmanPredictor)
    with pytest.raises(ValueError):
        make_predictor("arima")
