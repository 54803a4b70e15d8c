"""CustomMetrics: engine series under `turnout_engine_`, with the worker's labels added."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from common.custom_metrics import CustomMetrics, LabelledMetric


def make() -> tuple[CustomMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return CustomMetrics(registry, {"worker": "w1", "model": "m"}), registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"worker": "w1", "model": "m", **labels})


def test_unlabelled_series_carry_the_worker_labels() -> None:
    metrics, registry = make()
    steps = metrics.counter("preemptions", "Sequences preempted")
    steps.inc(3)
    gpu = metrics.gauge("turnout_engine_gpu_memory_bytes", "GPU memory in use")  # full name ok
    gpu.set(1024)
    accepted = metrics.histogram("spec_accepted_tokens", "Draft tokens accepted",
                                 buckets=(1, 2, 4))
    accepted.observe(2)
    accepted.observe(3)
    assert value(registry, "turnout_engine_preemptions_total") == 3
    assert value(registry, "turnout_engine_gpu_memory_bytes") == 1024
    assert value(registry, "turnout_engine_spec_accepted_tokens_count") == 2
    assert value(registry, "turnout_engine_spec_accepted_tokens_bucket", le="2.0") == 1
    text = generate_latest(registry).decode()
    assert "# HELP turnout_engine_preemptions_total Sequences preempted" in text


def test_labelled_series() -> None:
    metrics, registry = make()
    adapters = metrics.gauge("lora_requests", "Requests per adapter", ["adapter"])
    assert isinstance(adapters, LabelledMetric)
    adapters.labels("a").set(2)
    adapters.labels(adapter="b").inc()
    assert adapters.labels("a") is adapters.labels(adapter="a")  # children are cached
    assert value(registry, "turnout_engine_lora_requests", adapter="a") == 2
    assert value(registry, "turnout_engine_lora_requests", adapter="b") == 1
    adapters.remove("a")
    adapters.remove("never-seen")  # ignored
    assert value(registry, "turnout_engine_lora_requests", adapter="a") is None
    with pytest.raises(ValueError, match="label values"):
        adapters.labels("a", "b")
    with pytest.raises(ValueError, match="do not match"):
        adapters.labels(other="x")
    with pytest.raises(ValueError, match="not both"):
        adapters.labels("a", adapter="a")


def test_names_are_forced_under_the_engine_prefix() -> None:
    metrics, _ = make()
    assert metrics.full_name("x") == "turnout_engine_x"
    assert metrics.full_name("turnout_engine_x") == "turnout_engine_x"
    for bad in ("turnout_worker_engine_steps", "turnout_router_x", "Bad-Name", "9lives", ""):
        with pytest.raises(ValueError):
            metrics.counter(bad, "doc")
    with pytest.raises(ValueError, match="_total"):
        metrics.counter("things_total", "doc")


def test_reserved_and_invalid_labels() -> None:
    metrics, _ = make()
    with pytest.raises(ValueError, match="set by the worker"):
        metrics.counter("a", "doc", ["worker"])
    with pytest.raises(ValueError, match="not a valid label"):
        metrics.counter("b", "doc", ["bad-label"])
    with pytest.raises(ValueError, match="duplicate"):
        metrics.counter("c", "doc", ["x", "x"])
    with pytest.raises(TypeError):
        metrics.counter("d", "doc", "adapter")  # type: ignore[call-overload]


def test_declaring_twice_returns_the_same_handle_and_conflicts_fail() -> None:
    metrics, registry = make()
    first = metrics.counter("restarts", "Engine restarts")
    assert metrics.counter("restarts", "Engine restarts") is first
    first.inc()
    with pytest.raises(ValueError, match="already declared"):
        metrics.gauge("restarts", "doc")
    with pytest.raises(ValueError, match="already declared"):
        metrics.counter("restarts", "doc", ["kind"])
    hist = metrics.histogram("h", "doc", buckets=(1, 2))
    assert metrics.histogram("h", "doc", buckets=(1, 2)) is hist
    with pytest.raises(ValueError, match="already declared"):
        metrics.histogram("h", "doc", buckets=(1, 3))
    assert value(registry, "turnout_engine_restarts_total") == 1


def test_without_worker_labels() -> None:
    registry = CollectorRegistry()
    metrics = CustomMetrics(registry)
    plain = metrics.counter("plain", "doc")
    plain.inc()
    labelled = metrics.counter("empty_labels", "doc", [])
    labelled.labels().inc(2)
    assert registry.get_sample_value("turnout_engine_plain_total") == 1
    assert registry.get_sample_value("turnout_engine_empty_labels_total") == 2
