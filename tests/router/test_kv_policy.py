"""The kv policy: block and adaptive costs, tie-breaks, temperature, hotspot guard, stale load
reports, hints."""

from __future__ import annotations

import math
import random

import pytest

from common.messages import LoadReport
from services.router.cost_model import CostModels, WorkerLoad
from services.router.kv_policy import KvAwarePolicy, load_of, worker_load
from services.router.worker_pool import WorkerHandle
from tests.router.fakes import request, worker


class FixedIndex:
    """A prefix index that knows a fixed overlap per worker."""

    def __init__(self, overlaps: dict[str, int] | None = None) -> None:
        self.overlaps = overlaps or {}
        self.asked: list[list[int]] = []

    def find_matches(self, hashes: list[int]) -> dict[str, int]:
        self.asked.append(hashes)
        return dict(self.overlaps)


def policy(overlaps: dict[str, int] | None = None, **kw: float) -> KvAwarePolicy:
    kw.setdefault("hotspot_margin", -1)
    return KvAwarePolicy(FixedIndex(overlaps), **kw)  # type: ignore[arg-type]


def report(prefill_tokens: int = 0, decode_blocks: int = 0) -> LoadReport:
    return LoadReport("w", decode_blocks, prefill_tokens, 0, 100, 0, 0)


def test_cost_is_weighted_prefill_plus_decode() -> None:
    a, b = worker("a"), worker("b")
    a.usage.active_blocks = 10  # decode load
    b.usage.pending_prefill_blocks = 1  # queued prefill
    # 8 tokens, block size 4: 2 blocks; a caches both, b none.
    d = policy({"a": 2}, overlap_weight=3).decide(request(tokens=8), [a, b])
    # a: 3*(2-2+0)+10 = 10; b: 3*(2-0+1)+0 = 9
    assert (d.worker.id, d.cost, d.overlap, d.request_blocks) == ("b", 9.0, 0, 2)
    assert d.policy == "kv" and len(d.hashes) == 2
    d = policy({"a": 2}, overlap_weight=4).decide(request(tokens=8), [a, b])
    # a: 10; b: 4*3 = 12
    assert (d.worker.id, d.cost, d.overlap) == ("a", 10.0, 2)


def test_partial_last_block_counts() -> None:
    d = policy().decide(request(tokens=9), [worker("a")])
    assert d.request_blocks == 3 and len(d.hashes) == 2  # only full blocks are hashed


def test_generated_tokens_count_after_a_migration() -> None:
    d = policy().decide(request(tokens=8, generated=4), [worker("a")])
    assert d.request_blocks == 3 and len(d.hashes) == 3


def test_tie_goes_to_the_less_loaded_worker() -> None:
    a, b = worker("a"), worker("b")
    b.usage.active_blocks = 1  # b: 1*(2-1)+1 = 2 ; a: 1*(2-0) = 2
    for order in ([a, b], [b, a]):
        d = policy({"b": 1}, overlap_weight=1).decide(request(), order)
        assert d.cost == 2.0 and d.worker is a


def test_tie_between_equal_loads_goes_to_the_one_chosen_longest_ago() -> None:
    a, b = worker("a"), worker("b")
    a.last_chosen, b.last_chosen = 5, 3
    assert policy().decide(request(), [a, b]).worker is b
    a.last_chosen, b.last_chosen = 3, 5
    assert policy().decide(request(), [a, b]).worker is a


def test_tie_between_equal_loads_goes_to_the_one_caching_more_before_recency() -> None:
    # Weight 0: the cost ignores the prefix, as a flat adaptive fit would; b was chosen longest
    # ago, but a caches the prompt.
    a, b = worker("a"), worker("b")
    a.last_chosen, b.last_chosen = 5, 1
    d = policy({"a": 2}, overlap_weight=0).decide(request(tokens=8), [a, b])
    assert (d.worker.id, d.overlap) == ("a", 2)


