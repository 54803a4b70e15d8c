"""Gateway API Inference Extension hooks through real processes: the frontend honours
`x-gateway-destination-endpoint`, and the router answers an endpoint picker's `POST /v1/route`
without sending anything."""

from __future__ import annotations

import httpx
import openai
import pytest

from services.frontend.tokenizer import ByteTokenizer
from turnout.testing.deployment import Deployment, wait_for

pytestmark = pytest.mark.e2e

HEADER = "x-gateway-destination-endpoint"


def served(dep: Deployment, worker_id: str) -> float:
    return dep.metrics_of(worker_id).value("turnout_worker_requests_total", outcome="length")


def host_port(dep: Deployment, worker_id: str, endpoint: str) -> str:
    record = dep.record(worker_id)
    assert record is not None
    return record["endpoints"][endpoint].split("://", 1)[1].split("/", 1)[0]


def router_url(dep: Deployment, path: str) -> str:
    router = next(r for r in dep.records() if r["role"] == "router")
    return router["endpoints"]["http"] + path


def test_direct_mode_routes_to_the_named_endpoint(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "0"),
                     router_args=("--router-mode", "direct"))
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=30)

    def complete(headers: dict[str, str]) -> None:
        out = oai.completions.create(model="mock", prompt="hello", max_tokens=3,
                                     extra_body={"ignore_eos": True}, extra_headers=headers)
        assert out.usage is not None and out.usage.completion_tokens == 3

    w2 = host_port(deployment, "w2", "request")
    for _ in range(3):
        complete({HEADER: w2})
    assert served(deployment, "w2") == 3 and served(deployment, "w1") == 0
    # Any endpoint of the pod names it (an InferencePool's target port may be the metrics one).
    complete({HEADER: host_port(deployment, "w1", "metrics")})
    assert served(deployment, "w1") == 1
    # A list is primary first, then fallbacks: the first one that is a live worker wins.
    complete({HEADER: f"127.0.0.1:1, {w2}"})
    assert served(deployment, "w2") == 4
    # The instance-id header still works, and wins over the endpoint.
    complete({"x-worker-instance-id": "w1", HEADER: w2})
    assert served(deployment, "w1") == 2

    with pytest.raises(openai.BadRequestError) as unknown:
        complete({HEADER: "127.0.0.1:1"})
    assert unknown.value.status_code == 400
    assert "'127.0.0.1:1' names no live worker" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as malformed:
        complete({HEADER: "not-an-endpoint"})
    assert "x-gateway-destination-endpoint must be IP:PORT" in malformed.value.message
    with pytest.raises(openai.BadRequestError) as missing:
        complete({})
    assert "x-gateway-destination-endpoint" in missing.value.message
    with pytest.raises(openai.BadRequestError):
        complete({"x-worker-instance-id": "w9"})
    assert served(deployment, "w1") + served(deployment, "w2") == 6
    errors = deployment.frontend_metrics().value("turnout_frontend_errors_total")
    assert errors == 4


def test_route_endpoint_names_the_worker_holding_the_prefix(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=("--speedup-ratio", "0"),
                     router_args=("--router-mode", "kv"))
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=30)
    doc = "An endpoint picker asks the router where this prefix is cached. " * 12
    ids = ByteTokenizer().encode(doc)
    full_blocks = len(ids) // 64
    oai.completions.create(model="mock", prompt=doc, max_tokens=2)
    holder = "w1" if served(deployment, "w1") == 1 else "w2"
    other = "w2" if holder == "w1" else "w1"
    router = deployment.router.instance_id
    wait_for(lambda: deployment.metrics_of(router).value("turnout_router_kv_events_applied_total")
             > 0, 5, "KV events")
    decisions = deployment.metrics_of(router).value("turnout_router_decisions_total")

    url = router_url(deployment, "/v1/route")
    answer = httpx.post(url, json={"model": "mock", "prompt_token_ids": ids}, timeout=5)
    assert answer.status_code == 200, answer.text
    choice = answer.json()
    assert choice["worker_id"] == holder
    assert choice["endpoint"] == host_port(deployment, holder, "request")
    assert choice["overlap_blocks"] == full_blocks
    assert choice["request_blocks"] == -(-len(ids) // 64)
    assert choice["policy"] == "kv" and choice["candidates"] == 2
    assert isinstance(choice["cost"], float)
    # A different prefix has no overlap anywhere.
    fresh = httpx.post(url, timeout=5, json={"model": "mock",
                                             "prompt_token_ids": list(range(1, 300))}).json()
    assert fresh["overlap_blocks"] == 0
    # Nothing was sent and no routing decision was counted.
    assert served(deployment, holder) == 1 and served(deployment, other) == 0
    m = deployment.metrics_of(router)
    assert m.value("turnout_router_decisions_total") == decisions
    assert m.value("turnout_router_route_queries_total", outcome="ok") == 2

    # The picker's answer, sent back as the gateway header: served there, from its cache.
    out = oai.completions.create(model="mock", prompt=doc, max_tokens=2,
                                 extra_headers={HEADER: choice["endpoint"]})
    assert served(deployment, holder) == 2
    assert out.usage is not None and out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens == full_blocks * 64

    # Bad queries get a 4xx with a reason; the router stays up.
    for body, status in ((b"{not json", 400), (b"[1, 2]", 400),
                         (b'{"model": "mock"}', 400),
                         (b'{"model": "mock", "prompt_token_ids": ["a"]}', 400),
                         (b'{"model": "mock", "prompt_token_ids": []}', 400),
                         (b'{"model": "", "prompt_token_ids": [1]}', 400),
                         (b'{"model": "other", "prompt_token_ids": [1]}', 503)):
        bad = httpx.post(url, content=body, timeout=5)
        assert bad.status_code == status, (body, bad.text)
        assert bad.json()["error"]
    assert httpx.get(url, timeout=5).status_code == 405
    assert httpx.post(router_url(deployment, "/metrics"), content=b"x", timeout=5).status_code \
        == 405
    assert httpx.get(router_url(deployment, "/health"), timeout=5).status_code == 200
