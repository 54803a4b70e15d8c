"""Migration planning: where a lost worker's request goes, which KV sources it is given, the
migration limit, and stranding until a worker comes back or the wait is over."""

from __future__ import annotations

from common.messages import KIND_GENERATE, ImageInput, TokenChunk, encoder, generate_decoder
from services.router.accounting import RoutedRequest
from services.router.policies import Direct, RoundRobin
from services.router.worker_pool import WorkerHandle
from tests.router.fakes import Wiring, counter, request, sent, worker


class FixedIndex:
    def __init__(self, overlaps: dict[str, int]) -> None:
        self.overlaps = overlaps

    def find_matches(self, hashes: list[int]) -> dict[str, int]:
        return dict(self.overlaps)


def running(w: Wiring, on: WorkerHandle, rid: str = "r1", tokens: int = 8,
            images: list[ImageInput] | None = None) -> RoutedRequest:
    """A request placed on `on` that has streamed two tokens."""
    req = request(rid, tokens=tokens)
    req.images = images or []
    for other in w.pool.workers.values():
        other.routable = other is on
    w.streams.on_generate(b"fe", req, encoder.encode(req))
    for other in w.pool.workers.values():
        other.routable = True
    w.streams.on_batch(on, [TokenChunk(rid, [7, 8], num_prompt_tokens=tokens)])
    entry = w.accounting.get(rid)
    assert entry is not None and entry.worker is on
    return entry


def lose(w: Wiring, handle: WorkerHandle) -> None:
    """What the router does to a crashed worker before migrating its requests."""
    w.migration.worker_lost(handle)
    handle.alive = handle.routable = False
    del w.pool.workers[handle.id]


def test_the_request_resumes_elsewhere_with_its_streamed_tokens() -> None:
    a, b = worker("a"), worker("b")
    w = Wiring(RoundRobin(), a, b)
    entry = running(w, a)
    lose(w, a)
    assert w.migration.migrate(entry, "crash")
    ((kind, payload),) = sent(b)
    moved = generate_decoder.decode(payload)
    assert kind == KIND_GENERATE and moved.request_id == "r1"
    assert moved.token_ids == entry.request.token_ids and moved.generated_token_ids == [7, 8]
    assert moved.target_worker is None and moved.kv_sources == []
    assert entry.worker is b and entry.migrations == 1 and entry.resume_tokens == 10
    assert b.inflight == 1 and b.usage.active_blocks == 3  # 10 tokens, block size 4
    assert counter(w.metrics.migrations, "crash") == 1


def test_a_migrated_request_keeps_its_images() -> None:
    """The worker it moves to recomputes the prompt: it needs the images (embedded or not) to
    compute their positions, not the placeholder ids as text."""
    images = [ImageInput("ab" * 32, 2, 3, embedding=b"rows"),
              ImageInput("cd" * 32, 5, 2, mime="image/png", data=b"png")]
    a, b = worker("a"), worker("b")
    w = Wiring(RoundRobin(), a, b)
    entry = running(w, a, images=images)
    lose(w, a)
    assert w.migration.migrate(entry, "crash")
    moved = generate_decoder.decode(sent(b)[0][1])
    assert moved.images == images and moved.generated_token_ids == [7, 8]


def test_kv_sources_are_live_replica_peers_of_the_lost_worker_but_not_the_new_one() -> None:
    a, b, c, d = worker("a"), worker("b"), worker("c"), worker("d")
    w = Wiring(RoundRobin(), a, b, c, d)
    d.alive = False  # a dead peer is no source
    a.replica_peers = ["b", "c", "d", "gone"]
    entry = running(w, a, tokens=12)  # 3 blocks placed on a
    lose(w, a)
    assert w.migration.holders(entry, "a") == {"b": 2, "c": 2}  # all but the last block
    assert w.migration.migrate(entry, "crash")
    new = entry.worker
    assert new is not None and new.id in ("b", "c")  # a holder is preferred
    (other,) = {"b", "c"} - {new.id}
    assert generate_decoder.decode(sent(new)[0][1]).kv_sources == [f"tcp://{other}:1"]


def test_kv_sources_include_index_holders_but_never_the_lost_worker() -> None:
    a, b, c = worker("a"), worker("b"), worker("c")
    w = Wiring(RoundRobin(), a, b, c, kv_index=FixedIndex({"a": 2, "b": 3, "x": 5}))
    entry = running(w, a, tokens=12)
    entry.hashes = [1, 2, 3]
    a.replica_peers = ["c"]
    lose(w, a)
    assert w.migration.holders(entry, "a") == {"b": 3, "c": 2}
    w.migration.replicas_of["a"] = ["b"]
    assert w.migration.holders(entry, "a") == {"b": 3}  # max(replica 2, index 3)
    w.migration.replicas_of.clear()
    entry.hashes = []  # nothing to look up
    assert w.migration.holders(entry, "a") == {}