def test_commit_rotates_equal_choices_and_decide_alone_does_not() -> None:
    a, b, c = worker("a"), worker("b"), worker("c")
    p = policy()
    first = p.decide(request(), [a, b, c])
    assert p.decide(request(), [a, b, c]).worker is first.worker  # nothing committed
    assert (a.last_chosen, b.last_chosen, c.last_chosen) == (0, 0, 0)
    chosen = []
    for _ in range(6):
        d = p.decide(request(), [a, b, c])
        p.commit(d)
        chosen.append(d.worker.id)
    assert chosen == ["a", "b", "c", "a", "b", "c"]
    assert a.last_chosen == 4 and c.last_chosen == 6


def test_temperature_draws_from_a_softmax_over_normalised_costs() -> None:
    a, b, c = worker("a"), worker("b"), worker("c")
    a.usage.active_blocks, b.usage.active_blocks, c.usage.active_blocks = 0, 2, 4
    temperature = 0.7
    p = policy(temperature=temperature, rng=random.Random(11))  # type: ignore[arg-type]
    picks = [p.decide(request(), [a, b, c]).worker.id for _ in range(200)]
    costs = [16 * 2 + 0, 16 * 2 + 2, 16 * 2 + 4]
    weights = [math.exp(-(x - costs[0]) / 4 / temperature) for x in costs]
    ref = random.Random(11)
    expected = ["abc"[ref.choices(range(3), weights=weights)[0]] for _ in range(200)]
    assert picks == expected
    assert set(picks) == {"a", "b", "c"} and picks.count("a") > picks.count("c")


def test_temperature_with_equal_costs_is_uniform() -> None:
    p = policy(temperature=1.0, rng=random.Random(3))  # type: ignore[arg-type]
    ws = [worker("a"), worker("b")]
    picks = {p.decide(request(), ws).worker.id for _ in range(50)}
    assert picks == {"a", "b"}


def test_hotspot_guard_skips_a_worker_loaded_above_the_mean() -> None:
    hot, cold = worker("hot"), worker("cold")
    hot.usage.active_blocks = 30  # mean 15; cap 1.5*15 + 2 = 24.5
    guarded = KvAwarePolicy(FixedIndex({"hot": 2}), overlap_weight=100,  # type: ignore[arg-type]
                            hotspot_margin=0.5)
    assert guarded.decide(request(), [hot, cold]).worker is cold
    unguarded = KvAwarePolicy(FixedIndex({"hot": 2}), overlap_weight=100,  # type: ignore[arg-type]
                              hotspot_margin=-1)
    assert unguarded.decide(request(), [hot, cold]).worker is hot
    hot.usage.active_blocks = 8  # mean 4; cap 1.5*4 + 2 = 8: within, so overlap wins
    assert guarded.decide(request(), [hot, cold]).worker is hot
    hot.usage.active_blocks = 9  # cap 8.75: over
    assert guarded.decide(request(), [hot, cold]).worker is cold


def test_a_single_candidate_is_never_guarded_away() -> None:
    only = worker("a")
    only.usage.active_blocks = 1000
    p = KvAwarePolicy(FixedIndex(), hotspot_margin=0.0)  # type: ignore[arg-type]
    assert p.decide(request(), [only]).worker is only


def test_load_is_the_larger_of_own_accounting_and_a_fresh_report() -> None:
    w = worker("a", block_size=4)
    w.usage.pending_prefill_blocks, w.usage.active_blocks = 1, 2
    assert load_of(w) == (1.0, 2.0)
    w.load, w.load_at = report(prefill_tokens=20, decode_blocks=7), 10.0
    assert load_of(w) == (5.0, 7.0)
    w.load = report(prefill_tokens=0, decode_blocks=1)
    assert load_of(w) == (1.0, 2.0)


