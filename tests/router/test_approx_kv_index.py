"""ApproxKvIndex with a fake clock: expiry, refresh, removal, bounded sweeps, a model check."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from services.router.approx_kv_index import ApproxKvIndex


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_ttl() -> None:
    clock = FakeClock()
    index = ApproxKvIndex(ttl_s=10.0, clock=clock)
    index.record("a", [1, 2, 3])
    clock.now += 5
    index.record("b", [1, 2])
    assert index.find_matches([1, 2, 3, 4]) == {"a": 3, "b": 2}
    clock.now += 4.999
    assert index.find_matches([1, 2, 3]) == {"a": 3, "b": 2}
    clock.now += 0.001  # a's entries reach their expiry
    assert index.find_matches([1, 2, 3]) == {"b": 2}
    assert index.num_entries() == 2  # swept, not just hidden
    clock.now += 5
    assert index.find_matches([1, 2, 3]) == {}
    assert index.num_entries() == 0
    assert index.num_blocks() == 0


def test_recording_again_refreshes_expiry() -> None:
    clock = FakeClock()
    index = ApproxKvIndex(ttl_s=10.0, clock=clock)
    index.record("a", [1, 2, 3, 4])
    clock.now += 8
    index.record("a", [1, 2])  # refreshed: live until t+18
    clock.now += 5
    assert index.find_matches([1, 2, 3, 4]) == {"a": 2}
    clock.now += 5
    assert index.find_matches([1, 2]) == {}


def test_remove_worker() -> None:
    clock = FakeClock()
    index = ApproxKvIndex(ttl_s=10.0, clock=clock)
    index.record("a", [1, 2])
    index.record("b", [1, 2, 3])
    index.remove_worker("b")
    assert index.find_matches([1, 2, 3]) == {"a": 2}
    assert index.num_blocks() == 2
    index.remove_worker("b")
    index.remove_worker("nobody")
    index.record("c", [1])  # takes b's freed slot
    assert index.find_matches([1, 2, 3]) == {"a": 2, "c": 1}
    assert len(index._slots.worker_at) == 2


def test_sweep_is_bounded_but_lookups_stay_exact() -> None:
    clock = FakeClock()
    index = ApproxKvIndex(ttl_s=10.0, clock=clock, sweep_budget=3)
    index.record("a", list(range(10, 20)))
    clock.now += 1
    index.record("a", list(range(10)))  # swept after 10..19, so it lingers at the front
    clock.now += 4
    index.record("b", list(range(10)))
    clock.now += 6.5  # all of a expired, b live
    # One call sweeps at most 3 entries, yet a's unswept leftovers never count.
    assert index.find_matches(list(range(20))) == {"b": 10}
    assert index.num_entries() == 10 + 20 - 3
    index.record("a", [0])  # a live again at block 0 only, expired blocks still behind it
    assert index.find_matches(list(range(20))) == {"a": 1, "b": 10}
    for _ in range(10):
        index.find_matches([0])
    assert index.num_entries() == 10 + 1  # backlog drained by later calls


def test_memory_follows_live_set_under_steady_load() -> None:
    clock = FakeClock()
    index = ApproxKvIndex(ttl_s=1.0, clock=clock)
    for i in range(2000):
        index.record(f"w{i % 4}", [i * 10 + k for k in range(8)])
        clock.now += 0.01
    # ~100 calls per TTL, 8 new blocks each: about 800 live entries, never the 16,000 recorded.
    assert index.num_entries() <= 808
    assert index.num_blocks() <= 808


WORKERS = ["w0", "w1", "w2"]
ALPHABET = list(range(8))


class ApproxMachine(RuleBasedStateMachine):
    """Model: (worker, hash) -> expiry; an entry counts while expiry > now."""

    @initialize(budget=st.integers(1, 6))
    def setup(self, budget: int) -> None:
        self.clock = FakeClock()
        self.index = ApproxKvIndex(ttl_s=5.0, clock=self.clock, sweep_budget=budget)
        self.model: dict[tuple[str, int], float] = {}

    @rule(worker=st.sampled_from(WORKERS), hashes=st.lists(st.sampled_from(ALPHABET), max_size=6))
    def record(self, worker: str, hashes: list[int]) -> None:
        self.index.record(worker, hashes)
        for h in hashes:
            self.model[(worker, h)] = self.clock.now + 5.0

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0, 7.0]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @rule(worker=st.sampled_from(WORKERS))
    def remove_worker(self, worker: str) -> None:
        self.index.remove_worker(worker)
        self.model = {k: v for k, v in self.model.items() if k[0] != worker}

    @rule(query=st.lists(st.sampled_from(ALPHABET), max_size=10))
    def query(self, query: list[int]) -> None:
        assert self.index.find_matches(query) == self.expected(query)

    @invariant()
    def fixed_queries(self) -> None:
        for query in (ALPHABET, ALPHABET[::-1], [2, 2, 5]):
            assert self.index.find_matches(query) == self.expected(query)
        # Never more stored than ever recorded and not yet removed.
        assert self.index.num_entries() <= len(self.model)

    def expected(self, query: list[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in WORKERS:
            n = 0
            while n < len(query) and self.model.get((w, query[n]), -1.0) > self.clock.now:
                n += 1
            if n:
                out[w] = n
        return out


TestApproxMachine = ApproxMachine.TestCase
TestApproxMachine.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
