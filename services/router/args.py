"""Every flag of `turnout router`, with its TURNOUT_* fallback and default."""

from __future__ import annotations

import dataclasses

from common.config import ProcessConfig, opt

ROUTER_MODES = ["round-robin", "random", "least-loaded", "direct"]


@dataclasses.dataclass
class RouterConfig(ProcessConfig):
    router_id: str = opt("", help="unique instance id (default: router-<pid>-<random>)")
    router_mode: str = opt("round-robin", choices=ROUTER_MODES, help="how a worker is chosen")
    router_port: int = opt(0, help="request-plane port frontends connect to (0: any free port)")
    router_metrics_port: int = opt(0, help="/metrics and /health port (0: any free port)")
    heartbeat_interval_ms: int = opt(100, help="workers' heartbeat period")
    missed_heartbeats: int = opt(3, help="a worker silent this many periods is declared dead")
    migration_limit: int = opt(3, help="times one request may move to another worker; 0: never")