def test_a_report_older_than_the_last_release_is_ignored() -> None:
    a, b = worker("a"), worker("b")
    a.load, a.load_at = report(decode_blocks=50), 10.0
    a.usage.released_at = 11.0  # a request left after the report was sent
    assert load_of(a) == (0.0, 0.0)
    assert policy({"a": 1}).decide(request(), [a, b]).worker is a
    a.load_at = 12.0  # a newer report: it counts
    assert load_of(a) == (0.0, 50.0)
    assert policy({"a": 1}).decide(request(), [a, b]).worker is b


def test_hint_merges_with_the_index_taking_the_larger_count() -> None:
    a, b, c = worker("a"), worker("b"), worker("c")
    p = policy({"a": 2, "b": 1})
    d = p.decide(request(tokens=12), [a, b, c], hint={"a": 1, "b": 3})
    assert (d.worker.id, d.overlap) == ("b", 3)
    d = p.decide(request(tokens=12), [a, c], hint={"c": 3})
    assert (d.worker.id, d.overlap) == ("c", 3)
    d = p.decide(request(tokens=12), [a, c], hint={"a": 1})
    assert (d.worker.id, d.overlap) == ("a", 2)


def test_a_prompt_shorter_than_a_block_asks_the_index_nothing() -> None:
    index = FixedIndex({"a": 5})
    p = KvAwarePolicy(index)  # type: ignore[arg-type]
    d = p.decide(request(tokens=3), [worker("a"), worker("b")])
    assert index.asked == [] and d.overlap == 0 and d.request_blocks == 1


def test_load_outranks_recency_in_a_tie() -> None:
    a, b = worker("a"), worker("b")
    a.last_chosen, b.last_chosen = 9, 1  # b was chosen longer ago...
    b.usage.active_blocks = 1  # ...but carries more: b: 1*(2-1)+1 = 2 ; a: 1*(2-0) = 2
    d = policy({"b": 1}, overlap_weight=1).decide(request(), [b, a])
    assert d.cost == 2.0 and d.worker is a


# -- the adaptive cost --------------------------------------------------------------------------


def adaptive(overlaps: dict[str, int] | None = None, **kw: object) -> KvAwarePolicy:
    return KvAwarePolicy(FixedIndex(overlaps), overlap_weight=None, **kw)  # type: ignore[arg-type]


