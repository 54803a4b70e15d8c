"""Queued requests decided again when a worker joins their pool (fakes, no processes)."""

from __future__ import annotations

from common.messages import (
    KIND_CANCEL,
    KIND_GENERATE,
    MODE_DECODE,
    MODE_PREFILL,
    PHASE_PREFILL,
    TokenChunk,
    cancel_decoder,
    encoder,
    generate_decoder,
)
from services.router.args import RouterConfig
from services.router.disaggregation import Disaggregation
from services.router.kv_index import KvIndex
from services.router.kv_policy import KvAwarePolicy
from services.router.queue_rebalance import QueueRebalance
from tests.router.fakes import Wiring, counter, frontend_chunks, request, sent, worker


def wire(*handles, mode: str = "always"):  # type: ignore[no-untyped-def]
    """Block-cost kv routing (a worker's cost grows with its queued prefill)."""
    index = KvIndex()
    w = Wiring(KvAwarePolicy(index, overlap_weight=1.0), *handles, kv_index=index)
    w.streams.disagg = Disaggregation(RouterConfig(disagg_mode=mode), w.pool, w.selector, index,
                                      w.accounting, w.migration, w.metrics, w.clock)
    w.rebalance = QueueRebalance(w.accounting, w.selector, w.streams.disagg, w.metrics)
    return w


def role(worker_id: str, mode: str):  # type: ignore[no-untyped-def]
    handle = worker(worker_id)
    handle.instance.metadata["mode"] = mode
    return handle


def place(w: Wiring, rid: str, tokens: int = 32, **kw: object) -> bytes:
    req = request(rid, tokens, **kw)  # type: ignore[arg-type]
    payload = encoder.encode(req)
    w.streams.on_generate(b"fe", req, payload)
    return payload


def join(w: Wiring, handle) -> int:  # type: ignore[no-untyped-def]
    w.pool.workers[handle.id] = handle
    return w.rebalance.worker_joined(handle)  # type: ignore[attr-defined, no-any-return]


def cancels(handle) -> list[str]:  # type: ignore[no-untyped-def]
    return [cancel_decoder.decode(p).request_id for k, p in sent(handle) if k == KIND_CANCEL]


def generates(handle) -> list[str]:  # type: ignore[no-untyped-def]
    return [generate_decoder.decode(p).request_id for k, p in sent(handle) if k == KIND_GENERATE]


def test_queued_requests_move_to_a_joining_worker_until_the_two_are_even() -> None:
    a = worker("a")
    w = wire(a)
    payloads = {rid: place(w, rid) for rid in ("r1", "r2", "r3", "r4", "r5")}
    assert generates(a) == ["r1", "r2", "r3", "r4", "r5"]
    b = worker("b")
    moved = join(w, b)
    # The oldest stays (a is prefilling it); of the rest, as many go as make b the cheaper.
    assert moved == 2 and generates(b) == ["r2", "r3"] and cancels(a) == ["r2", "r3"]
    assert [p for k, p in sent(b)] == [payloads["r2"], payloads["r3"]]  # the request unchanged
    assert a.usage.requests == {"r1", "r4", "r5"} and b.usage.requests == {"r2", "r3"}
    assert a.usage.pending_prefill_blocks == b.usage.pending_prefill_blocks + 8
    assert counter(w.metrics.queued_moves, "serving") == 2
    # What a sends for a request that left is dropped; b's tokens reach the client.
    w.streams.on_batch(a, [TokenChunk("r2", [7], num_prompt_tokens=32)])
    assert w.frontends.sent == []
    w.streams.on_batch(b, [TokenChunk("r2", [8], num_prompt_tokens=32)])
    (_, chunks), = [frontend_chunks(f) for f in w.frontends.sent]
    assert [c.token_ids for c in chunks] == [[8]]


def test_started_pinned_and_other_model_requests_stay() -> None:
    a, other = worker("a"), worker("o", model="other")
    w = wire(a, other)
    place(w, "head")
    place(w, "streaming")
    w.streams.on_batch(a, [TokenChunk("streaming", [1], num_prompt_tokens=32)])
    place(w, "pinned", target="a")
    place(w, "o1", model="other")
    place(w, "o2", model="other")
    before = a.usage.released_at
    assert join(w, worker("b")) == 0
    assert cancels(a) == [] and cancels(other) == []
    assert a.usage.requests == {"head", "streaming", "pinned"}
    assert a.usage.released_at == before  # nothing left: a's load reports still count
    assert counter(w.metrics.queued_moves, "serving") == 0


def test_a_request_the_policy_keeps_keeps_its_accounting() -> None:
    a = worker("a")
    w = wire(a)
    place(w, "r1")
    place(w, "r2", tokens=4)
    blocks, pending = a.usage.active_blocks, a.usage.pending_prefill_blocks
    released_at = a.usage.released_at
    # b is busier than a with r2 on it: r2 stays, counted on a as before.
    b = worker("b")
    b.usage.pending_prefill_blocks = 100
    assert join(w, b) == 0
    assert (a.usage.active_blocks, a.usage.pending_prefill_blocks) == (blocks, pending)
    assert a.usage.released_at == released_at  # r2 never left: a's load reports still count
    assert a.usage.requests == {"r1", "r2"} and sent(b) == []


def test_queued_prefill_phases_move_to_a_joining_prefill_worker() -> None:
    p1, d = role("p1", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p1, d)
    for rid in ("r1", "r2", "r3"):
        place(w, rid)
    assert generates(p1) == ["r1", "r2", "r3"] and sent(d) == []
    # A decode worker joining moves no prefill phase.
    assert join(w, role("d2", MODE_DECODE)) == 0
    p2 = role("p2", MODE_PREFILL)
    assert join(w, p2) == 1
    (kind, payload), = sent(p2)
    moved = generate_decoder.decode(payload)
    assert kind == KIND_GENERATE and moved.phase == PHASE_PREFILL
    assert cancels(p1) == [moved.request_id]
    entry = w.accounting.get(moved.request_id)
    assert entry is not None and entry.disagg is not None
    assert entry.disagg.prefill_worker == "p2" and entry.disagg.prefill_endpoint == "tcp://p2:1"
    assert counter(w.metrics.queued_moves, "prefill") == 1
    # Its first token on p2 hands it off to a decode worker as usual.
    w.streams.on_batch(p2, [TokenChunk(moved.request_id, [42], "length", num_prompt_tokens=32)])
    handed = [generate_decoder.decode(p) for k, p in sent(d) + sent(w.pool.workers["d2"])
              if k == KIND_GENERATE]
    assert [(r.request_id, r.kv_sources[0]) for r in handed] == [(moved.request_id, "tcp://p2:1")]
