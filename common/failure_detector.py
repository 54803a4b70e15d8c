"""Phi-accrual failure detection: is a peer's silence still what a live peer does?

Routers judge their workers and frontends with it, frontends their routers.

The idea of Hayashibara et al. ("The phi accrual failure detector", 2004), as Cassandra and
Akka use it: keep a bounded window of a worker's heartbeat inter-arrival times, model the next
interval as normal(mean, std), and state the current silence as

    phi(now) = -log10(P(interval > now - last heartbeat))

so phi 1 means a live worker would still be silent one time in ten, phi 8 one time in 10^8. A
fixed "N missed periods" rule convicts a worker that merely lost the CPU for N periods on a busy
host; phi widens by itself where heartbeats have been irregular and stays tight where they have
been regular, so a frozen worker on a quiet host is still caught fast.

Two more sources of allowance: `acceptable_pause_s` (a fixed margin), and the worker's own word.
A heartbeat carries how late the worker's event loop ran (`Heartbeat.loop_lag_s`); a worker that
says it was 400 ms late was starved, not hung, so its recent peak lag (decaying with
`lag_half_life_s`) is added to the expected interval.

Two verdict levels, so that a caller can act on a cheap suspicion and keep expensive moves
(requests whose prefill is long) for a confirmed one:

- SUSPECT: phi >= `suspect_phi`;
- CONVICT: phi >= `convict_phi` and at least `confirm_s` past suspicion.

Both are held off until `floor_s` of silence (the router's missed heartbeats x period) and are
certain at `ceiling_s`, however irregular the worker has been.

Owns the statistics and the verdicts, one worker per detector, on a clock the caller passes in
(every method takes `now`). Does not own what a verdict does: that is the router's.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
from statistics import NormalDist

_STANDARD_NORMAL = NormalDist()
_DEFAULT_CEILING_S = 10.0


class Verdict(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    CONVICT = 2


@dataclasses.dataclass(frozen=True, slots=True)
class DetectorSettings:
    expected_interval_s: float = 0.1  # the heartbeat period: the mean before any is seen
    floor_s: float = 0.3  # no verdict on a silence up to this long
    ceiling_s: float = _DEFAULT_CEILING_S  # this long a silence convicts, whatever the history
    suspect_phi: float = 8.0
    convict_phi: float = 12.0
    confirm_s: float = 0.5  # conviction comes at least this long after suspicion
    # Regular heartbeats measure a std of a millisecond or two; a verdict needs more margin
    # than that (timer and scheduling noise the window has not seen yet).
    min_std_s: float = 0.05
    acceptable_pause_s: float = 0.0
    window: int = 200  # intervals kept (20 s of 100 ms heartbeats)
    lag_half_life_s: float = 10.0  # how fast a self-reported lag stops widening the allowance

    def __post_init__(self) -> None:
        for name in ("expected_interval_s", "floor_s", "min_std_s", "lag_half_life_s"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ValueError(f"failure detector: {name} must be a positive number, got "
                                 f"{value}")
        for name in ("confirm_s", "acceptable_pause_s"):
            value = getattr(self, name)
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"failure detector: {name} must be >= 0, got {value}")
        if not self.ceiling_s >= self.floor_s or math.isinf(self.ceiling_s):
            raise ValueError(f"failure detector: ceiling_s ({self.ceiling_s}) must be finite "
                             f"and at least floor_s ({self.floor_s})")
        # Past ~15 a phi threshold is a float rounding question, not a probability.
        if not 0 < self.suspect_phi <= self.convict_phi <= 15:
            raise ValueError(f"failure detector: need 0 < suspect_phi ({self.suspect_phi}) <= "
                             f"convict_phi ({self.convict_phi}) <= 15")
        if self.window < 2:
            raise ValueError(f"failure detector: window must be at least 2, got {self.window}")

    @classmethod
    def for_heartbeats(cls, interval_s: float, missed: int, **overrides: float
                       ) -> DetectorSettings:
        """Settings for heartbeats every `interval_s`, never judging a worker before `missed`
        periods of silence (the old fixed rule becomes the floor); `min_std_s` scales with the
        period (half of it)."""
        if not interval_s > 0:
            raise ValueError(f"failure detector: heartbeat interval must be positive, got "
                             f"{interval_s}")
        if missed < 1:
            raise ValueError(f"failure detector: missed heartbeats must be at least 1, got "
                             f"{missed}")
        values: dict[str, float] = {"expected_interval_s": interval_s,
                                    "floor_s": interval_s * missed, "min_std_s": interval_s / 2}
        values.update(overrides)
        values["ceiling_s"] = max(values.get("ceiling_s", _DEFAULT_CEILING_S), values["floor_s"])
        return cls(**values)  # type: ignore[arg-type]


def phi_z(phi: float) -> float:
    """How many standard deviations past the mean a normal variable is exceeded with
    probability 10^-phi."""
    return -_STANDARD_NORMAL.inv_cdf(10.0 ** -phi)


class HeartbeatHistory:
    """The last `size` inter-arrival intervals, with their mean and (population) std kept as
    running sums: O(1) per heartbeat, O(size) memory."""

    __slots__ = ("_intervals", "_since_exact", "_sum", "_sum_sq")

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"heartbeat history: size must be at least 2, got {size}")
        self._intervals: collections.deque[float] = collections.deque(maxlen=size)
        self._sum = 0.0
        self._sum_sq = 0.0
        self._since_exact = 0

    def add(self, interval: float) -> None:
        intervals = self._intervals
        if len(intervals) == intervals.maxlen:
            old = intervals[0]
            self._sum -= old
            self._sum_sq -= old * old
        intervals.append(interval)
        self._sum += interval
        self._sum_sq += interval * interval
        self._since_exact += 1
        if self._since_exact >= len(intervals):
            # Once a window: recompute, so rounding in the running sums never accumulates.
            self._since_exact = 0
            self._sum = math.fsum(intervals)
            self._sum_sq = math.fsum(x * x for x in intervals)

    def __len__(self) -> int:
        return len(self._intervals)

    @property
    def capacity(self) -> int:
        maxlen = self._intervals.maxlen
        assert maxlen is not None
        return maxlen

    @property
    def mean(self) -> float:
        n = len(self._intervals)
        return self._sum / n if n else 0.0

    @property
    def std(self) -> float:
        n = len(self._intervals)
        if n < 2:
            return 0.0
        mean = self._sum / n
        return math.sqrt(max(0.0, self._sum_sq / n - mean * mean))


class PhiAccrualDetector:
    """One worker's heartbeats and the verdict on its silence. `now` is the time it was first
    seen; silence counts from there until its first heartbeat."""

    __slots__ = ("_beating", "_convict_after", "_history", "_lag_at", "_lag_peak", "_last", "_mu",
                 "_sigma", "_suspect_after", "_z_convict", "_z_suspect", "settings")

    def __init__(self, settings: DetectorSettings, now: float) -> None:
        self.settings = settings
        self._history = HeartbeatHistory(settings.window)
        self._z_suspect = phi_z(settings.suspect_phi)
        self._z_convict = phi_z(settings.convict_phi)
        self._last = now
        self._beating = False  # a heartbeat seen yet
        self._lag_peak = 0.0
        self._lag_at = now
        self._mu = self._sigma = self._suspect_after = self._convict_after = 0.0
        self._refresh()

    # -- input ---------------------------------------------------------------------------

    def heartbeat(self, now: float, reported_lag_s: float = 0.0) -> None:
        """A heartbeat arrived at `now`; the worker says its loop ran `reported_lag_s` late."""
        interval = now - self._last
        if interval < 0:
            return  # the caller's clock went backwards: keep the later arrival
        self._last = now
        s = self.settings
        first, self._beating = not self._beating, True
        # The wait for the first heartbeat is not an interval. A silence that already
        # convicted is a failure and a recovery, not jitter: learning it would blunt the
        # detection of the next real failure.
        if not first and interval < self._convict_after:
            self._history.add(interval)
            lag = min(reported_lag_s, s.ceiling_s) if reported_lag_s > 0 else 0.0  # NaN: 0
            if lag >= self.lag_allowance_s(now):
                self._lag_peak, self._lag_at = lag, now
        self._refresh()

    # -- verdicts ------------------------------------------------------------------------

    def phi(self, now: float) -> float:
        """-log10 of the chance that a live worker would still be silent at `now` (inf once the
        chance is below what a float holds)."""
        silence = now - self._last
        p = 0.5 * math.erfc((silence - self._mu) / (self._sigma * math.sqrt(2.0)))
        return -math.log10(p) if p > 0 else math.inf

    def verdict(self, now: float) -> Verdict:
        """The level reached by the silence at `now` (strictly past each threshold)."""
        if now > self.convict_at:
            return Verdict.CONVICT
        if now > self.suspect_at:
            return Verdict.SUSPECT
        return Verdict.ALIVE

    def suspicious(self, now: float) -> bool:
        return self.verdict(now) >= Verdict.SUSPECT

    def convicted(self, now: float) -> bool:
        return self.verdict(now) is Verdict.CONVICT

    @property
    def last_heartbeat(self) -> float:
        return self._last

    @property
    def suspect_at(self) -> float:
        """Past this time the current silence, if it lasts, is a suspicion."""
        return self._last + self._suspect_after

    @property
    def convict_at(self) -> float:
        """Past this time the current silence, if it lasts, is a conviction."""
        return self._last + self._convict_after

    # -- statistics, for logs and tests --------------------------------------------------

    @property
    def history(self) -> HeartbeatHistory:
        return self._history

    @property
    def expected_interval_s(self) -> float:
        """The modelled interval's mean, allowances included."""
        return self._mu

    @property
    def std_s(self) -> float:
        """The modelled interval's std (at least `min_std_s`)."""
        return self._sigma

    def lag_allowance_s(self, now: float) -> float:
        """The worker's recent peak self-reported lag, halved every `lag_half_life_s`."""
        if self._lag_peak == 0.0:
            return 0.0
        age = max(0.0, now - self._lag_at)
        return self._lag_peak * 0.5 ** (age / self.settings.lag_half_life_s)

    def _refresh(self) -> None:
        """Thresholds for the silence that starts at the last heartbeat."""
        s = self.settings
        history = self._history
        mean = history.mean if len(history) else s.expected_interval_s
        self._mu = mean + s.acceptable_pause_s + self.lag_allowance_s(self._last)
        self._sigma = max(history.std, s.min_std_s)
        suspect = min(max(self._mu + self._sigma * self._z_suspect, s.floor_s), s.ceiling_s)
        convict = max(self._mu + self._sigma * self._z_convict, suspect + s.confirm_s)
        self._suspect_after = suspect
        self._convict_after = min(convict, s.ceiling_s)
