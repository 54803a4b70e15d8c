"""Every flag of `turnout router`, with its TURNOUT_* fallback and default."""

from __future__ import annotations

import dataclasses
import math

from common.block_hash import DEFAULT_SEED
from common.config import ProcessConfig, opt, require
from common.failure_detector import DetectorSettings

ROUTER_MODES = ["kv", "round-robin", "random", "least-loaded", "direct"]


@dataclasses.dataclass
class RouterConfig(ProcessConfig):
    router_id: str = opt("", help="unique instance id (default: router-<pid>-<random>)")
    router_mode: str = opt("kv", choices=ROUTER_MODES, help="how a worker is chosen")
    router_port: int = opt(0, help="request-plane port frontends connect to (0: any free port)")
    router_metrics_port: int = opt(0, help="/metrics and /health port (0: any free port)")
    heartbeat_interval_ms: int = opt(100, help="workers' heartbeat period")
    missed_heartbeats: int = opt(3, help="no worker is declared hung before this many silent "
                                         "periods; past them the failure detector decides")
    # phi: -log10 of the chance that a live worker, given its heartbeat history and its
    # self-reported loop lag, would still be silent. 8 on 100 ms heartbeats from a quiet host:
    # a hang verdict after 0.38 s of silence.
    suspect_phi: float = opt(8.0, help="a worker whose silence reaches this phi is declared "
                                       "hung: its requests move, long prefills wait")
    convict_phi: float = opt(12.0, help="at this phi, and at least 0.5 s after the hang "
                                        "verdict, a hung worker's long prefills move too")
    long_prefill_tokens: int = opt(4096, help="a request with this many prompt tokens still to "
                                              "prefill stays on a hung worker until conviction "
                                              "(moving it redoes the prefill); 0: every request "
                                              "still prefilling")
    migration_limit: int = opt(3, help="times one request may move to another worker; 0: never")
    # Unset: the adaptive cost (services/router/cost_model.py), which replaced a fixed weight of
    # 16 that won on the public Mooncake trace and tied Dynamo on long-prompt conversations.
    kv_overlap_weight: float | None = opt(
        None, help="kv mode: a fixed weight of blocks to prefill against active decode blocks "
                   "(the block cost); unset: the adaptive cost, predicted ms to first token from "
                   "a step-time model fitted to the workers' forward passes, plus measured "
                   "queueing pressure x the request's prefill work")
    router_temperature: float = opt(0.0, help="kv mode: softmax temperature over costs; 0: "
                                              "always the cheapest worker")
    hotspot_margin: float | None = opt(
        None, help="kv mode: a worker loaded (in KV blocks) more than (1+margin)x the mean is "
                   "skipped, whatever its overlap; <0: off; unset: 0.5 with --kv-overlap-weight, "
                   "off with the adaptive cost (it prices queues itself)")
    kv_events: bool = opt(True, help="kv mode: index workers' KV events; --no-kv-events "
                                     "predicts caches from the router's own decisions")
    kv_ttl_s: float = opt(120.0, help="--no-kv-events: how long a routed prefix counts as cached")
    hash_seed: int = opt(DEFAULT_SEED, help="seed of the KV block hashes (must match workers)")
    no_worker_wait_ms: int = opt(3000, help="a request for a model no worker serves yet waits "
                                            "this long for one to appear before a 503")
    disagg_mode: str = opt("conditional", choices=["conditional", "always"],
                           help="with prefill workers: 'conditional' prefills short uncached "
                                "prompts on the decode worker; 'always' sends every prompt to "
                                "a prefill worker")
    prefill_fallback: bool = opt(True, help="with no decode or aggregated worker alive for "
                                            "--prefill-fallback-after-ms, prefill workers "
                                            "serve whole requests and decode what they "
                                            "prefilled; --no-prefill-fallback: those wait "
                                            "--no-worker-wait-ms for a decode worker")
    prefill_fallback_after_ms: int = opt(1000, help="how long the decode pool is empty before "
                                                    "the prefill pool serves (meanwhile "
                                                    "requests and hand-offs wait for a decode "
                                                    "worker: a restart, a blip)")
    local_prefill_max_tokens: int = opt(2048, help="conditional: prefill on the decode worker "
                                                   "only when fewer prompt tokens than this "
                                                   "are uncached there")
    local_prefill_max_ratio: float = opt(0.7, help="conditional: ... and less than this share "
                                                   "of the prompt is uncached")
    prefill_busy_tokens: int = opt(0, help="conditional: when every prefill worker has this "
                                           "many prompt tokens queued, prefill on the decode "
                                           "worker whatever the length; 0: never")
    decode_veto_requests: int = opt(0, help="a decode worker with this many requests in flight "
                                            "refuses local prefills (they go to a prefill "
                                            "worker); 0: never")
    disagg_ttft_target_ms: float = opt(500.0, help="conditional: a path predicted to take "
                                                   "longer than this to the first token misses "
                                                   "(see services/router/disaggregation.py)")
    disagg_itl_target_ms: float = opt(50.0, help="conditional: a hand-off gap predicted over "
                                                 "this misses, and a local prefill that would "
                                                 "stretch the decode worker's steps past it "
                                                 "harms the streams decoding there")
    disagg_hold_first_token: bool = opt(False, help="a prefill's first token whose hand-off gap "
                                                    "is predicted past --disagg-itl-target-ms "
                                                    "waits until the decode worker starts on "
                                                    "the next, if --disagg-ttft-target-ms has "
                                                    "room: the gap lands in TTFT, not between "
                                                    "tokens (off: TTFT never includes the "
                                                    "transfer)")
    disagg_itl_miss_budget: float = opt(0.0, help="share of streamed gaps that may be "
                                                  "stretched past --disagg-itl-target-ms to "
                                                  "cut the TTFT tail: by local prefills "
                                                  "(conditional; see --disagg-local-gain-"
                                                  "ratio) and, with --disagg-hold-first-token, "
                                                  "by first tokens of requests already in the "
                                                  "TTFT tail sent at once. For percentile "
                                                  "targets: each stretched stream misses an "
                                                  "every-gap target. 0 (the default): never")
    disagg_local_gain_ratio: float = opt(1.5, help="conditional: a local prefill that would "
                                                   "stretch decoding streams is taken, within "
                                                   "--disagg-itl-miss-budget, when the prefill "
                                                   "pool's predicted TTFT is at least this many "
                                                   "times the local one")
    disagg_tail_quantile: float = opt(0.9, help="--disagg-itl-miss-budget is spent only on "
                                                 "the TTFT tail: requests whose first token, "
                                                 "held for the hand-off, would come (a local "
                                                 "prefill) or is coming (sent at once) past "
                                                 "this quantile of recent first tokens")
    decode_overlap_weight: float = opt(1.0, help="kv mode, choosing a decode worker: weight "
                                                 "of blocks it must pull against its active "
                                                 "decode blocks")
    disagg_lease_ms: int = opt(0, help="how long a prefill worker keeps a request's KV for "
                                       "its decode worker; 0: the worker's --kv-lease-ms")
    rebalance_on_join: bool = opt(True, help="when a worker joins, requests still queued for "
                                             "their prefill elsewhere in its pool move to it "
                                             "when the policy now places them there "
                                             "(--no-rebalance-on-join: they stay)")
    stall_timeout_ms: int = opt(10_000, help="a worker that heartbeats but makes no engine "
                                             "progress on admitted work this long is dead; 0: off")
    router_event_port: int = opt(0, help="event-plane PUB port of this router (replica sync); "
                                         "0: any free port")
    replica_sync: bool = opt(True, help="share this router's placements with the other router "
                                        "replicas (--no-replica-sync: each counts only its own "
                                        "until load reports arrive)")
    frontend_timeout_ms: int = opt(3000, help="a frontend that pinged and has been silent "
                                              "this long is gone whatever its pings' history "
                                              "(earlier when they were regular: ~0.4 s); its "
                                              "requests are cancelled on the workers")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "be > 0", "heartbeat_interval_ms", "kv_ttl_s", "disagg_ttft_target_ms",
                "disagg_itl_target_ms", holds=lambda v: v > 0)
        require(self, "be >= 1", "missed_heartbeats", holds=lambda v: v >= 1)
        # The detector's own checks (its phi thresholds), at start-up rather than as a traceback.
        DetectorSettings.for_heartbeats(self.heartbeat_interval_ms / 1000, self.missed_heartbeats,
                                        suspect_phi=self.suspect_phi,
                                        convict_phi=self.convict_phi)
        if self.frontend_timeout_ms < self.heartbeat_interval_ms * self.missed_heartbeats:
            raise ValueError("--frontend-timeout-ms must be at least --heartbeat-interval-ms x "
                             "--missed-heartbeats")
        if self.kv_overlap_weight is not None and not self.kv_overlap_weight >= 0:
            raise ValueError(f"--kv-overlap-weight must be >= 0 (unset: the adaptive cost), got "
                             f"{self.kv_overlap_weight}")
        require(self, "be >= 0", "local_prefill_max_tokens", "prefill_busy_tokens",
                "decode_veto_requests", "disagg_lease_ms", "decode_overlap_weight",
                "router_temperature", "migration_limit", "no_worker_wait_ms",
                "prefill_fallback_after_ms", "stall_timeout_ms",
                "long_prefill_tokens", holds=lambda v: v >= 0)
        if self.hotspot_margin is not None and math.isnan(self.hotspot_margin):
            raise ValueError("--hotspot-margin must be a number (<0: off), got nan")
        if not 0 <= self.disagg_itl_miss_budget < 1:
            raise ValueError("--disagg-itl-miss-budget must lie in [0, 1), got "
                             f"{self.disagg_itl_miss_budget}")
        if not 0 < self.disagg_tail_quantile < 1:
            raise ValueError("--disagg-tail-quantile must lie in (0, 1), got "
                             f"{self.disagg_tail_quantile}")
        if not self.disagg_local_gain_ratio >= 1:
            raise ValueError("--disagg-local-gain-ratio must be >= 1, got "
                             f"{self.disagg_local_gain_ratio}")
        if not 0 <= self.local_prefill_max_ratio <= 1:
            raise ValueError("--local-prefill-max-ratio must lie in [0, 1], got "
                             f"{self.local_prefill_max_ratio}")
