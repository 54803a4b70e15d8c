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
    api_key: str = opt("", help="when set, requests need 'Authorization: Bearer <key>'")
    stream_interval: int = opt(0, help="tokens per SSE event: 0 sends whatever piled up since "
                                       "the last event (fewer events under load); N exactly N "
                                       "per event (1: one event per token)")

    def __post_init__(self) -> None:
        if self.stream_interval < 0:
            raise ValueError(f"--stream-interval must be >= 0 (0: merge what piled up), got "
                             f"{self.stream_interval}")
