"""Every flag of `turnout frontend`, with its TURNOUT_* fallback and default."""

from __future__ import annotations

import dataclasses

from common.config import ProcessConfig, opt


@dataclasses.dataclass
class FrontendConfig(ProcessConfig):
    """Frontend process."""

    port: int = opt(8000, help="HTTP port of the OpenAI API")
    frontend_id: str = opt("", help="unique instance id (default: frontend-<pid>-<random>)")
    max_model_len: int = opt(0, help="context length the API enforces; 0: the smallest any "
                                     "worker of the model reports")
    heartbeat_interval_ms: int = opt(100, help="period of the pings to each router (routers "
                                               "answer them; a silent router is hung)")
    missed_heartbeats: int = opt(3, help="a router that answered pings and then stays silent "
                                         "this many periods is hung: its streams resume through "
                                         "another router")
    api_key: str = opt("", help="when set, requests need 'Authorization: Bearer <key>'")

    def __post_init__(self) -> None:
        if self.heartbeat_interval_ms <= 0:
            raise ValueError("--heartbeat-interval-ms must be > 0")
        if self.missed_heartbeats < 1:
            raise ValueError("--missed-heartbeats must be >= 1")
