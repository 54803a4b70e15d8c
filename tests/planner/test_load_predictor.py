"""Load predictors on synthetic series: what each one forecasts for the next interval."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from services.planner.load_predictor import (
    ArimaPredictor,
    ConstantPredictor,
    KalmanPredictor,
    LoadPredictor,
    MovingAveragePredictor,
    TrackedPredictor,
    make_predictor,
    parse_arima_order,
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
    arima = make_predictor("arima", arima_order="2,0,1", arima_window=30)
    assert isinstance(arima, ArimaPredictor) and arima.order == (2, 0, 1)
    with pytest.raises(ValueError):
        make_predictor("prophet")


@pytest.mark.parametrize("bad", ["1,1", "1,1,1,1", "a,b,c", "0,1,0", "-1,0,1", "9,0,0"])
def test_arima_order_must_be_three_small_integers(bad: str) -> None:
    with pytest.raises(ValueError, match="ARIMA order"):
        parse_arima_order(bad)
    assert parse_arima_order(" 2, 1 ,0") == (2, 1, 0)


def sinusoid(i: int) -> float:
    """A load between 5 and 45 req/s with a period of 30 intervals (Dynamo's planner test)."""
    return 25.0 + 20.0 * math.sin(2 * math.pi * i / 30)


def mean_error(p: LoadPredictor, series: list[float], skip: int) -> float:
    """Mean |prediction - next value| after the first `skip` values."""
    errors = []
    for i, v in enumerate(series):
        if i >= skip:
            predicted = p.predict()
            assert predicted is not None
            errors.append(abs(predicted - v))
        p.observe(v)
    return sum(errors) / len(errors)


def test_arima_follows_a_sinusoid_where_the_others_lag() -> None:
    rng = random.Random(3)
    series = [sinusoid(i) + rng.gauss(0, 0.3) for i in range(90)]
    arima = mean_error(ArimaPredictor(window=60), series, skip=40)
    constant = mean_error(ConstantPredictor(), series, skip=40)
    kalman = mean_error(KalmanPredictor(), series, skip=40)
    assert arima < 0.5 * min(constant, kalman), (arima, constant, kalman)


def test_arima_before_its_window_fills_and_on_flat_or_falling_series() -> None:
    p = ArimaPredictor(window=20)
    assert p.predict() is None
    for v in (3.0, 4.0, 6.0):
        p.observe(v)
        assert p.predict() == v  # too few observations to fit: the last one
    flat = ArimaPredictor(window=20)
    for _ in range(30):
        flat.observe(7.0)
    assert flat.predict() == 7.0 and flat.failed_fits == 0
    falling = ArimaPredictor(order=(1, 2, 0), window=20)
    for i in range(10):  # 46, 41, ..., 1 (with a little noise): the next would be below zero
        falling.observe(46.0 - 5 * i + (0.2 if i % 2 else -0.2))
    assert falling.predict() == 0.0  # a trend towards negative load stops at zero
    with pytest.raises(ValueError, match="window"):
        ArimaPredictor(order=(2, 1, 2), window=5)


def test_tracked_predictor_scores_each_prediction_against_the_next_value() -> None:
    p = TrackedPredictor(ConstantPredictor(), window=2)
    assert p.abs_error is None and p.error_ratio is None
    p.observe(10.0)  # nothing predicted yet: nothing scored
    assert p.error_ratio is None and p.predict() == 10.0
    p.observe(14.0)
    assert p.abs_error == 4.0 and p.error_ratio == pytest.approx(4 / 14)
    p.observe(14.0)
    assert p.abs_error == 0.0 and p.error_ratio == pytest.approx(4 / 28)
    p.observe(7.0)  # the window keeps the last two scores: 0 and 7
    assert p.error_ratio == pytest.approx(7 / 21)
    idle = TrackedPredictor(ConstantPredictor())
    idle.observe(0.0)
    idle.observe(0.0)
    assert idle.error_ratio == 0.0
