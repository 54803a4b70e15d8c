"""The shared Prometheus text parser, on expositions written by prometheus_client itself."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common import prometheus_text


def exposition() -> str:
    r = CollectorRegistry()
    requests = Counter("demo_requests", "Requests", ["outcome", "model"], registry=r)
    requests.labels("ok", "a").inc(3)
    requests.labels("ok", "b").inc(2)
    requests.labels("error", "a").inc()
    Gauge("demo_running", "Running", registry=r).set(4)
    Gauge("demo_quoted", "Label escaping", ["path"], registry=r).labels('a "b"\\c\n').set(1)
    latency = Histogram("demo_latency_seconds", "Latency", buckets=(0.1, 1.0), registry=r)
    for v in (0.05, 0.5, 0.7, 3.0):
        latency.observe(v)
    Counter("demo_unused", "Declared, never incremented", ["x"], registry=r)
    return generate_latest(r).decode()


def test_values_sum_over_matching_label_sets() -> None:
    m = prometheus_text.parse(exposition())
    assert m.value("demo_requests_total") == 6
    assert m.value("demo_requests_total", outcome="ok") == 5
    assert m.value("demo_requests_total", outcome="ok", model="b") == 2
    assert m.value("demo_requests_total", outcome="timeout") == 0
    assert m.value("demo_requests") == 0  # a counter's samples are called `_total`
    assert m.by_label("demo_requests_total", "outcome") == {"ok": 5, "error": 1}
    assert m.value("demo_running") == 4
    assert m.has("demo_running") and not m.has("demo_missing")
    assert m.value("demo_quoted", path='a "b"\\c\n') == 1  # escapes undone


def test_types_and_declared_families() -> None:
    m = prometheus_text.parse(exposition())
    assert m.types["demo_requests"] == "counter"
    assert m.types["demo_running"] == "gauge"
    assert m.types["demo_latency_seconds"] == "histogram"
    assert m.types["demo_unused"] == "counter"  # declared, even without a sample
    assert not m.samples("demo_unused_total")
    assert "demo_requests_created" in m.names()


def test_histogram() -> None:
    h = prometheus_text.parse(exposition()).histogram("demo_latency_seconds")
    assert h.buckets == {0.1: 1, 1.0: 3, math.inf: 4}
    assert h.count == 4 and h.sum == pytest.approx(4.25)
    assert h.mean == pytest.approx(4.25 / 4)
    assert prometheus_text.parse("").histogram("demo_latency_seconds").mean is None


def test_malformed_text_is_an_error() -> None:
    with pytest.raises(ValueError):
        prometheus_text.parse("demo_running{ 1\n")
