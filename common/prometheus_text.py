"""Prometheus text exposition read back into samples: the one parser every scraper uses (the
status CLI, the planner's load observer, the benchmarks and the tests).

Built on `prometheus_client.parser`, so label escaping, exemplars, `+Inf` and NaN are read
as Prometheus itself reads them. A scrape becomes `Metrics`: samples by sample name (a
histogram's `_bucket`/`_sum`/`_count` and a counter's `_total` are sample names of their own,
as they appear on the wire) and each family's declared type.
"""

from __future__ import annotations

import dataclasses

from prometheus_client.parser import text_string_to_metric_families


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclasses.dataclass(frozen=True, slots=True)
class Histogram:
    """One histogram series summed over the label sets that match: cumulative bucket counts
    by upper bound (`le`), sum and count."""

    buckets: dict[float, float]
    sum: float
    count: float

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


class Metrics:
    """The samples of one scrape."""

    def __init__(self, samples: list[Sample], types: dict[str, str]) -> None:
        self._by_name: dict[str, list[Sample]] = {}
        for s in samples:
            self._by_name.setdefault(s.name, []).append(s)
        self.types = types  # family name -> counter | gauge | histogram | summary | ...

    def names(self) -> set[str]:
        """Every sample name in the scrape."""
        return set(self._by_name)

    def samples(self, name: str, **labels: str) -> list[Sample]:
        """The samples called `name` whose labels include `labels`."""
        return [s for s in self._by_name.get(name, [])
                if all(s.labels.get(k) == v for k, v in labels.items())]

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.samples(name, **labels))

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples called `name` whose labels include `labels` (0 when there
        are none: a labelled counter appears only once incremented)."""
        return sum(s.value for s in self.samples(name, **labels))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """`name`'s samples summed per value of one label."""
        out: dict[str, float] = {}
        for s in self.samples(name):
            key = s.labels.get(label, "")
            out[key] = out.get(key, 0.0) + s.value
        return out

    def histogram(self, name: str, **labels: str) -> Histogram:
        """The histogram family `name` (without suffix), summed over matching label sets."""
        buckets: dict[float, float] = {}
        for s in self.samples(name + "_bucket", **labels):
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
        return Histogram(dict(sorted(buckets.items())), self.value(name + "_sum", **labels),
                         self.value(name + "_count", **labels))


def parse(text: str) -> Metrics:
    """Prometheus text → `Metrics`. Malformed text raises ValueError."""
    samples: list[Sample] = []
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.append(Sample(s.name, dict(s.labels), float(s.value)))
    return Metrics(samples, types)
