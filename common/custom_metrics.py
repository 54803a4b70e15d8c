"""Prometheus series that an engine adapter defines for itself (`turnout_engine_*`).

An engine knows figures the worker cannot see (a vLLM engine's spec-decode acceptance, an SGLang
radix-cache hit count, a GPU's memory). The worker hands every engine a `CustomMetrics` before
`start`; the engine declares counters, gauges and histograms through it and they are served on
the worker's /metrics next to the `turnout_worker_*` series. Every name is forced under
`turnout_engine_` so an engine can neither shadow a service's series nor scatter names, and every
series carries the worker's own labels (`worker`, `model`) without the engine passing them.

Owns naming, label merging and idempotent declaration. Does not own the registry (the worker's)
or when values change (the engine).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final, Generic, TypeVar, cast, overload

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX: Final = "turnout_engine_"
_NAME: Final = re.compile(r"[a-z_][a-z0-9_]*")
_LABEL: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
DEFAULT_BUCKETS: Final = Histogram.DEFAULT_BUCKETS

M = TypeVar("M", Counter, Gauge, Histogram)


class LabelledMetric(Generic[M]):
    """A metric declared with its own labels: `.labels(...)` gives the child to update, with the
    worker's labels already filled in."""

    __slots__ = ("_children", "_const", "label_names", "metric")

    def __init__(self, metric: M, label_names: tuple[str, ...], const: Mapping[str, str]) -> None:
        self.metric = metric
        self.label_names = label_names
        self._const = dict(const)
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: object, **named: object) -> M:
        if values and named:
            raise ValueError("pass label values either by position or by name, not both")
        if named:
            if set(named) != set(self.label_names):
                raise ValueError(f"labels {sorted(named)} do not match "
                                 f"{list(self.label_names)}")
            values = tuple(named[n] for n in self.label_names)
        if len(values) != len(self.label_names):
            raise ValueError(f"expected {len(self.label_names)} label values "
                             f"({', '.join(self.label_names)}), got {len(values)}")
        if not values and not self._const:
            return self.metric  # declared with no labels at all
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.metric.labels(
                **self._const, **dict(zip(self.label_names, key, strict=True)))
        return child

    def remove(self, *values: object) -> None:
        """Drop one label combination's series (an adapter unloaded); unknown ones are ignored."""
        key = tuple(str(v) for v in values)
        if self._children.pop(key, None) is not None:
            self.metric.remove(*self._const.values(), *key)


class CustomMetrics:
    """Declares engine series in the worker's registry; `const_labels` go on every series."""

    def __init__(self, registry: CollectorRegistry,
                 const_labels: Mapping[str, str] | None = None) -> None:
        self.registry = registry
        self.const_labels = dict(const_labels or {})
        # full name → (kind, label names, buckets, what was returned), for re-declaration
        self._declared: dict[
            str, tuple[str, tuple[str, ...] | None, tuple[float, ...], object]] = {}

    @overload
    def counter(self, name: str, documentation: str) -> Counter: ...
    @overload
    def counter(self, name: str, documentation: str,
                labels: Sequence[str]) -> LabelledMetric[Counter]: ...

    def counter(self, name: str, documentation: str,
                labels: Sequence[str] | None = None) -> Counter | LabelledMetric[Counter]:
        """A counter (exported with `_total`): without `labels` the child to `inc()`, with them
        a `LabelledMetric` whose `.labels(...)` gives one."""
        return cast(Counter | LabelledMetric[Counter],
                    self._declare("counter", name, documentation, labels, ()))

    @overload
    def gauge(self, name: str, documentation: str) -> Gauge: ...
    @overload
    def gauge(self, name: str, documentation: str,
              labels: Sequence[str]) -> LabelledMetric[Gauge]: ...

    def gauge(self, name: str, documentation: str,
              labels: Sequence[str] | None = None) -> Gauge | LabelledMetric[Gauge]:
        return cast(Gauge | LabelledMetric[Gauge],
                    self._declare("gauge", name, documentation, labels, ()))

    @overload
    def histogram(self, name: str, documentation: str, *,
                  buckets: Sequence[float] = ...) -> Histogram: ...
    @overload
    def histogram(self, name: str, documentation: str, labels: Sequence[str], *,
                  buckets: Sequence[float] = ...) -> LabelledMetric[Histogram]: ...

    def histogram(self, name: str, documentation: str, labels: Sequence[str] | None = None, *,
                  buckets: Sequence[float] = DEFAULT_BUCKETS
                  ) -> Histogram | LabelledMetric[Histogram]:
        return cast(Histogram | LabelledMetric[Histogram],
                    self._declare("histogram", name, documentation, labels, tuple(buckets)))

    def full_name(self, name: str) -> str:
        """`name` under `turnout_engine_` (given with or without it); ValueError if invalid."""
        if name.startswith(PREFIX):
            name = name[len(PREFIX):]
        elif name.startswith("turnout_"):
            raise ValueError(f"metric name {name!r} belongs to a Turnout service; engine "
                             f"metrics live under {PREFIX!r}")
        if not _NAME.fullmatch(name):
            raise ValueError(f"metric name {name!r} must be lower-case letters, digits and '_'")
        return PREFIX + name

    def _declare(self, kind: str, name: str, documentation: str,
                 labels: Sequence[str] | None, buckets: tuple[float, ...]) -> object:
        full = self.full_name(name)
        if kind == "counter" and full.endswith("_total"):
            raise ValueError(f"counter {full!r}: leave out '_total', the exposition adds it")
        if isinstance(labels, str):
            raise TypeError(f"{full}: labels must be a sequence of names, not a string")
        names = tuple(labels) if labels is not None else None
        for label in names or ():
            if not _LABEL.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"{full}: {label!r} is not a valid label name")
            if label in self.const_labels:
                raise ValueError(f"{full}: label {label!r} is set by the worker")
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"{full}: duplicate label names {list(names)}")
        known = self._declared.get(full)
        if known is not None:
            if known[:3] != (kind, names, buckets):
                raise ValueError(f"metric {full!r} is already declared differently: a "
                                 f"{known[0]} with labels {list(known[1] or ())}")
            return known[3]
        all_labels = [*self.const_labels, *(names or ())]
        metric: Counter | Gauge | Histogram
        if kind == "counter":
            metric = Counter(full, documentation, all_labels, registry=self.registry)
        elif kind == "gauge":
            metric = Gauge(full, documentation, all_labels, registry=self.registry)
        else:
            metric = Histogram(full, documentation, all_labels, buckets=buckets,
                               registry=self.registry)
        handle: object
        if names is not None:
            handle = LabelledMetric(metric, names, self.const_labels)
        elif all_labels:
            handle = metric.labels(**self.const_labels)
        else:
            handle = metric
        self._declared[full] = (kind, names, buckets, handle)
        return handle
