"""MalformedFrames: every frame counted (and reported to the caller's metric), one warning per
source."""

from __future__ import annotations

import logging

import pytest

from common.malformed import MalformedFrames


def test_counts_every_frame_and_warns_once_per_source(caplog: pytest.LogCaptureFixture) -> None:
    metric: list[int] = []
    frames = MalformedFrames("request frame", lambda: metric.append(1),
                             logging.getLogger("test.malformed"))
    with caplog.at_level(logging.WARNING, logger="test.malformed"):
        frames.drop("2 frames", "r1")
        frames.drop("bad msgpack", "r1")
        frames.drop("bad msgpack", "r2")
        frames.drop("no source")
        frames.drop("no source again")
    assert frames.total == 5 and len(metric) == 5
    warned = [(r.getMessage(), r.fields) for r in caplog.records]  # type: ignore[attr-defined]
    assert warned == [("dropped malformed request frame", {"source": "r1", "why": "2 frames"}),
                      ("dropped malformed request frame", {"source": "r2", "why": "bad msgpack"}),
                      ("dropped malformed request frame", {"why": "no source"})]


def test_a_forgotten_source_warns_again(caplog: pytest.LogCaptureFixture) -> None:
    frames = MalformedFrames("frame from router", logger=logging.getLogger("test.malformed"))
    with caplog.at_level(logging.WARNING, logger="test.malformed"):
        frames.drop("x", "r1")
        frames.drop("x", "r1")
        frames.forget("r1")
        frames.drop("x", "r1")
    assert frames.total == 3
    assert len(caplog.records) == 2
