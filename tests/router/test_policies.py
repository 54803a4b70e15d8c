"""The load-blind policies and the selector: one decide/commit interface for every mode, a
target honoured in every mode, and commits that are the only thing changing state."""

from __future__ import annotations

import pytest

from common.block_hash import DEFAULT_SEED
from common.messages import LoadReport
from services.router.approx_kv_index import ApproxKvIndex
from services.router.args import RouterConfig
from services.router.kv_policy import KvAwarePolicy
from services.router.metrics import RouterMetrics
from services.router.policies import (
    Direct,
    LeastLoaded,
    NoWorkerError,
    RandomChoice,
    RoundRobin,
    RoutingError,
    make_policy,
)
from services.router.selection import Selector, build_selection
from tests.router.fakes import FakeClock, counter, histogram_count, pool_of, request, worker


def test_round_robin_advances_only_on_commit() -> None:
    ws = [worker("a"), worker("b"), worker("c")]
    p = RoundRobin()
    assert p.decide(request(), ws).worker.id == p.decide(request(), ws).worker.id == "b"
    chosen = []
    for _ in range(4):
        d = p.decide(request(), ws)
        p.commit(d)
        chosen.append(d.worker.id)
    assert chosen == ["b", "c", "a", "b"]


def test_load_blind_policies_prefer_kv_holders_and_report_their_overlap() -> None:
    ws = [worker("a"), worker("b"), worker("c")]
    for p in (RoundRobin(), RandomChoice(seed=1), LeastLoaded()):
        for _ in range(5):
            d = p.decide(request(tokens=12), ws, hint={"c": 2, "a": 0})
            p.commit(d)
            assert (d.worker.id, d.overlap, d.request_blocks, d.policy) == ("c", 2, 3, p.name)
        assert p.decide(request(), ws, hint={"x": 3}).overlap == 0  # no holder among them


def test_random_is_seeded_and_covers_every_worker() -> None:
    ws = [worker("a"), worker("b"), worker("c")]
    first = [RandomChoice(seed=5).decide(request(), ws).worker.id for _ in range(3)]
    p, q = RandomChoice(seed=5), RandomChoice(seed=5)
    picks = [p.decide(request(), ws).worker.id for _ in range(60)]
    assert picks == [q.decide(request(), ws).worker.id for _ in range(60)]
    assert set(picks) == {"a", "b", "c"} and len(first) == 3


def test_least_loaded_counts_requests_then_kv_and_rotates_ties() -> None:
    a, b, c = worker("a"), worker("b"), worker("c")
    a.usage.requests.update({"x", "y"})
    b.usage.requests.add("z")
    c.usage.requests.add("w")
    c.load = LoadReport("c", 0, 0, 9, 100, 0, 1)
    p = LeastLoaded()
    assert p.decide(request(), [a, b, c]).worker is b  # b and c have 1; c's KV use is higher
    c.load = None
    a.usage.requests.clear()
    a.usage.requests.add("y")
    chosen = []
    for _ in range(4):
        d = p.decide(request(), [a, b, c])
        p.commit(d)
        chosen.append(d.worker.id)
    assert chosen == ["b", "c", "a", "b"]  # equal loads: the start of the list rotates


def test_direct_needs_a_target() -> None:
    with pytest.raises(RoutingError, match="x-worker-instance-id") as err:
        Direct().decide(request(), [worker("a")])
    assert err.value.code == 400
    d = Direct().decide(request(target="a"), [worker("b"), worker("a")])
    assert (d.worker.id, d.policy, d.request_blocks) == ("a", "direct", 2)


def test_make_policy_knows_every_load_blind_mode() -> None:
    for mode in ("round-robin", "random", "least-loaded", "direct"):
        assert make_policy(mode).name == mode
    with pytest.raises(ValueError, match="unknown router mode 'kv2'"):
        make_policy("kv2")


def test_selector_candidates_serve_the_model_and_are_routable() -> None:
    a, b, other = worker("a"), worker("b"), worker("o", model="other")
    b.routable = False
    sel = Selector(pool_of(a, b, other), RoundRobin(), RouterMetrics("r"))
    assert sel.candidates("m") == [a]
    with pytest.raises(NoWorkerError, match="no live worker serves model 'm'") as err:
        sel.candidates("m", exclude="a")
    assert err.value.code == 503