def test_a_suspects_own_peers_are_read_from_its_handle() -> None:
    a, b = worker("a"), worker("b")
    w = Wiring(RoundRobin(), a, b)
    entry = running(w, a)
    a.replica_peers = ["b"]
    a.alive = a.routable = False  # suspect: still in the pool
    assert w.migration.holders(entry, "a") == {"b": 1}
    assert w.migration.migrate(entry, "hang")
    assert entry.worker is b and counter(w.metrics.migrations, "hang") == 1


def test_past_the_limit_the_client_gets_a_clear_error() -> None:
    a, b = worker("a"), worker("b")
    w = Wiring(RoundRobin(), a, b, limit=1)
    entry = running(w, a)
    assert w.migration.migrate(entry, "crash")
    assert not w.migration.migrate(entry, "stall")
    assert w.errors() == [(b"fe", "r1", 503, "worker b failed (stall) and the migration "
                                             "limit (1) is reached")]
    assert len(w.accounting) == 0 and a.inflight == b.inflight == 0
    assert counter(w.metrics.requests, "error") == 1


def test_a_move_that_does_not_count_ignores_the_limit() -> None:
    a, b = worker("a"), worker("b")
    w = Wiring(RoundRobin(), a, b, limit=0)
    entry = running(w, a)
    assert w.migration.migrate(entry, "drain", counts=False)
    assert entry.worker is b and entry.migrations == 0
    assert counter(w.metrics.migrations, "drain") == 0


def test_a_routing_error_fails_the_request() -> None:
    a, b = worker("a"), worker("b")
    w = Wiring(Direct(), a, b)
    req = request(target="a")
    w.streams.on_generate(b"fe", req, encoder.encode(req))
    entry = w.accounting.get("r1")
    assert entry is not None
    assert not w.migration.migrate(entry, "crash")  # the resumed request names no worker
    ((_, rid, code, message),) = w.errors()
    assert (rid, code) == ("r1", 503)
    assert message.startswith("worker a failed (crash); router mode 'direct' needs")


def test_with_no_worker_it_is_stranded_then_fails_at_the_deadline() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a, wait_s=2.0)
    entry = running(w, a)
    lose(w, a)
    assert w.migration.migrate(entry, "crash")
    assert entry.worker is None and "r1" in w.migration.stranded and w.streams.waiting
    assert a.inflight == 0 and w.frontends.sent[-1:] != []  # the streamed tokens only
    w.clock.advance(1.0)
    w.streams.retry()
    assert "r1" in w.migration.stranded and w.errors() == []
    w.clock.advance(1.0)
    w.streams.retry()
    assert w.errors() == [(b"fe", "r1", 503, "it waited 2 s for a worker (crash); no live "
                                             "worker serves model 'm'")]
    assert not w.streams.waiting and len(w.accounting) == 0


def test_a_stranded_request_resumes_when_a_worker_comes() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a, wait_s=2.0)
    entry = running(w, a)
    lose(w, a)
    w.migration.migrate(entry, "crash")
    b = worker("b")
    w.pool.workers["b"] = b
    w.clock.advance(1.5)
    w.streams.retry()
    assert entry.worker is b and not w.streams.waiting
    assert generate_decoder.decode(sent(b)[0][1]).generated_token_ids == [7, 8]
    assert entry.migrations == 1 and counter(w.metrics.migrations, "crash") == 1


def test_cancel_of_a_stranded_request() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a, wait_s=2.0)
    entry = running(w, a)
    lose(w, a)
    w.migration.migrate(entry, "crash")
    w.streams.on_cancel("r1")
    assert not w.streams.waiting and len(w.accounting) == 0
    w.pool.workers["b"] = b = worker("b")
    w.streams.retry()
    assert sent(b) == [] and counter(w.metrics.requests, "cancelled") == 1


def test_a_finished_stranded_request_is_not_retried() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a, wait_s=2.0)
    entry = running(w, a)
    lose(w, a)
    w.migration.migrate(entry, "crash")
    w.accounting.finish("r1")
    w.pool.workers["b"] = b = worker("b")
    w.streams.retry()
    assert sent(b) == [] and not w.streams.waiting


def test_a_suspect_is_never_named_as_a_kv_source_of_its_own_requests() -> None:
    a, b = worker("a"), worker("b")
    w = Wiring(RoundRobin(), a, b, kv_index=FixedIndex({"a": 2, "b": 1}))
    entry = running(w, a)
    entry.hashes = [1, 2]
    a.alive = a.routable = False  # suspect: still in the pool, still in the index
    assert w.migration.holders(entry, "a") == {"b": 1}
    assert w.migration.migrate(entry, "stall")
    assert generate_decoder.decode(sent(b)[0][1]).kv_sources == []
