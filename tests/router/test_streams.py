"""Request streams: placing, parking, cancelling and relaying token batches per frontend."""

from __future__ import annotations

import msgspec

from common.messages import (
    KIND_CANCEL,
    KIND_GENERATE,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
    cancel_decoder,
    encoder,
    generate_decoder,
)
from services.router.policies import Direct, RoundRobin
from tests.router.fakes import (
    Wiring,
    counter,
    frontend_chunks,
    histogram_count,
    request,
    sent,
    worker,
)


def generate(w: Wiring, rid: str = "r1", frontend: bytes = b"fe1", **kw: object) -> bytes:
    req = request(rid, **kw)  # type: ignore[arg-type]
    payload = encoder.encode(req)
    w.streams.on_generate(frontend, req, payload)
    return payload


def test_a_request_goes_to_the_chosen_worker_unchanged() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a)
    payload = generate(w)
    assert sent(a) == [[KIND_GENERATE, payload]]
    assert a.inflight == 1 and counter(w.metrics.inflight) == 1
    assert counter(w.metrics.decisions, "round-robin") == 1


def test_a_duplicate_request_id_is_a_400() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a)
    generate(w)
    generate(w, frontend=b"fe2")
    assert w.errors() == [(b"fe2", "r1", 400, "duplicate request id")]
    assert len(sent(a)) == 1 and a.inflight == 1


def test_a_routing_error_is_relayed_with_its_code() -> None:
    w = Wiring(Direct(), worker("a"))
    generate(w)
    ((_, rid, code, message),) = w.errors()
    assert (rid, code) == ("r1", 400) and "x-worker-instance-id" in message
    assert counter(w.metrics.requests, "rejected") == 1 and len(w.accounting) == 0


def test_without_parking_no_worker_is_a_503_at_once() -> None:
    w = Wiring(RoundRobin(), wait_s=0)
    generate(w)
    assert w.errors() == [(b"fe1", "r1", 503, "no live worker serves model 'm'")]
    assert counter(w.metrics.requests, "rejected") == 1 and not w.streams.waiting


def test_parked_request_is_placed_when_a_worker_appears() -> None:
    w = Wiring(RoundRobin(), wait_s=2.0)
    payload = generate(w)
    assert w.frontends.sent == [] and w.streams.waiting
    w.clock.advance(1.0)
    w.streams.retry()  # still nobody: it stays parked
    assert w.streams.waiting and w.frontends.sent == []
    a = worker("a")
    w.pool.workers["a"] = a
    w.clock.advance(0.9)
    w.streams.retry()
    assert sent(a) == [[KIND_GENERATE, payload]] and not w.streams.waiting
    assert w.frontends.sent == []


def test_parked_request_gets_a_503_after_its_deadline() -> None:
    w = Wiring(RoundRobin(), wait_s=2.0)
    generate(w)
    w.clock.advance(1.5)
    w.streams.retry()  # re-parked with its original deadline, not a new one
    w.clock.advance(0.5)
    w.pool.workers["a"] = a = worker("a")  # too late
    w.streams.retry()
    assert w.errors() == [(b"fe1", "r1", 503, "no live worker serves model 'm'")]
    assert sent(a) == [] and counter(w.metrics.requests, "rejected") == 1
    assert not w.streams.waiting


def test_cancel_while_parked_drops_it_silently() -> None:
    w = Wiring(RoundRobin(), wait_s=2.0)
    generate(w)
    w.streams.on_cancel("r1")
    w.pool.workers["a"] = a = worker("a")
    w.streams.retry()
    assert sent(a) == [] and w.frontends.sent == [] and not w.streams.waiting
    assert counter(w.metrics.requests, "cancelled") == 0


def test_cancel_releases_the_request_and_tells_its_worker() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a)
    generate(w)
    w.streams.on_cancel("r1")
    w.streams.on_cancel("r1")  # a second cancel finds nothing
    assert sent(a)[1][0] == KIND_CANCEL
    assert cancel_decoder.decode(sent(a)[1][1]).request_id == "r1" and len(sent(a)) == 2
    assert a.inflight == 0 and a.usage.active_blocks == 0
    assert counter(w.metrics.requests, "cancelled") == 1 and counter(w.metrics.inflight) == 0


