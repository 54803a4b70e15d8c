"""Every flag of `turnout frontend`, with its TURNOUT_* fallback and default."""

from __future__ import annotations

import dataclasses
import os

from common.config import ProcessConfig, opt, require
from services.frontend.api_keys import ApiKeys
from services.frontend.images import ImageLimits
from services.frontend.reasoning import PARSERS as REASONING_PARSERS
from services.frontend.tool_calls import PARSERS

_MIB = 1024 * 1024
DEFAULT_MAX_QUEUED = 256
DEFAULT_QUEUE_TIMEOUT_S = 30.0


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
    router_resume_wait_ms: int = opt(5000, help="a stream whose router dropped, drained or "
                                                "left while no other router is reachable waits "
                                                "this long for one (the same router "
                                                "reconnecting, a new one registering) before it "
                                                "ends with an error; 0: it ends at once")
    api_key: str = opt("", help="when set, requests need 'Authorization: Bearer <key>' (one "
                                "unrestricted key; see --api-keys-file for more)")
    api_keys_file: str = opt("", help="JSON or YAML list of API keys with per-key model "
                                      "allow-lists and quotas (docs/security.md); re-read when "
                                      "it changes")
    api_keys_reload_s: float = opt(1.0, help="how often the keys file is checked for changes")
    max_body_bytes: int = opt(64 * _MIB, help="largest request body (larger: 413)")
    max_header_bytes: int = opt(64 * 1024, help="largest request line plus headers (larger: "
                                                "431)")
    max_headers: int = opt(100, help="most header fields in a request (more: 431)")
    header_timeout_s: float = opt(10.0, help="the request line and headers must arrive within "
                                             "this of the connection (or the request's first "
                                             "byte); else 408 and the connection is closed")
    body_timeout_s: float = opt(60.0, help="the request body must arrive within this of its "
                                           "headers (time the server waits before reading it "
                                           "not counted); else 408 and the connection is "
                                           "closed")
    max_prompt_tokens: int = opt(0, help="longest prompt accepted, in tokens (0: the context "
                                         "length only)")
    max_output_tokens: int = opt(0, help="largest max_tokens accepted, and the default's cap "
                                         "(0: the context length only)")
    max_active_requests: int = opt(0, help="generations in flight at once (a request for n "
                                           "completions runs n); more wait in the admission "
                                           "queue (0: no limit, no queue)")
    max_queued_requests: int = opt(DEFAULT_MAX_QUEUED, help="requests waiting for a slot when "
                                             "--max-active-requests is reached; beyond: 503 "
                                             "with Retry-After")
    queue_timeout_s: float = opt(DEFAULT_QUEUE_TIMEOUT_S,
                                 help="longest wait in the admission queue; then 503 with "
                                      "Retry-After")
    tool_call_parser: str = opt("",
                                help="the syntax the served model writes tool calls in "
                                     "(hermes: <tool_call> JSON, as Hermes and Qwen models do; "
                                     "llama3_json: a bare JSON object, as Llama 3.1+ do; "
                                     "pythonic: a Python list of calls, as Llama 3.2 and 4 "
                                     "do; qwen3_coder: <tool_call> <function=...> tags, as "
                                     "Qwen3-Coder and Qwen3.5 do; glm45, glm47: <tool_call> "
                                     "with <arg_key> tags, as GLM-4.5 to 4.7 do; "
                                     "deepseek_v31, kimi_k2: DeepSeek-V3.1's and Kimi K2's "
                                     "tool call tags); set, chat requests may send tools with "
                                     "tool_choice 'auto' and get the calls back as tool_calls")
    reasoning_parser: str = opt("",
                                help="how the served model marks its thinking (deepseek_r1, "
                                     "qwen3, glm45, glm47, kimi_k2: <think> ... </think>; "
                                     "deepseek_v3: the same when chat_template_kwargs turn "
                                     "thinking on); set, chat replies carry it apart from the "
                                     "answer, as 'reasoning'")
    stream_interval: int = opt(0, help="tokens per SSE event: 0 sends whatever piled up since "
                                       "the last event (fewer events under load); N exactly N "
                                       "per event (1: one event per token)")

    max_images_per_request: int = opt(8, help="most image parts in one chat request (more: 400)")
    max_image_pixels: int = opt(16_777_216, help="largest image accepted, in pixels (width x "
                                                 "height, checked before decoding; more: 400)")
    image_url_hosts: str = opt("", help="comma-separated hosts whose http(s) image URLs are "
                                        "fetched ('*': any); empty: image URLs are refused "
                                        "(data: URIs only)")
    image_fetch_timeout_s: float = opt(5.0, help="an image URL must be fetched within this, "
                                                 "else 400")
    image_fetch_max_bytes: int = opt(20 * _MIB, help="largest image fetched from a URL (larger: "
                                                     "400)")

    ssl_certfile: str = opt("", help="PEM certificate (chain): serve HTTPS instead of HTTP")
    ssl_keyfile: str = opt("", help="PEM private key of --ssl-certfile")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "be > 0", "heartbeat_interval_ms", holds=lambda v: v > 0)
        require(self, "be >= 1", "missed_heartbeats", holds=lambda v: v >= 1)
        if self.tool_call_parser not in ("", *PARSERS):
            raise ValueError(f"--tool-call-parser must be one of {', '.join(PARSERS)}, got "
                             f"{self.tool_call_parser!r}")
        if self.reasoning_parser not in ("", *REASONING_PARSERS):
            raise ValueError(f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)},"
                             f" got {self.reasoning_parser!r}")
        if self.stream_interval < 0:
            raise ValueError(f"--stream-interval must be >= 0 (0: merge what piled up), got "
                             f"{self.stream_interval}")
        require(self, "be at least 1", "max_body_bytes", "max_header_bytes", "max_headers",
                "max_images_per_request", "max_image_pixels", "image_fetch_max_bytes",
                holds=lambda v: v >= 1)
        require(self, "be positive", "api_keys_reload_s", "header_timeout_s", "body_timeout_s",
                "queue_timeout_s", "image_fetch_timeout_s", holds=lambda v: v > 0)
        require(self, "not be negative", "max_prompt_tokens", "max_output_tokens",
                "max_active_requests", "max_queued_requests", "router_resume_wait_ms",
                holds=lambda v: v >= 0)
        if not self.max_active_requests:
            for name, default in (("max_queued_requests", DEFAULT_MAX_QUEUED),
                                  ("queue_timeout_s", DEFAULT_QUEUE_TIMEOUT_S)):
                if getattr(self, name) != default:
                    raise ValueError(f"--{name.replace('_', '-')} needs --max-active-requests "
                                     "(without it nothing waits)")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        for name in ("api_keys_file", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"--{name.replace('_', '-')}: no such file: {path}")
        if any(not h.strip() for h in self.image_url_hosts.split(",")) and self.image_url_hosts:
            raise ValueError(f"--image-url-hosts: an empty host name in {self.image_url_hosts!r}")
        if self.api_keys_file:
            ApiKeys(self.api_keys_file)  # a file that does not parse: one clear line, exit 2

    def image_limits(self) -> ImageLimits:
        hosts = frozenset(h.strip().lower() for h in self.image_url_hosts.split(",") if h.strip())
        return ImageLimits(self.max_images_per_request, self.max_image_pixels, hosts,
                           self.image_fetch_timeout_s, self.image_fetch_max_bytes)
