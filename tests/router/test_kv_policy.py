"""The kv policy: cost, tie-breaks, temperature, hotspot guard, stale load reports, hints."""

from __future__ import annotations

import math
import random

from common.messages import LoadReport
from services.router.kv_policy import KvAwarePolicy, load_of
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