def long_prompt_workers() -> tuple[WorkerHandle, WorkerHandle, dict[str, int]]:
    """Two 64-token-block workers; a 32k-token prompt whose first 30k tokens a caches."""
    a, b = worker("a", block_size=64), worker("b", block_size=64)
    return a, b, {"a": 30_000 // 64}


def test_adaptive_cost_is_the_predicted_ttft_on_an_idle_fleet() -> None:
    a, b, overlaps = long_prompt_workers()
    p = adaptive(overlaps)
    steps = p.cost_models.get("m").steps  # type: ignore[union-attr]
    d = p.decide(request(tokens=32_000), [a, b])
    uncached = 32_000 - overlaps["a"] * 64
    assert (d.worker, d.overlap) == (a, overlaps["a"])
    assert d.cost == pytest.approx(steps.ttft_ms(0, uncached))
    assert d.quote is not None and d.quote.costs[1] == pytest.approx(steps.ttft_ms(0, 32_000))


def test_adaptive_cost_weighs_a_queue_against_a_cached_prefix() -> None:
    """Idle fleet (no pressure yet): the cached worker wins while its queue costs less than
    recomputing the prefix elsewhere, and loses past that."""
    a, b, overlaps = long_prompt_workers()
    p = adaptive(overlaps)
    a.usage.pending_prefill_blocks = 8_000 // 64
    assert p.decide(request(tokens=32_000), [a, b]).worker is a
    a.usage.pending_prefill_blocks = 60_000 // 64
    assert p.decide(request(tokens=32_000), [a, b]).worker is b


def test_committed_decisions_under_load_raise_the_pressure_previews_do_not() -> None:
    """With every worker queueing, placing work grows everyone's wait: after a run of committed
    decisions at that load the same choice goes to the worker that saves the recompute."""
    a, b, overlaps = long_prompt_workers()
    c, d = worker("c", block_size=64), worker("d", block_size=64)
    p = adaptive(overlaps)
    route = p.cost_models.get("m")  # type: ignore[union-attr]
    for w in (b, c, d):
        w.usage.pending_prefill_blocks = 40_000 // 64
    a.usage.pending_prefill_blocks = 90_000 // 64
    fleet = [a, b, c, d]
    for _ in range(50):
        assert p.decide(request(tokens=32_000), fleet).worker is not a
    assert route.decisions == 0 and route.pressure == 0.0  # previews change nothing
    for _ in range(200):
        p.commit(p.decide(request(tokens=32_000), fleet))
    assert route.decisions == 200 and route.pressure > 1
    assert p.decide(request(tokens=32_000), fleet).worker is a


def test_decode_load_slows_a_worker_by_what_it_costs_per_step() -> None:
    """A worker decoding many sequences at high KV usage pays a decode pass per prefill step:
    with equal caches the request goes to the one that is not decoding."""
    a, b = worker("a", block_size=64), worker("b", block_size=64)
    a.usage.requests = {f"r{i}" for i in range(100)}
    a.load, a.load_at = LoadReport("a", 9_000, 0, 9_000, 10_000, 0, 100), 10.0
    d = adaptive().decide(request(tokens=20_000), [a, b])
    assert d.worker is b
    quote = d.quote
    assert quote is not None and quote.costs[0] > quote.costs[1]


def test_worker_load_reads_accounting_and_fresh_reports() -> None:
    w = worker("a", block_size=4)
    w.usage.requests = {"r1", "r2"}
    w.usage.pending_prefill_blocks, w.usage.active_blocks = 3, 10
    assert worker_load(w, load_of(w)) == WorkerLoad(12.0, 2.0, 0.0)  # no report: usage unknown
    w.load, w.load_at = LoadReport("a", 7, 40, 50, 100, 0, 5), 10.0
    assert worker_load(w, load_of(w)) == WorkerLoad(40.0, 5.0, 0.5)
    w.usage.released_at = 11.0  # the report predates a departure: only its pool size counts
    assert worker_load(w, load_of(w)) == WorkerLoad(12.0, 2.0, 0.1)


def test_the_hotspot_guard_is_off_by_default_with_the_adaptive_cost() -> None:
    hot, cold = worker("hot"), worker("cold")
    hot.usage.active_blocks = 30  # far above the mean in blocks, but not decoding anything
    assert adaptive({"hot": 2}).decide(request(), [hot, cold]).worker is hot
    guarded = adaptive({"hot": 2}, hotspot_margin=0.5)
    assert guarded.hotspot_margin == 0.5
    assert guarded.decide(request(), [hot, cold]).worker is cold
    assert KvAwarePolicy(FixedIndex()).hotspot_margin == 0.5  # type: ignore[arg-type]


def test_each_model_has_its_own_fit_and_pressure() -> None:
    models = CostModels()
    p = KvAwarePolicy(FixedIndex(), overlap_weight=None,  # type: ignore[arg-type]
                      cost_models=models)
    p.commit(p.decide(request(model="big"), [worker("a", model="big")]))
    assert set(models.models) == {"big"} and models.get("big").decisions == 1
    p.commit(p.decide(request(model="small"), [worker("b", model="small")]))
    assert set(models.models) == {"big", "small"} and models.get("small").decisions == 1


def test_a_fixed_weight_is_the_block_cost() -> None:
    p = KvAwarePolicy(FixedIndex(), overlap_weight=16)  # type: ignore[arg-type]
    assert p.cost_models is None
    d = p.decide(request(), [worker("a")])
    p.commit(d)
    assert d.quote is None and d.cost == 32.0
    with pytest.raises(ValueError, match="adaptive"):
        KvAwarePolicy(FixedIndex(), overlap_weight=16,  # type: ignore[arg-type]
                      cost_models=CostModels())
