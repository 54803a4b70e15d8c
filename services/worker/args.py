"""Every flag of `turnout worker`, with its TURNOUT_* fallback and default."""

from __future__ import annotations

import dataclasses

from common.config import ProcessConfig, opt

ENGINES = ["mocker", "vllm", "sglang", "trtllm"]


@dataclasses.dataclass
class WorkerConfig(ProcessConfig):
    engine: str = opt("mocker", help="inference engine behind this worker", choices=ENGINES)
    worker_id: str = opt("", help="unique instance id (default: worker-<pid>-<random>)")
    worker_mode: str = opt("aggregated", choices=["aggregated", "prefill", "decode"],
                           help="disaggregation role")
    worker_port: int = opt(0, help="request-plane port (0: any free port)")
    worker_event_port: int = opt(0, help="event-plane PUB port (0: any free port)")
    worker_metrics_port: int = opt(0, help="/metrics and /health port (0: any free port)")
    heartbeat_interval_ms: int = opt(100, help="heartbeat and load report period")
    kv_replicas: int = opt(0, help="copy every newly completed KV block to this many peers, so "
                                   "a request's KV survives its worker")
    host_kv_blocks: int = opt(65536, help="capacity of the host-memory tier holding peers' "
                                          "replicated blocks")
    drain_grace_s: float = opt(30.0, help="on SIGTERM, how long streams may run before migrating")