def test_cancel_of_a_request_whose_worker_is_gone_sends_nothing() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a)
    generate(w)
    del w.pool.workers["a"]
    w.streams.on_cancel("r1")
    assert len(sent(a)) == 1 and a.inflight == 0


def test_batches_are_regrouped_per_frontend() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a)
    generate(w, "r1", b"fe1")
    generate(w, "r2", b"fe2")
    generate(w, "r3", b"fe1")
    w.streams.on_batch(a, [TokenChunk("r1", [1], num_prompt_tokens=8),
                           TokenChunk("r2", [2], num_prompt_tokens=8),
                           TokenChunk("r3", [3]),
                           TokenChunk("gone", [4])])
    out = dict(frontend_chunks(f) for f in w.frontends.sent)
    assert [c.request_id for c in out[b"fe1"]] == ["r1", "r3"]
    assert [(c.request_id, c.num_prompt_tokens) for c in out[b"fe2"]] == [("r2", 8)]
    assert w.accounting.get("r1").generated == [1]  # type: ignore[union-attr]


def test_first_token_ends_pending_prefill_and_the_finish_releases() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a)
    generate(w, tokens=8)  # 2 blocks, none cached
    assert a.usage.pending_prefill_blocks == 2
    w.streams.on_batch(a, [TokenChunk("r1", [], num_prompt_tokens=8)])
    assert a.usage.pending_prefill_blocks == 2  # no token yet
    w.streams.on_batch(a, [TokenChunk("r1", [7])])
    assert a.usage.pending_prefill_blocks == 0 and a.usage.active_blocks == 2
    w.streams.on_batch(a, [TokenChunk("r1", [8], finish_reason="stop")])
    assert (a.inflight, a.usage.active_blocks) == (0, 0)
    assert counter(w.metrics.requests, "finished") == 1 and counter(w.metrics.inflight) == 0


def test_an_error_finish_is_counted_as_error() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a)
    generate(w)
    w.streams.on_batch(a, [TokenChunk("r1", [], "error", error_code=500, error_message="x")])
    assert counter(w.metrics.requests, "error") == 1 and a.inflight == 0
    assert w.errors() == [(b"fe1", "r1", 500, "x")]


def test_a_chunk_from_a_worker_the_request_left_is_dropped() -> None:
    a, b = worker("a"), worker("b")
    w = Wiring(RoundRobin(), a, b)
    generate(w)  # round-robin: b
    w.streams.on_batch(a, [TokenChunk("r1", [1], finish_reason="stop")])
    assert w.frontends.sent == [] and b.inflight == 1


def test_a_draining_workers_refusal_moves_the_request_without_counting_a_migration() -> None:
    a, b = worker("a"), worker("b")
    w = Wiring(RoundRobin(), a, b, limit=0)
    generate(w)  # to b
    w.streams.on_batch(b, [TokenChunk("r1", [], "error", error_code=503, error_message="drain")])
    assert w.frontends.sent == [] and b.inflight == 0 and a.inflight == 1
    moved = generate_decoder.decode(sent(a)[0][1])
    assert moved.request_id == "r1" and moved.kv_sources == []
    assert w.accounting.get("r1").migrations == 0  # type: ignore[union-attr]
    assert counter(w.metrics.requests, "error") == 0


def test_a_refusal_with_nowhere_to_go_is_relayed() -> None:
    a = worker("a")
    w = Wiring(RoundRobin(), a, wait_s=0)
    generate(w)
    w.streams.on_batch(a, [TokenChunk("r1", [], "error", error_code=503, error_message="drain")])
    (_, rid, code, message), *_ = w.errors()
    assert (rid, code) == ("r1", 503) and "no live worker" in message
    assert len(w.accounting) == 0 and a.inflight == 0


