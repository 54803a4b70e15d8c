"""The worker's Prometheus series (prefix `turnout_worker_`), updated once per engine step.

Also builds the `CustomMetrics` handed to the engine, so its `turnout_engine_*` series share
this registry and the `worker`/`model` labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.custom_metrics import CustomMetrics
from services.worker.engine import EngineLoad, StepOutput


class WorkerMetrics:
    def __init__(self, worker_id: str, model: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"worker": worker_id, "model": model}
        names = list(labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=self.registry).labels(**labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=self.registry).labels(**labels)

        self.steps = counter("turnout_worker_engine_steps", "Engine steps run")
        self.batch_size = Histogram(
            "turnout_worker_batch_size", "Requests scheduled per engine step", names,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry,
        ).labels(**labels)
        self.prefill_tokens = counter("turnout_worker_prefill_tokens", "Prompt tokens computed")
        self.decode_tokens = counter("turnout_worker_decode_tokens", "Tokens decoded")
        self.prompt_tokens = counter("turnout_worker_prompt_tokens",
                                     "Prompt tokens of admitted requests")
        self.cached_tokens = counter("turnout_worker_cached_tokens",
                                     "Prompt tokens served from the prefix cache")
        self.requests = Counter("turnout_worker_requests", "Requests by outcome",
                                [*names, "outcome"], registry=self.registry)
        self._labels = labels
        self.running = gauge("turnout_worker_running_requests", "Requests being computed")
        self.waiting = gauge("turnout_worker_waiting_requests", "Requests queued in the engine")
        self.kv_used = gauge("turnout_worker_kv_blocks_used", "KV blocks in use")
        self.kv_total = gauge("turnout_worker_kv_blocks_total", "KV blocks in the pool")
        self.replicated_blocks = gauge("turnout_worker_kv_replicated_blocks",
                                       "KV blocks sent to replica peers so far")
        self.replication_dropped = gauge("turnout_worker_kv_replication_dropped_blocks",
                                         "KV blocks not replicated because peers fell behind")
        self.replication_lag = gauge("turnout_worker_kv_replication_lag_blocks",
                                     "KV blocks waiting to be replicated")
        self.host_tier_blocks = gauge("turnout_worker_host_kv_blocks",
                                      "Peers' blocks held in the host-memory tier")
        self.resumes = counter("turnout_worker_resumed_requests",
                               "Migrated requests continued here")
        self.handovers = counter("turnout_worker_handovers",
                                 "Running requests taken over by another router (their router "
                                 "was lost) without a recompute")
        self.replays = counter("turnout_worker_replayed_streams",
                               "Resumed streams that had ended here while their router was not "
                               "listening: their last tokens went to the new router, no rerun")
        self.routers_lost = counter("turnout_worker_routers_lost",
                                    "Routers that stopped pinging (their requests were cancelled)")
        self.blocks_promoted = counter("turnout_worker_kv_blocks_promoted",
                                       "Blocks moved from the host tier into the engine cache")
        self.blocks_pulled = counter("turnout_worker_kv_blocks_pulled",
                                     "Blocks pulled from peers for resumed requests")
        self.labels = labels
        self.kv_leases = gauge("turnout_worker_kv_leases",
                               "Finished prefills whose KV is held for a decode worker")
        self.lease_ends = Counter("turnout_worker_kv_lease_ends",
                                  "Prefill KV leases ended: released by the decode side, "
                                  "expired, or cancelled by the router", [*names, "end"],
                                  registry=self.registry)
        self.transfers = Counter("turnout_worker_disagg_transfers",
                                 "Decode phases received: prompt KV pulled, recomputed (no "
                                 "source had it), or moved by the engine itself",
                                 [*names, "outcome"], registry=self.registry)
        self.disagg_blocks_cached = counter("turnout_worker_disagg_blocks_cached",
                                            "Prompt blocks decode phases found already cached "
                                            "here (not pulled)")
        self.transfer_seconds = Histogram(
            "turnout_worker_kv_transfer_seconds",
            "A decode phase's KV hand-off: pull plus modelled transfer, until admission",
            names, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry).labels(**labels)
        self.malformed = counter("turnout_worker_malformed_frames",
                                 "Request-plane frames dropped as malformed")
        self.cache_hit_rate = gauge("turnout_worker_prefix_cache_hit_rate",
                                    "Share of admitted prompt tokens found in the prefix cache, "
                                    "since start")
        self.loop_lag = Histogram(
            "turnout_worker_event_loop_lag_seconds",
            "How late each heartbeat tick ran behind its schedule (the process lacked the CPU)",
            names, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry).labels(**labels)
        self.time_debt = gauge("turnout_worker_engine_time_debt_seconds",
                               "Simulated engines: how far the step clock runs behind the "
                               "timing model")
        self.time_dropped = counter("turnout_worker_engine_time_dropped_seconds",
                                    "Simulated engines: time owed past the debt bound, dropped")
        self._dropped_total = 0.0
        # Encode workers (--worker-mode encode).
        self.images = Counter("turnout_worker_images",
                              "Images this worker produced an embedding for, by source: "
                              "encoded (an encode worker's encoder), cache (an encode worker's "
                              "embedding cache) or inline (an LLM worker encoding a request's "
                              "images itself: no encode worker embedded them)",
                              [*names, "source"], registry=self.registry)
        self.encode_seconds = Histogram(
            "turnout_worker_encode_seconds", "Vision-encoder time per image encoded here",
            names, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry).labels(**labels)
        self.embedding_cache_hits = counter("turnout_worker_embedding_cache_hits",
                                            "Images served from the embedding cache")
        self.embedding_cache_misses = counter("turnout_worker_embedding_cache_misses",
                                              "Images not in the embedding cache (encoded)")
        self.embedding_cache_bytes = gauge("turnout_worker_embedding_cache_bytes",
                                           "Bytes of embeddings the cache holds")
        self.embedding_bytes_sent = counter("turnout_worker_embedding_bytes_sent",
                                            "Embedding bytes sent to routers")
        self.engine_metrics = CustomMetrics(self.registry, labels)
        self._prompt_total = 0
        self._cached_total = 0

    def on_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A request's first chunk: its prompt length and how much of it was cached."""
        self.prompt_tokens.inc(prompt_tokens)
        if cached_tokens:
            self.cached_tokens.inc(cached_tokens)
        self._prompt_total += prompt_tokens
        self._cached_total += cached_tokens
        self.cache_hit_rate.set(self._cached_total / self._prompt_total)

    def on_step(self, out: StepOutput) -> None:
        if out.images_encoded:
            self.images.labels(**self.labels, source="inline").inc(out.images_encoded)
        fp = out.forward_pass
        if fp is None:
            return
        self.steps.inc()
        self.batch_size.observe(fp.batch_size)
        if fp.prefill_tokens:
            self.prefill_tokens.inc(fp.prefill_tokens)
        if fp.decode_tokens:
            self.decode_tokens.inc(fp.decode_tokens)

    def on_finish(self, outcome: str) -> None:
        self.requests.labels(**self._labels, outcome=outcome).inc()

    def on_load(self, load: EngineLoad) -> None:
        self.running.set(load.running)
        self.waiting.set(load.waiting)
        self.kv_used.set(load.kv_used_blocks)
        self.kv_total.set(load.kv_total_blocks)

    def on_heartbeat(self, loop_lag_s: float, time_debt_s: float, time_dropped_s: float) -> None:
        """A heartbeat tick: its lateness, and the engine's pacing (dropped is a running total)."""
        self.loop_lag.observe(loop_lag_s)
        self.time_debt.set(time_debt_s)
        if time_dropped_s > self._dropped_total:
            self.time_dropped.inc(time_dropped_s - self._dropped_total)
            self._dropped_total = time_dropped_s
