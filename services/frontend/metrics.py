"""The frontend's HTTP-level Prometheus metrics (`turnout_frontend_*`), in their own registry.

Owns metric names, labels and buckets, and cheap per-model handles so a request touches no
label lookups on its hot path. Does not own router or worker metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2,
                0.5, 1.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class ModelMetrics:
    """The children of every per-model metric for one model, resolved once."""

    __slots__ = ("active", "cached_tokens", "disconnects", "input_tokens", "itl",
                 "output_tokens", "queued", "ttft")

    def __init__(self, metrics: FrontendMetrics, model: str) -> None:
        self.ttft = metrics.ttft.labels(model)
        self.itl = metrics.itl.labels(model)
        self.input_tokens = metrics.input_tokens.labels(model)
        self.output_tokens = metrics.output_tokens.labels(model)
        self.cached_tokens = metrics.cached_tokens.labels(model)
        self.active = metrics.active.labels(model)
        self.queued = metrics.queued.labels(model)
        self.disconnects = metrics.disconnects.labels(model)


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("turnout_frontend_requests", "HTTP requests finished",
                                ["model", "endpoint", "stream", "status"], registry=r)
        self.ttft = Histogram("turnout_frontend_time_to_first_token_seconds",
                              "Request arrival to its first generated token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("turnout_frontend_inter_token_latency_seconds",
                             "Mean gap between generated tokens, one sample per request",
                             ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.duration = Histogram("turnout_frontend_request_duration_seconds",
                                  "Request arrival to its last byte", ["model", "endpoint"],
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.input_tokens = Counter("turnout_frontend_input_tokens", "Prompt tokens",
                                    ["model"], registry=r)
        self.output_tokens = Counter("turnout_frontend_output_tokens", "Generated tokens",
                                     ["model"], registry=r)
        self.cached_tokens = Counter("turnout_frontend_cached_tokens",
                                     "Prompt tokens served from a prefix cache", ["model"],
                                     registry=r)
        self.active = Gauge("turnout_frontend_active_requests", "Requests being generated",
                            ["model"], registry=r)
        self.queued = Gauge("turnout_frontend_queued_requests",
                            "Requests sent upstream that have not had their first token yet",
                            ["model"], registry=r)
        self.disconnects = Counter("turnout_frontend_client_disconnects",
                                   "Requests whose client went away before the end", ["model"],
                                   registry=r)
        self.rejections = Counter("turnout_frontend_rejections",
                                  "Requests refused before generation, by reason", ["reason"],
                                  registry=r)
        self.errors = Counter("turnout_frontend_errors",
                              "Requests that ended in an error, by error type",
                              ["model", "endpoint", "error_type"], registry=r)
        # API keys (labelled by key id, never by the key) and HTTP limits.
        self.key_requests = Counter("turnout_frontend_key_requests",
                                    "Generation requests answered, by API key id and status",
                                    ["key_id", "status"], registry=r)
        self.key_rejections = Counter("turnout_frontend_key_rejections",
                                      "Requests an API key's limits refused, by reason",
                                      ["key_id", "reason"], registry=r)
        self.key_tokens = Counter("turnout_frontend_key_tokens",
                                  "Tokens used per API key, by kind (prompt, completion)",
                                  ["key_id", "kind"], registry=r)
        self.key_streams = Gauge("turnout_frontend_key_active_streams",
                                 "Generations in flight per API key", ["key_id"], registry=r)
        self.keys_loaded = Gauge("turnout_frontend_api_keys", "API keys in force", registry=r)
        self.keys_reload_errors = Counter("turnout_frontend_api_keys_reload_errors",
                                          "Keys-file changes that could not be applied (the "
                                          "previous keys stay in force)", registry=r)
        self.http_refusals = Counter("turnout_frontend_http_limit_refusals",
                                     "Connections cut by an HTTP limit before the request "
                                     "reached the API, by limit", ["limit"], registry=r)
        self.admission_active = Gauge("turnout_frontend_admission_active",
                                      "Admission slots taken: one per generation",
                                      registry=r)
        self.admission_waiting = Gauge("turnout_frontend_admission_waiting",
                                       "Requests waiting in the admission queue", registry=r)
        self._models: dict[str, ModelMetrics] = {}
        self._finished: dict[tuple[str, str, str, int], Counter] = {}
        self._durations: dict[tuple[str, str], Histogram] = {}

    def model(self, name: str) -> ModelMetrics:
        handle = self._models.get(name)
        if handle is None:
            handle = self._models[name] = ModelMetrics(self, name)
        return handle

    def finished(self, model: str, endpoint: str, stream: bool, status: int,
                 duration_s: float | None = None, error_type: str = "") -> None:
        """Count a finished request; `model` is "" when the request named no served model.
        `error_type` (a failed request's reason, e.g. "model_not_found", "upstream_error")
        counts it in the errors series too."""
        key = (model, endpoint, "true" if stream else "false", status)
        child = self._finished.get(key)
        if child is None:
            child = self._finished[key] = self.requests.labels(*key)
        child.inc()
        if error_type:
            self.errors.labels(model, endpoint, error_type).inc()
        if duration_s is not None:
            hist = self._durations.get((model, endpoint))
            if hist is None:
                hist = self._durations[(model, endpoint)] = self.duration.labels(model, endpoint)
            hist.observe(duration_s)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        """(exposition text, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
