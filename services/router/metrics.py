"""The router's Prometheus series (prefix `turnout_router_`)."""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from services.router.cost_model import CostModels
    from services.router.kv_index import KvIndex
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
        self.queued_moves = Counter(
            "turnout_router_queued_moves",
            "Requests moved before their first token to a worker that joined its pool",
            ["pool"], registry=r)
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
        self.fpm_records = Counter(
            "turnout_router_fpm_records", "Workers' forward-pass records received by the adaptive "
            "cost, by use (fitted; no_load_report: dropped, the worker's KV size unknown yet)",
            ["use"], registry=r)
        self.cost_coefficient = Gauge(
            "turnout_router_cost_model_coefficient",
            "Fitted engine step time (ms) = P*(a*t^2 + b*t + c) + D*(e + f*n + g*u + h*u^2), per "
            "model: t prefill tokens, n decoding sequences, u KV usage", ["model", "term"],
            registry=r)
        self.cost_records = Gauge("turnout_router_cost_model_records",
                                  "Forward-pass records the model's fit has seen", ["model"],
                                  registry=r)
        self.cost_chunk_tokens = Gauge(
            "turnout_router_cost_model_chunk_tokens",
            "Largest engine step seen (tokens): the prefill chunk the TTFT prediction assumes",
            ["model"], registry=r)
        self.queue_pressure = Gauge(
            "turnout_router_queue_pressure",
            "Mean predicted queue wait over mean request prefill work: what a millisecond of "
            "added work costs in the adaptive cost", ["model"], registry=r)
        self.disagg_decisions = Counter(
            "turnout_router_disagg_decisions",
            "Where a request's prompt was computed when prefill workers serve its model: path "
            "remote (a prefill worker), local (its decode worker) or aggregated (no prefill, or "
            "no decode, worker alive: the other pool runs it whole), by reason",
            ["path", "reason"], registry=r)
        self.disagg_handoffs = Counter(
            "turnout_router_disagg_handoffs",
            "Prefill-to-decode hand-offs at the first token: sent; decoded_in_place (the "
            "decode pool empty for --prefill-fallback-after-ms: the prefill worker decodes it); "
            "or no_decode_worker (it waits for one like a stranded migration)", ["outcome"],
            registry=r)
        self.disagg_stretched_streams = Counter(
            "turnout_router_disagg_stretched_streams",
            "Decoding streams whose step a local prefill taken on the ITL miss budget was "
            "predicted to stretch past the ITL target (reason ttft_gain)", registry=r)
        self.disagg_handoff_seconds = Histogram(
            "turnout_router_disagg_handoff_seconds",
            "From a prefill's first token to the decode worker's first token: KV transfer "
            "plus scheduling (the first inter-token gap of a disaggregated stream)",
            registry=r, buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2))
        self.disagg_blocks = Counter(
            "turnout_router_disagg_blocks",
            "Prompt blocks of hand-offs: already cached on the chosen decode worker, or to "
            "pull from the prefill worker (predicted from the KV index)", ["kind"], registry=r)
        self.disagg_recomputed_tokens = Histogram(
            "turnout_router_disagg_recomputed_tokens",
            "Tokens a decode worker computed before its first token (1 when the whole prompt's "
            "KV came over; more when a transfer failed and it recomputed)", registry=r,
            buckets=(1, 2, 64, 256, 1024, 2048, 4096, 16384))
        self.disagg_prefill_queue = Gauge(
            "turnout_router_disagg_prefill_queue_tokens",
            "Least queued prefill tokens among prefill workers, at the last decision",
            registry=r)
        self.resumes = Counter(
            "turnout_router_resumes",
            "Streams a frontend resumed here after losing the router that carried them (it "
            "died, hung or drained, or the connection dropped), placed anew", registry=r)
        self.taken_over = Counter(
            "turnout_router_streams_taken_over",
            "Streams a frontend resumed here over a new connection while this router still ran "
            "them (its connection had dropped): continued in place, nothing moved", registry=r)
        self.frontends_lost = Counter(
            "turnout_router_frontends_lost",
            "Frontends that stopped pinging (their requests were cancelled on the workers)",
            registry=r)
        self.orphans_cancelled = Counter(
            "turnout_router_orphans_cancelled",
            "Requests cancelled on workers because their frontend was gone", registry=r)
        self.stale_tokens = Counter(
            "turnout_router_stale_tokens_dropped",
            "Tokens a worker sent that their stream already had, dropped: an earlier run of "
            "the request that this router cancelled on that worker (it took the frontend for "
            "gone), still on its way when the stream came back here", registry=r)
        self.stale_chunks = Counter(
            "turnout_router_stale_chunks_dropped",
            "Chunks of an earlier run of a resumed request on the worker it went back to (a run "
            "this router cancelled there), dropped whole: their tokens, or a finish that would "
            "have ended the stream", registry=r)
        self.placements_announced = Counter(
            "turnout_router_placements_announced",
            "Placements named to frontends on pongs before any token named the worker (a "
            "resume after this router dies goes back to that worker)", registry=r)
        self.placements_unannounced = Gauge(
            "turnout_router_placements_unannounced",
            "Requests whose frontend learns their worker from its next pong (no token has "
            "named it yet): were this router lost now, their resumes would be placed afresh",
            registry=r)
        self.handed_back = Counter(
            "turnout_router_streams_handed_back",
            "Streams given back to their frontends to resume elsewhere (drain)", registry=r)
        self.peer_routers = Gauge("turnout_router_peer_routers",
                                  "Other router replicas whose usage this router counts",
                                  registry=r)
        self._up: set[str] = set()

    def set_worker_gauges(self, workers: Iterable[WorkerHandle], dead: Iterable[str],
                          listed: Container[str]) -> None:
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

    def set_routing_state(self, kv_index: KvIndex | None, models: CostModels | None) -> None:
        """The KV index's size and the adaptive cost's fit (each when in use)."""
        if kv_index is not None:
            self.index_blocks.set(kv_index.num_blocks())
            self.index_entries.set(kv_index.num_entries())
        if models is not None:
            self.set_cost_models(models)

    def set_cost_models(self, models: CostModels) -> None:
        """The adaptive cost's current fit and pressure, per served model."""
        for model, route in list(models.models.items()):
            steps = route.steps
            for term, value in steps.coefficients.as_dict().items():
                self.cost_coefficient.labels(model, term).set(value)
            self.cost_records.labels(model).set(steps.records)
            self.cost_chunk_tokens.labels(model).set(steps.chunk_tokens)
            self.queue_pressure.labels(model).set(route.pressure)

    def set_workers_up(self, up: dict[str, bool]) -> None:
        """Liveness of every worker worth a series; the series of any other one is dropped."""
        for gone in self._up - up.keys():
            self.worker_up.remove(gone)
        for worker_id, alive in up.items():
            self.worker_up.labels(worker_id).set(1 if alive else 0)
        self._up = set(up)
