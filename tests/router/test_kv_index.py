"""KvIndex against a brute-force model: random event interleavings, dumps, worker removal."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from common.block_hash import block_hashes
from common.messages import (
    KvBlockRemoved,
    KvBlockStored,
    KvCleared,
    KvEvent,
    KvEventBatch,
    encoder,
    kv_batch_decoder,
)
from services.router.kv_index import KvIndex

WORKERS = ["w0", "w1", "w2", "w3", "w4"]
ALPHABET = list(range(10))  # small, so workers share blocks and queries hit often


def stored(hashes: list[int], parent: int | None = None) -> KvBlockStored:
    return KvBlockStored(block_hashes=hashes, parent_hash=parent, token_ids=[], block_size=4)


def batch(worker: str, *events: KvEvent, dump: bool = False) -> KvEventBatch:
    return KvEventBatch(worker_id=worker, events=list(events), dump=dump)


def model_overlap(held: set[int], query: list[int]) -> int:
    n = 0
    while n < len(query) and query[n] in held:
        n += 1
    return n


def model_matches(model: dict[str, set[int]], query: list[int]) -> dict[str, int]:
    out = {w: model_overlap(held, query) for w, held in model.items()}
    return {w: n for w, n in out.items() if n > 0}


def assert_matches_model(index: KvIndex, model: dict[str, set[int]]) -> None:
    for w in WORKERS:
        assert index.blocks_of(w) == model.get(w, set()), w
    assert index.num_entries() == sum(len(s) for s in model.values())
    assert index.num_blocks() == len(set().union(*model.values()))
    for h in ALPHABET:
        expected = sorted(w for w, held in model.items() if h in held)
        assert sorted(index.workers_holding(h)) == expected, h
    # Every chain prefix of the alphabet and a few fixed shapes.
    for query in (ALPHABET, ALPHABET[::-1], [0, 0, 1, 1, 2], [3, 1, 4, 1, 5, 9, 2, 6], []):
        assert index.find_matches(query) == model_matches(model, query), query


event_st = st.one_of(
    st.builds(lambda hs: ("stored", hs), st.lists(st.sampled_from(ALPHABET), max_size=6)),
    st.builds(lambda hs: ("removed", hs), st.lists(st.sampled_from(ALPHABET), max_size=6)),
    st.just(("cleared", [])),
)


def to_event(kind: str, hashes: list[int]) -> KvEvent:
    if kind == "stored":
        return stored(hashes, parent=hashes[0] if hashes else None)
    if kind == "removed":
        return KvBlockRemoved(block_hashes=hashes)
    return KvCleared()


def apply_model(held: set[int], kind: str, hashes: list[int]) -> None:
    if kind == "stored":
        held.update(hashes)
    elif kind == "removed":
        held.difference_update(hashes)
    else:
        held.clear()


class KvIndexMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.index = KvIndex()
        self.model: dict[str, set[int]] = {}
        self.events = 0

    @rule(worker=st.sampled_from(WORKERS), events=st.lists(event_st, max_size=4))
    def apply_batch(self, worker: str, events: list[tuple[str, list[int]]]) -> None:
        # Through the wire codec, as the router receives it.
        raw = encoder.encode(batch(worker, *(to_event(k, hs) for k, hs in events)))
        self.index.apply(worker, kv_batch_decoder.decode(raw))
        held = self.model.setdefault(worker, set())
        for kind, hashes in events:
            apply_model(held, kind, hashes)
        self.events += len(events)

    @rule(worker=st.sampled_from(WORKERS), events=st.lists(event_st, max_size=4))
    def dump(self, worker: str, events: list[tuple[str, list[int]]]) -> None:
        self.index.apply(worker, batch(worker, *(to_event(k, hs) for k, hs in events), dump=True))
        held: set[int] = set()
        for kind, hashes in events:
            apply_model(held, kind, hashes)
        self.model[worker] = held
        self.events += len(events)

    @rule(worker=st.sampled_from(WORKERS))
    def remove_worker(self, worker: str) -> None:
        self.index.remove_worker(worker)
        self.model.pop(worker, None)

    @rule(query=st.lists(st.sampled_from(ALPHABET), max_size=12))
    def query(self, query: list[int]) -> None:
        assert self.index.find_matches(query) == model_matches(self.model, query)

    @invariant()
    def agrees_with_model(self) -> None:
        assert_matches_model(self.index, self.model)
        assert self.index.events_applied == self.events


TestKvIndexMachine = KvIndexMachine.TestCase
TestKvIndexMachine.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_overlap_counts_leading_blocks_per_worker() -> None:
    hashes = block_hashes(list(range(64)), block_size=8)  # 8 chained blocks
    index = KvIndex()
    index.apply("a", batch("a", stored(hashes[:8])))
    index.apply("b", batch("b", stored(hashes[:3])))
    index.apply("c", batch("c", stored(hashes[5:8], parent=hashes[4])))  # orphan chain
    assert index.find_matches(hashes) == {"a": 8, "b": 3}
    assert index.find_matches(hashes[:2]) == {"a": 2, "b": 2}
    assert index.find_matches(hashes[5:]) == {"a": 3, "c": 3}
    assert index.find_matches(block_hashes(list(range(100, 164)), 8)) == {}
    assert index.num_blocks() == 8
    assert index.num_entries() == 14
    index.apply("a", batch("a", KvBlockRemoved(block_hashes=[hashes[4], 12345])))
    assert index.find_matches(hashes) == {"a": 4, "b": 3}


def test_cleared_and_remove_worker() -> None:
    index = KvIndex()
    index.apply("a", batch("a", stored([1, 2, 3])))
    index.apply("b", batch("b", stored([1, 2])))
    index.apply("a", batch("a", KvCleared(), stored([1])))
    assert index.find_matches([1, 2, 3]) == {"a": 1, "b": 2}
    index.remove_worker("b")
    assert index.find_matches([1, 2, 3]) == {"a": 1}
    assert index.num_blocks() == 1
    assert index.workers_holding(2) == []
    index.remove_worker("b")  # idempotent
    index.remove_worker("never-seen")
    index.apply("ghost", batch("ghost", KvBlockRemoved(block_hashes=[1]), KvCleared()))
    assert index.workers() == ["a"]
    assert index.events_applied == 6


@pytest.mark.parametrize("seed", range(5))
def test_dump_after_gap_resyncs_to_true_state(seed: int) -> None:
    """Lose a random run of a worker's events, resync with a dump: index == true state."""
    rng = random.Random(seed)
    index = KvIndex()
    truth: dict[str, set[int]] = {w: set() for w in WORKERS}
    for step in range(400):
        worker = rng.choice(WORKERS)
        kind = rng.choice(["stored", "stored", "removed"]) if step % 50 else "cleared"
        hashes = rng.sample(range(60), rng.randint(1, 8))
        apply_model(truth[worker], kind, hashes)
        lost = worker == "w0" and step >= 250  # w0's events from here on never arrive
        if not lost:
            index.apply(worker, batch(worker, to_event(kind, hashes)))
    truth["w0"].add(61)  # one more lost event, so the index has surely drifted
    assert index.blocks_of("w0") != truth["w0"]
    # The dump may be split into several stored events and starts from scratch.
    held = sorted(truth["w0"])
    index.apply("w0", batch("w0", stored(held[:5]), stored(held[5:]), dump=True))
    for w in WORKERS:
        assert index.blocks_of(w) == truth[w]
    for h in range(60):
        assert sorted(index.workers_holding(h)) == sorted(w for w in WORKERS if h in truth[w])
    assert index.num_entries() == sum(map(len, truth.values()))


