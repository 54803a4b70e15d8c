"""The grace after a process's own pause: as long again as the pause, capped, never shortened."""

from common.pause_grace import PauseGrace


def test_silence_is_judged_again_once_as_long_again_as_the_pause_has_passed() -> None:
    grace = PauseGrace(cap_s=10.0)
    assert grace.judging(1.0)
    grace.paused(now=100.0, paused_s=6.0)
    assert not grace.judging(105.9)
    assert grace.judging(106.1)


def test_a_long_pause_is_forgiven_for_the_cap_only() -> None:
    grace = PauseGrace(cap_s=3.0)
    grace.paused(now=100.0, paused_s=60.0)
    assert not grace.judging(102.9)
    assert grace.judging(103.1)


def test_a_short_pause_after_a_long_one_does_not_shorten_its_grace() -> None:
    grace = PauseGrace(cap_s=10.0)
    grace.paused(now=100.0, paused_s=6.0)
    grace.paused(now=101.0, paused_s=0.3)
    assert not grace.judging(105.9)
    assert grace.judging(106.1)
