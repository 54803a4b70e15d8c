"""The phi-accrual failure detector on a fake clock: how soon a silent worker is suspected and
convicted, and which silences a live worker may keep without either."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from common.failure_detector import (
    DetectorSettings,
    HeartbeatHistory,
    PhiAccrualDetector,
    Verdict,
    phi_z,
)

T0 = 5000.0  # an arbitrary monotonic-clock origin
CHECK_S = 0.05  # the router looks every half heartbeat period


def default() -> DetectorSettings:
    return DetectorSettings.for_heartbeats(0.1, 3)


def feed(det: PhiAccrualDetector, start: float, intervals: list[float],
         lags: list[float] | None = None, check: bool = False) -> float:
    """Heartbeats after each interval from `start`; with `check`, assert the worker was never
    suspected while waiting for any of them. Returns the last arrival."""
    now = start
    for i, interval in enumerate(intervals):
        if check:
            assert det.verdict(now + interval - 1e-9) is Verdict.ALIVE, (i, interval)
        now += interval
        det.heartbeat(now, lags[i] if lags else 0.0)
    return now


def regular(n: int, seed: int = 1, period: float = 0.1, jitter: float = 0.002) -> list[float]:
    rng = random.Random(seed)
    return [period + rng.uniform(-jitter, jitter) for _ in range(n)]


def first_seen(det: PhiAccrualDetector, level: Verdict, since: float, step: float = CHECK_S,
               limit: float = 30.0) -> float:
    """Silence (from `since`) at which a check every `step` first finds `level` or worse."""
    t = since
    while t - since < limit:
        t += step
        if det.verdict(t) >= level:
            return t - since
    raise AssertionError(f"no {level.name} within {limit} s")


def test_a_frozen_worker_on_a_quiet_host_is_caught_within_half_a_second() -> None:
    rng = random.Random(7)
    for trial in range(50):
        det = PhiAccrualDetector(default(), T0)
        last = feed(det, T0, regular(100, seed=trial))
        # SIGSTOP somewhere before the next heartbeat was due; the router checks on its own
        # phase.
        stopped = last + rng.uniform(0, 0.1)
        phase = rng.uniform(0, CHECK_S)
        suspected = first_seen(det, Verdict.SUSPECT, stopped - phase)
        assert suspected - phase <= 0.5
        # Never before the floor (3 missed periods), measured from the last heartbeat.
        assert det.suspect_at - last >= 0.3
        assert det.convict_at - last <= 1.0
        assert det.convict_at - det.suspect_at >= det.settings.confirm_s


def test_verdict_levels_in_order_and_phi_grows_with_the_silence() -> None:
    det = PhiAccrualDetector(default(), T0)
    last = feed(det, T0, regular(60))
    assert det.verdict(last + 0.1) is Verdict.ALIVE and not det.suspicious(last + 0.1)
    assert det.verdict(det.suspect_at) is Verdict.ALIVE  # strictly past the threshold
    after = det.suspect_at + 1e-6
    assert det.verdict(after) is Verdict.SUSPECT and det.suspicious(after)
    assert not det.convicted(det.convict_at)
    after = det.convict_at + 1e-6
    assert det.verdict(after) is Verdict.CONVICT and det.convicted(after)
    phis = [det.phi(last + k * 0.02) for k in range(80)]
    assert all(b >= a for a, b in itertools.pairwise(phis))
    assert phis[0] < 0.1 and det.phi(last + 5.0) == math.inf
    # Unclamped by floor or ceiling, the suspicion sits where phi crosses its threshold.
    assert det.phi(det.suspect_at) == pytest.approx(det.settings.suspect_phi, abs=1e-6)
    # A heartbeat clears every suspicion.
    back = det.convict_at + 0.1
    det.heartbeat(back)
    assert det.verdict(back + 0.05) is Verdict.ALIVE


def test_the_floor_holds_off_verdicts_however_regular_the_heartbeats() -> None:
    det = PhiAccrualDetector(DetectorSettings.for_heartbeats(0.1, 3, min_std_s=0.001), T0)
    last = feed(det, T0, [0.1] * 50)
    assert det.verdict(last + 0.3) is Verdict.ALIVE
    assert det.verdict(last + 0.3001) is Verdict.SUSPECT
    assert det.convict_at - det.suspect_at == pytest.approx(det.settings.confirm_s)


def test_jittery_heartbeats_are_learned_and_their_pauses_raise_no_verdict() -> None:
    # A busy host: most heartbeats on time, one in eight 200-450 ms late, and bursts of
    # back-to-back arrivals where the router itself was starved and read a queue at once.
    rng = random.Random(3)
    intervals: list[float] = []
    while len(intervals) < 600:
        r = rng.random()
        if r < 0.125:
            intervals.append(rng.uniform(0.2, 0.45))
        elif r < 0.16:
            intervals += [0.4, 0.001, 0.001, 0.001]
        else:
            intervals.append(rng.uniform(0.08, 0.13))
    det = PhiAccrualDetector(default(), T0)
    warm = 100
    last = feed(det, T0, intervals[:warm])
    last = feed(det, last, intervals[warm:], check=True)
    # The same 450 ms silence on a quiet history would be suspected.
    quiet = PhiAccrualDetector(default(), T0)
    quiet_last = feed(quiet, T0, regular(100))
    assert quiet.suspicious(quiet_last + 0.45)
    assert not det.suspicious(last + 0.45)
    # Still, a worker of that busy host that really stops is caught, in about a second.
    assert 0.45 < det.suspect_at - last < 1.5
    assert det.convict_at - last < 2.0


def test_a_self_reported_lag_widens_the_allowance_then_fades() -> None:
    settings = default()
    plain = PhiAccrualDetector(settings, T0)
    starved = PhiAccrualDetector(settings, T0)
    history = regular(50)
    feed(plain, T0, history)
    last = feed(starved, T0, history, lags=[0.0] * 49 + [0.4])
    # The worker said its loop ran 400 ms late: the next silence gets that much more.
    assert starved.suspect_at - plain.suspect_at == pytest.approx(0.4, abs=0.01)
    assert plain.suspicious(last + 0.6) and not starved.suspicious(last + 0.6)
    assert starved.lag_allowance_s(last) == pytest.approx(0.4)
    # A smaller report does not shrink the peak; time does (half-life 10 s).
    last = feed(starved, last, [0.1], lags=[0.05])
    assert starved.lag_allowance_s(last) == pytest.approx(0.4 * 0.5 ** (0.1 / 10))
    feed(plain, plain.last_heartbeat, [0.1])
    last = feed(starved, last, [0.1] * 600)  # a minute of regular heartbeats
    plain_last = feed(plain, plain.last_heartbeat, [0.1] * 600)
    assert starved.lag_allowance_s(last) < 0.4 / 32
    assert starved.suspect_at - last == pytest.approx(plain.suspect_at - plain_last, abs=0.02)


def test_a_worker_starved_once_is_not_suspected_for_a_second_starvation() -> None:
    det = PhiAccrualDetector(default(), T0)
    last = feed(det, T0, regular(50))
    # 350 ms without the CPU: the heartbeat comes 450 ms after the last one, and says why.
    # That first one is suspected (on a quiet history it looks like a freeze)...
    assert det.suspicious(last + 0.45)
    last = feed(det, last, [0.45], lags=[0.35])
    last = feed(det, last, regular(20, seed=2))
    # ... the next one, as long, is not.
    assert not det.suspicious(last + 0.46)


def test_a_recovery_after_conviction_is_not_learned_as_jitter() -> None:
    det = PhiAccrualDetector(default(), T0)
    last = feed(det, T0, regular(50))
    before = det.suspect_at - last
    # Frozen for 5 s (SIGSTOP / SIGCONT): long past conviction. Its heartbeat reports a 5 s lag.
    last = feed(det, last, [5.0], lags=[5.0])
    last = feed(det, last, regular(10, seed=4))
    assert det.suspect_at - last == pytest.approx(before, abs=0.005)
    assert det.lag_allowance_s(last) == 0.0


def test_a_worker_that_never_heartbeats_is_judged_from_when_it_was_seen() -> None:
    det = PhiAccrualDetector(default(), T0)
    assert det.verdict(T0 + 0.2) is Verdict.ALIVE
    assert det.suspicious(T0 + 0.5)
    # The wait for the first heartbeat (connecting) is not an interval of the history.
    det.heartbeat(T0 + 0.25)
    assert len(det.history) == 0
    det.heartbeat(T0 + 0.35)
    assert len(det.history) == 1 and det.history.mean == pytest.approx(0.1)


def test_the_window_is_bounded_and_forgets_an_old_regime() -> None:
    det = PhiAccrualDetector(default(), T0)
    last = feed(det, T0, [0.3] * 300)  # slow and steady heartbeats
    assert det.suspect_at - last > 0.55
    last = feed(det, last, regular(10_000, seed=5))
    assert len(det.history) == det.history.capacity == 200
    assert det.history.mean == pytest.approx(0.1, abs=0.001)
    assert det.suspect_at - last < 0.4


def test_the_ceiling_convicts_whatever_the_history() -> None:
    settings = DetectorSettings.for_heartbeats(0.1, 3, ceiling_s=2.0)
    det = PhiAccrualDetector(settings, T0)
    rng = random.Random(6)
    last = feed(det, T0, [rng.uniform(0.05, 1.5) for _ in range(200)])
    assert det.suspect_at - last <= 2.0
    assert det.convict_at - last == pytest.approx(2.0)
    assert det.convicted(last + 2.001)


def test_the_history_keeps_exact_mean_and_std() -> None:
    rng = random.Random(8)
    history = HeartbeatHistory(50)
    values = [rng.uniform(0.05, 0.5) for _ in range(1234)]
    for i, v in enumerate(values):
        history.add(v)
        if i % 97 == 0 or i == len(values) - 1:
            window = values[max(0, i - 49):i + 1]
            assert len(history) == len(window)
            assert history.mean == pytest.approx(statistics.fmean(window), rel=1e-9)
            if len(window) > 1:
                assert history.std == pytest.approx(statistics.pstdev(window), rel=1e-6)


def test_odd_reports_and_clocks_do_no_harm() -> None:
    det = PhiAccrualDetector(default(), T0)
    last = feed(det, T0, regular(30))
    det.heartbeat(last + 0.1, math.nan)
    det.heartbeat(last + 0.2, -3.0)
    assert det.lag_allowance_s(last + 0.2) == 0.0
    det.heartbeat(last + 0.3, math.inf)  # capped by the ceiling: never beyond certainty
    assert det.convict_at - (last + 0.3) <= det.settings.ceiling_s
    det.heartbeat(last, 0.0)  # earlier than the last arrival: ignored
    assert det.last_heartbeat == last + 0.3


def test_phi_z_matches_the_normal_tail() -> None:
    assert phi_z(1.0) == pytest.approx(1.2816, abs=1e-4)
    assert phi_z(8.0) == pytest.approx(5.612, abs=1e-3)


@pytest.mark.parametrize("bad", [
    {"expected_interval_s": 0.0}, {"floor_s": -1.0}, {"min_std_s": 0.0},
    {"lag_half_life_s": math.inf}, {"confirm_s": -0.1}, {"acceptable_pause_s": math.nan},
    {"ceiling_s": 0.1}, {"suspect_phi": 0.0}, {"suspect_phi": 9.0, "convict_phi": 8.0},
    {"convict_phi": 20.0}, {"window": 1},
])
def test_settings_refuse_what_cannot_work(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="failure detector"):
        DetectorSettings(**bad)  # type: ignore[arg-type]


def test_settings_from_the_heartbeat_flags() -> None:
    s = DetectorSettings.for_heartbeats(0.1, 3)
    assert (s.expected_interval_s, s.floor_s, s.min_std_s) == (0.1, pytest.approx(0.3), 0.05)
    slow = DetectorSettings.for_heartbeats(2.0, 6)
    assert slow.floor_s == 12.0 and slow.ceiling_s == 12.0  # the ceiling never undercuts it
    with pytest.raises(ValueError, match="missed heartbeats"):
        DetectorSettings.for_heartbeats(0.1, 0)
    with pytest.raises(ValueError, match="interval"):
        DetectorSettings.for_heartbeats(0.0, 3)
