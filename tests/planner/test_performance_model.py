"""The step-time fit recovers known coefficients from synthetic forward-pass records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from common.messages import ForwardPass
from services.planner.performance_model import PerformanceModel, least_squares
from services.worker.engines.mocker import timing

# The mocker's own timing model: prefill a·t² + b·t + c, decode e + f·n + g·u + h·u² (f = 0).
MOCKER_PREFILL = (4.209989e-7, 0.01518344, 16.50142)
MOCKER_DECODE = (5.74, 0.0, 54.01, -25.74)
TOTAL = 16384


def mocker_records(n: int, seed: int = 1) -> list[ForwardPass]:
    """Pure prefill, pure decode and mixed steps, timed exactly as the mocker times them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        prefill = rng.randint(16, 8192) if kind != 1 else 0
        decode = rng.randint(1, 256) if kind != 0 else 0
        used = rng.randint(0, TOTAL)
        ms = timing.step_ms(prefill, decode, used / TOTAL)
        out.append(ForwardPass(i, decode + (1 if prefill else 0), prefill, decode, ms, used))
    return out


def test_fit_recovers_the_mocker_timing_model() -> None:
    model = PerformanceModel()
    for record in mocker_records(600):
        model.observe(record, TOTAL)
    report = model.fit()
    assert report.prefill_source == "fit" and report.decode_source == "fit"
    assert model.prefill is not None and model.decode is not None
    assert model.prefill == pytest.approx(MOCKER_PREFILL, rel=1e-6)
    e, f, g, h = model.decode
    assert (e, g, h) == pytest.approx((5.74, 54.01, -25.74), rel=1e-6)
    assert abs(f) < 1e-9
    assert report.r2 is not None and report.r2 > 0.999999
    assert model.prefill_ms(4096) == pytest.approx(timing.prefill_ms(4096), rel=1e-6)
    assert model.decode_ms(64, 0.5) == pytest.approx(timing.decode_ms(0.5), rel=1e-6)


def test_fit_recovers_a_batch_dependent_decode_cost() -> None:
    """A real engine's decode step grows with the batch too; the fit must see that."""
    a, b, c = 1e-6, 0.02, 10.0
    e, f, g, h = 4.0, 0.3, 20.0, 5.0
    rng = random.Random(3)
    model = PerformanceModel(min_samples=8)
    for i in range(400):
        t = rng.randint(1, 4096) if i % 2 else 0
        n = rng.randint(1, 128) if i % 4 != 1 else 0
        if not t and not n:
            n = 1
        u = rng.random()
        ms = (a * t * t + b * t + c if t else 0.0) + (e + f * n + g * u + h * u * u if n else 0)
        model.observe(ForwardPass(i, n, t, n, ms, round(u * 1000)), 1000)
    model.fit()
    assert model.prefill == pytest.approx((a, b, c), rel=1e-3)
    assert model.decode == pytest.approx((e, f, g, h), rel=1e-3)


def test_fit_tolerates_noise() -> None:
    rng = random.Random(5)
    model = PerformanceModel()
    for r in mocker_records(3000, seed=9):
        noisy = ForwardPass(r.step, r.batch_size, r.prefill_tokens, r.decode_tokens,
                            r.duration_ms * (1 + rng.gauss(0, 0.02)), r.kv_used_blocks)
        model.observe(noisy, TOTAL)
    report = model.fit()
    assert report.r2 is not None and report.r2 > 0.99
    for t in (256, 2048, 8192):
        assert model.prefill_ms(t) == pytest.approx(timing.prefill_ms(t), rel=0.05)
    for u in (0.1, 0.5, 0.9):
        assert model.decode_ms(32, u) == pytest.approx(timing.decode_ms(u), rel=0.05)


def test_thin_data_is_not_trusted_until_identified() -> None:
    model = PerformanceModel(min_samples=16)
    # Many steps, but all at one operating point: nothing to fit a curve to.
    for i in range(50):
        model.observe(ForwardPass(i, 1, 512, 0, timing.prefill_ms(512), 8), TOTAL)
    report = model.fit()
    assert report.prefill_source == "none" and model.prefill is None and not model.ready
    with pytest.raises(LookupError):
        model.prefill_ms(100)


def test_empty_steps_are_ignored() -> None:
    model = PerformanceModel()
    model.observe(ForwardPass(1, 0, 0, 0, 0.0, 0), TOTAL)
    model.observe(ForwardPass(2, 1, 10, 0, 0.0, 0), TOTAL)
    assert len(model.samples) == 0


def test_profile_seeds_then_observations_take_over(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"prefill_ms": [0.0, 0.1, 1.0], "decode_ms": [2.0, 0.0, 0.0, 0.0],
                                "kv_total_blocks": 1024, "block_size": 16}))
    model = PerformanceModel()
    model.load_profile(path)
    assert model.ready and model.kv_total_blocks == 1024 and model.block_size == 16
    assert model.prefill_ms(100) == pytest.approx(11.0)
    assert model.report.prefill_source == "profile"
    for record in mocker_records(300):
        model.observe(record, TOTAL)
    report = model.fit()
    assert report.prefill_source == "fit" and report.decode_source == "fit"
    assert model.prefill == pytest.approx(MOCKER_PREFILL, rel=1e-6)


def test_profile_samples_stay_in_every_fit(tmp_path: Path) -> None:
    seed = [{"prefill_tokens": r.prefill_tokens, "decode_tokens": r.decode_tokens,
             "kv_usage": r.kv_used_blocks / TOTAL, "duration_ms": r.duration_ms}
            for r in mocker_records(90)]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"forward_passes": seed}))
    model = PerformanceModel(window=4)
    model.load_profile(path)
    assert model.report.prefill_source == "fit"
    for record in mocker_records(20, seed=4):  # the window keeps 4; the seed stays
        model.observe(record, TOTAL)
    model.fit()
    assert len(model.samples) == 4
    assert model.prefill == pytest.approx(MOCKER_PREFILL, rel=1e-6)


@pytest.mark.parametrize("body", [
    "[1, 2]", '{"prefill_ms": [1, 2]}', '{"decode_ms": "fast"}', '{"block_size": -1}',
    '{"forward_passes": [{"prefill_tokens": 1}]}', "not json"])
def test_malformed_profiles_are_refused(tmp_path: Path, body: str) -> None:
    path = tmp_path / "profile.json"
    path.write_text(body)
    with pytest.raises(ValueError, match="profile"):
        PerformanceModel().load_profile(path)


def test_least_squares_handles_an_unused_column() -> None:
    rows = [[x, 0.0, 1.0] for x in range(10)]
    coef = least_squares(rows, [2.0 * x + 3.0 for x in range(10)])
    assert coef == pytest.approx([2.0, 0.0, 3.0])
