"""Every flag of `turnout router`, with its TURNOUT_* fallback and default."""

from __future__ import annotations

import dataclasses

from common.block_hash import DEFAULT_SEED
from common.config import ProcessConfig, opt

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
    # 16, measured: on the Mooncake trace (4 mocker workers, Dynamo's engine model) weight 1
    # lets long prompts' decode load outvote prefix overlap (8.5% hits, Dynamo's level);
    # 16 reached 10.6-11.3% with a lower TTFT p50 (bench/kv_routing.py).
    kv_overlap_weight: float = opt(16.0, help="kv mode: weight of blocks to prefill against "
                                              "active decode blocks in the cost")
    router_temperature: float = opt(0.0, help="kv mode: softmax temperature over costs; 0: "
                                              "always the cheapest worker")
    hotspot_margin: float = opt(0.5, help="kv mode: a worker loaded more than (1+margin)x the "
                                          "mean is skipped, whatever its overlap; <0: off")
    kv_events: bool = opt(True, help="kv mode: index workers' KV events; --no-kv-events "
                                     "predicts caches from the router's own decisions")
    kv_ttl_s: float = opt(120.0, help="--no-kv-events: how long a routed prefix counts as cached")
    hash_seed: int = opt(DEFAULT_SEED, help="seed of the KV block hashes (must match workers)")
    no_worker_wait_ms: int = opt(3000, help="a request for a model no worker serves yet waits "
                                            "this long for one to appear before a 503")
    stall_timeout_ms: int = opt(10_000, help="a worker that heartbeats but makes no engine "
                                             "progress on admitted work this long is dead; 0: off")