def test_empty_dump_forgets_worker_blocks() -> None:
    index = KvIndex()
    index.apply("a", batch("a", stored([1, 2])))
    index.apply("b", batch("b", stored([2])))
    index.apply("a", batch("a", dump=True))
    assert index.blocks_of("a") == set()
    assert index.find_matches([1, 2]) == {}
    assert index.find_matches([2]) == {"b": 1}
    assert index.num_blocks() == 1


def test_slots_are_reused_so_masks_stay_narrow() -> None:
    index = KvIndex()
    index.apply("keep", batch("keep", stored([7])))
    for i in range(200):
        w = f"tmp{i}"
        index.apply(w, batch(w, stored([7, 8, i + 100])))
        assert index.find_matches([7, 8]) == {"keep": 1, w: 2}
        index.remove_worker(w)
    assert len(index._slots.worker_at) == 2  # one permanent slot + one reused
    assert index._masks[7] == 1  # "keep" still in slot 0, nothing left of the others
    assert index.num_blocks() == 1


def test_many_workers_beyond_machine_word() -> None:
    """Masks are Python ints: slot 200 works like slot 0."""
    index = KvIndex()
    for i in range(256):
        index.apply(f"w{i}", batch(f"w{i}", stored(list(range(i % 7 + 1)))))
    got = index.find_matches(list(range(10)))
    assert got == {f"w{i}": i % 7 + 1 for i in range(256)}
    assert len(index.workers_holding(0)) == 256
