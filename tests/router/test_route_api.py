"""POST /v1/route: body validation, the answer, and that a preview commits nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.block_hash import DEFAULT_SEED
from services.router.approx_kv_index import ApproxKvIndex
from services.router.kv_policy import KvAwarePolicy
from services.router.metrics import RouterMetrics
from services.router.policies import Direct, RoundRobin
from services.router.route_api import RouteApi
from services.router.selection import Selector
from tests.router.fakes import FakeClock, counter, histogram_count, pool_of, request, worker


def ask(api: RouteApi, body: Any) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, ctype, out = api.handle(raw)
    assert ctype == "application/json"
    return status, json.loads(out)


@pytest.mark.parametrize(("body", "error"), [
    (b"{nope", "body is not JSON"),
    ([1, 2], "'model' must be a non-empty string"),
    ({"prompt_token_ids": [1]}, "'model' must be a non-empty string"),
    ({"model": "", "prompt_token_ids": [1]}, "'model' must be a non-empty string"),
    ({"model": 3, "prompt_token_ids": [1]}, "'model' must be a non-empty string"),
    ({"model": "m"}, "'prompt_token_ids' must be a non-empty list"),
    ({"model": "m", "prompt_token_ids": []}, "'prompt_token_ids' must be a non-empty list"),
    ({"model": "m", "prompt_token_ids": "1 2"}, "'prompt_token_ids' must be a non-empty list"),
    ({"model": "m", "prompt_token_ids": [1, True]}, "must be a non-empty list of token ids"),
    ({"model": "m", "prompt_token_ids": [1, -1]}, "must be a non-empty list of token ids"),
    ({"model": "m", "prompt_token_ids": [1 << 32]}, "must be a non-empty list of token ids"),
    ({"model": "m", "prompt_token_ids": [1.0]}, "must be a non-empty list of token ids"),
    ({"model": "m", "prompt_token_ids": [1], "cache_salt": ""}, "'cache_salt' must be"),
    ({"model": "m", "prompt_token_ids": [1], "cache_salt": 1}, "'cache_salt' must be"),
])
def test_bad_bodies_are_a_400_that_says_why(body: Any, error: str) -> None:
    metrics = RouterMetrics("r")
    api = RouteApi(Selector(pool_of(worker("a")), RoundRobin(), metrics), metrics)
    status, answer = ask(api, body)
    assert status == 400 and error in answer["error"]
    assert counter(metrics.route_queries, "rejected") == 1


def test_no_worker_for_the_model_is_a_503() -> None:
    metrics = RouterMetrics("r")
    api = RouteApi(Selector(pool_of(worker("a")), RoundRobin(), metrics), metrics)
    status, answer = ask(api, {"model": "other", "prompt_token_ids": [1]})
    assert (status, answer) == (503, {"error": "no live worker serves model 'other'"})
    assert counter(metrics.route_queries, "no_worker") == 1


def test_a_policy_that_cannot_answer_is_a_400() -> None:
    metrics = RouterMetrics("r")
    api = RouteApi(Selector(pool_of(worker("a")), Direct(), metrics), metrics)
    status, answer = ask(api, {"model": "m", "prompt_token_ids": [1]})
    assert status == 400 and "x-worker-instance-id" in answer["error"]
    assert counter(metrics.route_queries, "rejected") == 1


def test_the_answer_names_the_worker_and_the_prediction() -> None:
    clock = FakeClock()
    approx = ApproxKvIndex(ttl_s=60, clock=clock)
    metrics = RouterMetrics("r")
    a = worker("a", events="tcp://a:2", metrics="http://a:3/metrics")
    b, other = worker("b"), worker("o", model="other")
    selector = Selector(pool_of(a, b, other), KvAwarePolicy(approx), metrics, approx,
                        DEFAULT_SEED)
    api = RouteApi(selector, metrics)
    committed = selector.choose(request(tokens=8, target="a"))
    status, answer = ask(api, {"model": "m", "prompt_token_ids": list(range(100, 110))})
    assert status == 200
    assert answer == {
        "worker_id": "a", "endpoint": "a:1", "model": "m", "policy": "kv",
        "endpoints": {"request": "tcp://a:1", "events": "tcp://a:2",
                      "metrics": "http://a:3/metrics"},
        "request_blocks": 3, "overlap_blocks": 2, "cost": 1.0, "candidates": 2}
    assert counter(metrics.route_queries, "ok") == 1 and committed.worker is a
    # A salted request shares no blocks with the unsalted one placed on a.
    status, answer = ask(api, {"model": "m", "prompt_token_ids": list(range(100, 110)),
                               "cache_salt": "tenant-a"})
    assert status == 200 and answer["overlap_blocks"] == 0


def test_a_preview_commits_nothing() -> None:
    clock = FakeClock()
    approx = ApproxKvIndex(ttl_s=60, clock=clock)
    metrics = RouterMetrics("r")
    a, b = worker("a"), worker("b")
    selector = Selector(pool_of(a, b), KvAwarePolicy(approx), metrics, approx, DEFAULT_SEED)
    api = RouteApi(selector, metrics)
    answers = [ask(api, {"model": "m", "prompt_token_ids": list(range(100, 108))})[1]
               for _ in range(3)]
    assert [x["worker_id"] for x in answers] == ["a", "a", "a"]  # no turn was taken
    assert all(x["overlap_blocks"] == 0 for x in answers)  # no prediction was recorded
    assert a.last_chosen == b.last_chosen == 0
    assert counter(metrics.decisions, "kv") == 0
    assert histogram_count(metrics.decision_seconds) == 0
    assert histogram_count(metrics.overlap) == 0
    assert approx.find_matches(selector.decide(request()).hashes) == {}
    # A real decision after the previews is the one the preview announced.
    assert selector.choose(request()).worker.id == answers[0]["worker_id"]


def test_a_round_robin_preview_takes_no_turn() -> None:
    metrics = RouterMetrics("r")
    selector = Selector(pool_of(worker("a"), worker("b")), RoundRobin(), metrics)
    api = RouteApi(selector, metrics)
    for _ in range(3):
        assert ask(api, {"model": "m", "prompt_token_ids": [1]})[1]["worker_id"] == "b"
    assert selector.choose(request()).worker.id == "b"
    assert ask(api, {"model": "m", "prompt_token_ids": [1]})[1]["worker_id"] == "a"
