"""POST /v1/route: which worker this router would pick for `{"model", "prompt_token_ids"}`
(and the request's `cache_salt`, if it has one), without sending anything or committing the
decision (for a gateway's endpoint picker)."""

from __future__ import annotations

import msgspec

from common.messages import GenerateRequest, SamplingParams
from common.status_server import Response, json_response
from services.router.metrics import RouterMetrics
from services.router.policies import NoWorkerError, RoutingError
from services.router.selection import Selector


class RouteApi:
    def __init__(self, selector: Selector, metrics: RouterMetrics) -> None:
        self.selector = selector
        self.metrics = metrics

    def handle(self, body: bytes) -> Response:
        try:
            query = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            return self._reply(400, "rejected", {"error": f"body is not JSON: {exc}"})
        model = query.get("model") if isinstance(query, dict) else None
        ids = query.get("prompt_token_ids") if isinstance(query, dict) else None
        if not isinstance(model, str) or not model:
            return self._reply(400, "rejected", {"error": "'model' must be a non-empty string"})
        if not isinstance(ids, list) or not ids or not all(
                type(t) is int and 0 <= t < 1 << 32 for t in ids):
            return self._reply(400, "rejected", {
                "error": "'prompt_token_ids' must be a non-empty list of token ids (ints)"})
        salt = query.get("cache_salt", "")
        if not isinstance(salt, str) or ("cache_salt" in query and not salt):
            return self._reply(400, "rejected", {
                "error": "'cache_salt' must be a non-empty string if given"})
        request = GenerateRequest("route-query", model, ids, SamplingParams(max_tokens=1),
                                  cache_salt=salt)
        try:
            decision = self.selector.decide(request)
        except RoutingError as exc:
            outcome = "no_worker" if isinstance(exc, NoWorkerError) else "rejected"
            return self._reply(exc.code, outcome, {"error": str(exc)})
        worker = decision.worker
        request_ep = worker.instance.endpoints.get("request", "")
        return self._reply(200, "ok", {
            "worker_id": worker.id,
            "endpoint": request_ep.split("://", 1)[-1],
            "endpoints": worker.instance.endpoints,
            "model": model,
            "policy": self.selector.name,
            "request_blocks": decision.request_blocks,
            "overlap_blocks": decision.overlap,
            "cost": decision.cost,
            "candidates": len(self.selector.pool.routable(model)),
        })

    def _reply(self, status: int, outcome: str, body: dict[str, object]) -> Response:
        self.metrics.route_queries.labels(outcome).inc()
        return json_response(status, msgspec.json.encode(body))