def test_a_migrated_streams_first_chunk_hides_prompt_figures_and_measures_recompute() -> None:
    a, b = worker("a"), worker("b")
    w = Wiring(RoundRobin(), a, b)
    generate(w, tokens=8)  # to b
    w.streams.on_batch(b, [TokenChunk("r1", [1, 2], num_prompt_tokens=8)])
    entry = w.accounting.get("r1")
    assert entry is not None
    w.migration.migrate(entry, "crash")
    assert entry.worker is a and entry.resume_tokens == 10
    w.streams.on_batch(a, [TokenChunk("r1", [3], num_prompt_tokens=10, cached_tokens=4)])
    _, (chunk,) = frontend_chunks(w.frontends.sent[-1])
    assert (chunk.num_prompt_tokens, chunk.cached_tokens) == (0, 0)
    assert histogram_count(w.metrics.recomputed_tokens) == 1
    assert w.metrics.recomputed_tokens._sum.get() == 6
    assert entry.resume_tokens == 0 and entry.generated == [1, 2, 3]


def test_a_resume_over_a_new_connection_takes_the_running_stream_over() -> None:
    """The frontend's connection dropped and came back (new identity): its resume of a stream
    still running here continues it in place, the tokens the old connection got sent first."""
    a = worker("a")
    w = Wiring(RoundRobin(), a)
    generate(w)
    entry = w.accounting.get("r1")
    assert entry is not None
    entry.generated.extend([7, 8, 9])
    entry.announced = "a"
    resume = request("r1")
    resume = msgspec.structs.replace(resume, generated_token_ids=[7], resumed=True)
    w.streams.on_generate(b"fe2", resume, encoder.encode(resume))
    assert w.errors() == [] and len(sent(a)) == 1  # nothing placed again
    assert entry.frontend == b"fe2"
    frontend, chunks = frontend_chunks(w.frontends.sent[-1])
    assert frontend == b"fe2" and [c.token_ids for c in chunks] == [[8, 9]]
    assert counter(w.metrics.taken_over) == 1
    # Not a resume, or another history: a clashing id.
    other = msgspec.structs.replace(resume, generated_token_ids=[5])
    w.streams.on_generate(b"fe3", other, encoder.encode(other))
    assert w.errors() == [(b"fe3", "r1", 400, "duplicate request id")]


def test_logprobs_stay_with_their_tokens() -> None:
    """A request asking for logprobs: each chunk's go to the frontend with its tokens; a
    chunk's tokens the stream already has are dropped with theirs; a takeover sends the
    tokens the new connection lacks with theirs."""
    a = worker("a")
    w = Wiring(RoundRobin(), a)
    asked = msgspec.structs.replace(request("r1"), sampling=SamplingParams(max_tokens=16,
                                                                           logprobs=0))
    w.streams.on_generate(b"fe1", asked, encoder.encode(asked))
    lp = {t: TokenLogprob(-t / 100) for t in range(7, 11)}
    w.streams.on_batch(a, [TokenChunk("r1", [7, 8], num_prompt_tokens=8, offset=0,
                                      logprobs=[lp[7], lp[8]])])
    # An earlier run's chunk overlapping what the stream has: only token 9 is new.
    w.streams.on_batch(a, [TokenChunk("r1", [8, 9], offset=1, logprobs=[lp[8], lp[9]])])
    relayed = [c for f in w.frontends.sent for c in frontend_chunks(f)[1]]
    assert [(c.token_ids, c.logprobs) for c in relayed] == [
        ([7, 8], [lp[7], lp[8]]), ([9], [lp[9]])]
    entry = w.accounting.get("r1")
    assert entry is not None and entry.logprobs is not None
    assert entry.logprobs.items == [lp[7], lp[8], lp[9]]
    entry.announced = "a"
    resume = msgspec.structs.replace(asked, generated_token_ids=[7], resumed=True)
    w.streams.on_generate(b"fe2", resume, encoder.encode(resume))
    _, (chunk,) = frontend_chunks(w.frontends.sent[-1])
    assert (chunk.token_ids, chunk.logprobs) == ([8, 9], [lp[8], lp[9]])