def test_selector_choose_commits_and_counts_by_policy() -> None:
    metrics = RouterMetrics("r")
    sel = Selector(pool_of(worker("a"), worker("b")), RoundRobin(), metrics)
    assert sel.decide(request()).worker.id == "b"
    assert counter(metrics.decisions, "round-robin") == 0
    assert [sel.choose(request()).worker.id for _ in range(3)] == ["b", "a", "b"]
    assert sel.choose(request(target="a")).worker.id == "a"  # a target wins in every mode
    assert counter(metrics.decisions, "round-robin") == 3
    assert counter(metrics.decisions, "direct") == 1
    assert histogram_count(metrics.decision_seconds) == 4
    assert sel.choose(request()).worker.id == "a"  # the direct choice took no turn


def test_selector_in_kv_mode_records_predictions_and_overlap_on_commit_only() -> None:
    clock = FakeClock()
    approx = ApproxKvIndex(ttl_s=60, clock=clock)
    metrics = RouterMetrics("r")
    a, b = worker("a"), worker("b")
    sel = Selector(pool_of(a, b), KvAwarePolicy(approx), metrics, approx, DEFAULT_SEED)
    preview = sel.decide(request())
    assert approx.find_matches(preview.hashes) == {}
    assert histogram_count(metrics.overlap) == 0 and a.last_chosen == b.last_chosen == 0
    d = sel.choose(request())
    assert approx.find_matches(d.hashes) == {d.worker.id: 2}
    assert histogram_count(metrics.overlap) == 1 and d.worker.last_chosen == 1
    again = sel.choose(request())
    assert again.worker is d.worker and again.overlap == 2  # the prediction is used
    # A gateway's choice is a prediction too.
    other = b if d.worker is a else a
    t = sel.choose(request("r2", tokens=12, target=other.id))
    assert t.policy == "direct" and approx.find_matches(t.hashes) == {
        other.id: 3, d.worker.id: 2}
    assert counter(metrics.decisions, "kv") == 2 and counter(metrics.decisions, "direct") == 1
    assert histogram_count(metrics.overlap) == 2  # not observed for the direct choice


def test_build_selection_per_mode() -> None:
    pool, metrics = pool_of(), RouterMetrics("r")
    sel, index = build_selection(RouterConfig(router_mode="kv"), pool, metrics)
    assert sel.name == "kv" and index is not None and sel.approx_index is None
    sel, index = build_selection(RouterConfig(router_mode="kv", kv_events=False), pool, metrics)
    assert sel.name == "kv" and index is None and sel.approx_index is not None
    sel, index = build_selection(RouterConfig(router_mode="least-loaded"), pool, metrics)
    assert sel.name == "least-loaded" and index is None and sel.approx_index is None
    assert sel.cost_models is None


def test_kv_mode_costs_adaptively_unless_a_weight_is_given() -> None:
    pool, metrics = pool_of(), RouterMetrics("r")
    sel, _ = build_selection(RouterConfig(router_mode="kv"), pool, metrics)
    assert isinstance(sel.policy, KvAwarePolicy) and sel.cost_models is not None
    assert sel.policy.overlap_weight is None and sel.policy.hotspot_margin == -1
    sel, _ = build_selection(RouterConfig(router_mode="kv", kv_overlap_weight=16.0), pool,
                             metrics)
    assert isinstance(sel.policy, KvAwarePolicy) and sel.cost_models is None
    assert sel.policy.overlap_weight == 16.0 and sel.policy.hotspot_margin == 0.5
    sel, _ = build_selection(RouterConfig(router_mode="kv", hotspot_margin=0.25), pool, metrics)
    assert isinstance(sel.policy, KvAwarePolicy) and sel.cost_models is not None
    assert sel.policy.hotspot_margin == 0.25  # an explicit guard applies to either cost


def test_a_negative_overlap_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="--kv-overlap-weight must be >= 0"):
        RouterConfig(kv_overlap_weight=-1.0)


@pytest.mark.parametrize(("bad", "flag"), [
    ({"router_temperature": -1.0}, "--router-temperature"),
    ({"router_temperature": float("nan")}, "--router-temperature"),
    ({"hotspot_margin": float("nan")}, "--hotspot-margin"),
    ({"decode_overlap_weight": float("nan")}, "--decode-overlap-weight"),
])
def test_kv_policy_settings_that_would_be_ignored_are_refused(bad: dict[str, float],
                                                              flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        RouterConfig(**bad)  # type: ignore[arg-type]
