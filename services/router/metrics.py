"""The router's Prometheus series (prefix `turnout_router_`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from services.router.worker_pool import WorkerHandle


class RouterMetrics:
    def __init__(self, router_id: str) -> None:
        self.registry = r = CollectorRegistry()
        self.decisions = Counter("turnout_router_decisions", "Routing decisions by policy",
                                 ["policy"], registry=r)
        self.decision_seconds = Histogram(
            "turnout_router_decision_seconds", "Time to choose a worker", registry=r,
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2))
        self.requests = Counter("turnout_router_requests", "Requests by outcome", ["outcome"],
                                registry=r)
        self.inflight = Gauge("turnout_router_inflight_requests", "Requests in flight", registry=r)
        self.workers = Gauge("turnout_router_workers", "Workers known, by state", ["state"],
                             registry=r)
        self.worker_deaths = Counter("turnout_router_worker_failures",
                                     "Workers declared dead, by cause", ["cause"], registry=r)
        self.worker_recoveries = Counter(
            "turnout_router_worker_recoveries",
            "Workers declared dead (silent/stalled) that came back and were re-admitted",
            registry=r)
        self.migrations = Counter("turnout_router_migrations", "Requests moved to another worker",
                                  ["cause"], registry=r)
        self.detection_seconds = Histogram(
            "turnout_router_failure_detection_seconds",
            "From a dead worker's last heartbeat to the router declaring it dead", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5))
        self.recomputed_tokens = Histogram(
            "turnout_router_migration_recomputed_tokens",
            "Tokens a migrated request's new worker had to recompute (not found in any KV)",
            registry=r, buckets=(0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536))
        self.malformed = Counter("turnout_router_malformed_frames", "Frames dropped as malformed",
                                 ["plane"], registry=r)
        self.overlap = Histogram(
            "turnout_router_predicted_overlap_ratio",
            "Share of a request's KV blocks the chosen worker already caches (kv mode)",
            registry=r, buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0))
        self.kv_events = Counter("turnout_router_kv_events_applied", "KV events indexed",
                                 registry=r)
        self.resyncs = Counter("turnout_router_kv_resyncs",
                               "Full KV state dumps requested (new worker or event gap)",
                               registry=r)
        self.index_blocks = Gauge("turnout_router_kv_index_blocks",
                                  "Distinct KV blocks in the index", registry=r)
        self.index_entries = Gauge("turnout_router_kv_index_entries",
                                   "(worker, block) pairs in the index", registry=r)
        self.event_gaps = Counter("turnout_router_event_gaps", "Event-plane sequence gaps",
                                  ["topic"], registry=r)
        self.worker_up = Gauge("turnout_router_worker_up",
                               "1 while a worker is admitted and alive; 0 once declared dead "
                               "(until its discovery record goes)", ["worker"], registry=r)
        self.route_queries = Counter("turnout_router_route_queries",
                                     "POST /v1/route previews (nothing sent), by outcome",
                                     ["outcome"], registry=r)
        self._up: set[str] = set()

    def set_worker_gauges(self, workers: Iterable[WorkerHandle], dead: Iterable[str],
                          listed: set[str]) -> None:
        """Workers by state, and the liveness of each (`listed`: ids with a discovery record,
        whose series stay, at 0, once dead)."""
        workers = list(workers)
        dead = list(dead)
        routable = sum(1 for w in workers if w.routable)
        self.workers.labels("routable").set(routable)
        self.workers.labels("draining").set(len(workers) - routable)
        self.workers.labels("dead").set(len(dead))
        up = {w.id: w.alive for w in workers}
        up.update({w: False for w in dead if w in listed and w not in up})
        self.set_workers_up(up)

    def set_workers_up(self, up: dict[str, bool]) -> None:
        """Liveness of every worker worth a series; the series of any other one is dropped."""
        for gone in self._up - up.keys():
            self.worker_up.remove(gone)
        for worker_id, alive in up.items():
            self.worker_up.labels(worker_id).set(1 if alive else 0)
        self._up = set(up)
