"""Disaggregation in the router: the path decision's thresholds, placement on a prefill worker,
the hand-off at the first token, and the faults around it (fakes, no processes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgspec
import pytest

from common.messages import (
    FINISH_LENGTH,
    FINISH_STOP,
    KIND_CANCEL,
    KIND_GENERATE,
    MODE_DECODE,
    MODE_PREFILL,
    PHASE_DECODE,
    PHASE_PREFILL,
    Cancel,
    ImageInput,
    TokenChunk,
    encoder,
    generate_decoder,
)
from services.router.args import RouterConfig
from services.router.disaggregation import Disaggregation, PathCosts, PathLimits, choose_path
from services.router.handback import HandBack
from services.router.kv_index import KvIndex
from services.router.kv_policy import KvAwarePolicy
from services.router.metrics import RouterMetrics
from services.router.policies import RoundRobin
from services.router.queue_rebalance import QueueRebalance
from services.router.selection import build_selection
from tests.router.fakes import MODEL, Wiring, counter, frontend_chunks, request, sent, worker

LIMITS = PathLimits(local_max_tokens=2048, local_max_ratio=0.7, prefill_busy_tokens=10_000,
                    decode_veto_requests=8, ttft_target_ms=200, itl_target_ms=20,
                    hold_first_token=True)
# Both paths meet the targets: the thresholds decide.
FITS = PathCosts(local_ttft_ms=50, local_step_ms=15, exposed_streams=3, remote_ttft_ms=50,
                 handoff_ms=10)


@pytest.mark.parametrize(("prompt", "uncached", "queue", "decode", "expect"), [
    (4000, 4000, 0, 0, ("remote", "long_uncached")),  # fresh long prompt
    (1000, 1000, 0, 0, ("remote", "long_uncached")),  # short but nothing cached: 100% > 70%
    (4000, 1000, 0, 0, ("local", "short_uncached")),  # mostly cached on the decode worker
    (10000, 2048, 0, 0, ("remote", "long_uncached")),  # at the token limit: remote
    (1000, 700, 0, 0, ("remote", "long_uncached")),  # at the ratio limit: remote
    (4000, 4000, 10_000, 0, ("local", "prefill_busy")),  # prefill pool busy
    (4000, 1000, 0, 8, ("remote", "decode_busy")),  # decode worker vetoes
    (4000, 4000, 10_000, 8, ("remote", "decode_busy")),
])
def test_choose_path_follows_the_thresholds(prompt: int, uncached: int, queue: float,
                                            decode: int, expect: tuple[str, str]) -> None:
    assert choose_path(LIMITS, prompt, uncached, queue, decode, FITS) == expect


def test_always_mode_and_disabled_thresholds() -> None:
    assert choose_path(PathLimits(mode="always"), 10, 0, 0, 0, FITS) == ("remote", "always")
    off = PathLimits()  # busy and veto off by default
    assert choose_path(off, 4000, 4000, 1e9, 0, FITS) == ("remote", "long_uncached")
    assert choose_path(off, 4000, 100, 0, 10_000, FITS) == ("local", "short_uncached")


def costs(**kw: float) -> PathCosts:
    return PathCosts(**{"local_ttft_ms": 50.0, "local_step_ms": 15.0, "exposed_streams": 3.0,
                        "remote_ttft_ms": 50.0, "handoff_ms": 10.0, **kw})


@pytest.mark.parametrize(("prompt", "uncached", "queue", "decode", "kw", "expect"), [
    # Short, but its prefill would stretch three decoding streams' steps past 20 ms.
    (4000, 1000, 0, 3, {"local_step_ms": 40}, ("remote", "decode_itl")),
    # ... which is harmless on a decode worker where no stream decodes.
    (4000, 1000, 0, 0, {"local_step_ms": 40, "exposed_streams": 0}, ("local", "short_uncached")),
    # Long and fresh, on an idle decode worker: the hand-off gap would miss the ITL target,
    # and held back in the first token it would push TTFT past its target.
    (8000, 8000, 0, 0, {"local_step_ms": 190, "exposed_streams": 0, "local_ttft_ms": 170,
                        "remote_ttft_ms": 170, "handoff_ms": 45}, ("local", "handoff_gap")),
    # ... with TTFT to spare, the gap goes into the first token: remote fits.
    (8000, 8000, 0, 0, {"local_step_ms": 190, "exposed_streams": 0, "local_ttft_ms": 170,
                        "handoff_ms": 45}, ("remote", "long_uncached")),
    (4000, 1000, 0, 3, {"local_step_ms": 40, "handoff_ms": 45}, ("remote", "decode_itl")),
    # Long, the prefill pool's queue would miss the TTFT target; local fits.
    (4000, 4000, 0, 0, {"exposed_streams": 0, "remote_ttft_ms": 400}, ("local", "remote_ttft")),
    (4000, 4000, 20_000, 0, {"exposed_streams": 0, "remote_ttft_ms": 400},
     ("local", "prefill_busy")),
    # Busy prefill pool, but a local prefill would stretch streams: remote all the same.
    (4000, 4000, 20_000, 3, {"local_step_ms": 40}, ("remote", "decode_itl")),
    # Short, but the decode worker's queue would miss the TTFT target; remote fits.
    (4000, 1000, 0, 0, {"local_ttft_ms": 300}, ("remote", "local_ttft")),
    # Neither fits and local would harm streams: remote (one request misses, not a batch).
    (4000, 1000, 0, 3, {"local_step_ms": 40, "handoff_ms": 45, "remote_ttft_ms": 170},
     ("remote", "decode_itl")),
    # Neither fits and local harms nobody: the thresholds.
    (4000, 1000, 0, 0, {"local_ttft_ms": 300, "remote_ttft_ms": 300}, ("local", "short_uncached")),
    (4000, 4000, 0, 0, {"local_ttft_ms": 300, "remote_ttft_ms": 300}, ("remote", "long_uncached")),
    # The veto holds whatever the prices.
    (8000, 8000, 0, 8, {"exposed_streams": 0, "handoff_ms": 45, "remote_ttft_ms": 170},
     ("remote", "decode_busy")),
])
def test_choose_path_prices_both_paths_against_the_targets(
        prompt: int, uncached: int, queue: float, decode: int, kw: dict[str, float],
        expect: tuple[str, str]) -> None:
    assert choose_path(LIMITS, prompt, uncached, queue, decode, costs(**kw)) == expect


def role(worker_id: str, mode: str, block_size: int = 4):  # type: ignore[no-untyped-def]
    handle = worker(worker_id, block_size)
    handle.instance.metadata["mode"] = mode
    return handle


def wire(*handles, mode: str = "always", kv: bool = False,  # type: ignore[no-untyped-def]
         **targets: float):
    config = RouterConfig(disagg_mode=mode, disagg_lease_ms=1234, **targets)
    index = KvIndex() if kv else None
    policy = KvAwarePolicy(index) if kv else RoundRobin()  # type: ignore[arg-type]
    w = Wiring(policy, *handles, kv_index=index)
    w.streams.disagg = Disaggregation(config, w.pool, w.selector, index, w.accounting,
                                      w.migration, w.metrics, w.clock)
    return w


def place(w: Wiring, rid: str = "r1", tokens: int = 8, max_tokens: int = 16) -> None:
    req = request(rid, tokens)
    req.sampling.max_tokens = max_tokens
    w.streams.on_generate(b"fe", req, encoder.encode(req))


def test_a_request_goes_to_a_prefill_worker_then_hands_off_at_its_first_token() -> None:
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d)
    place(w)
    (kind, payload), = sent(p)
    prefill = generate_decoder.decode(payload)
    assert kind == KIND_GENERATE and prefill.phase == PHASE_PREFILL and prefill.lease_ms == 1234
    assert sent(d) == [] and p.inflight == 1
    # The prefill's final chunk: the token reaches the client as a token, not an end.
    w.streams.on_batch(p, [TokenChunk("r1", [42], FINISH_LENGTH, num_prompt_tokens=8,
                                      kv_transfer_params=b'{"x": 1}')])
    (_, chunks), = [frontend_chunks(f) for f in w.frontends.sent]
    assert [(c.token_ids, c.finish_reason, c.num_prompt_tokens, c.kv_transfer_params)
            for c in chunks] == [([42], None, 8, b"")]
    (kind, payload), = sent(d)
    decode = generate_decoder.decode(payload)
    assert decode.phase == PHASE_DECODE and decode.generated_token_ids == [42]
    assert decode.kv_transfer_params == b'{"x": 1}'
    assert decode.kv_sources[0] == "tcp://p:1"
    assert (p.inflight, d.inflight) == (0, 1)
    assert d.usage.pending_prefill_blocks == 0  # nothing is prefilled on the decode worker
    # The decode worker's first chunk: prompt figures hidden (the client has them).
    w.clock.advance(0.03)
    w.streams.on_batch(d, [TokenChunk("r1", [43], num_prompt_tokens=8, cached_tokens=8)])
    _, chunks = frontend_chunks(w.frontends.sent[-1])
    assert (chunks[0].num_prompt_tokens, chunks[0].cached_tokens) == (0, 0)
    assert w.metrics.disagg_handoff_seconds._sum.get() == pytest.approx(0.03)
    w.streams.on_batch(d, [TokenChunk("r1", [44], FINISH_LENGTH)])
    assert len(w.accounting) == 0 and d.inflight == 0
    assert counter(w.metrics.disagg_decisions, "remote", "always") == 1
    assert counter(w.metrics.disagg_handoffs, "sent") == 1


def test_a_prefill_that_ends_the_request_is_not_handed_off() -> None:
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d)
    place(w, "r1")
    place(w, "r2", max_tokens=2)
    w.streams.on_batch(p, [TokenChunk("r1", [1], FINISH_STOP, num_prompt_tokens=8)])
    assert sent(d) == [] and "r1" not in w.accounting
    place(w, "r3", max_tokens=1)  # one token: nothing to decode, it runs on d whole
    assert generate_decoder.decode(sent(d)[0][1]).phase == ""
    assert counter(w.metrics.disagg_decisions, "local", "single_token") == 1


def test_either_pool_alone_serves_whole_requests() -> None:
    """Without prefill workers the decode pool runs every request whole; without decode
    workers the prefill pool does (slower for the prompts queued there, but served), and a
    decode worker joining takes the whole requests still queued on prefill workers."""
    d = role("d", MODE_DECODE)
    w = wire(d)
    place(w)
    assert generate_decoder.decode(sent(d)[0][1]).phase == ""
    assert counter(w.metrics.disagg_decisions, "aggregated", "no_prefill_worker") == 1
    p = role("p", MODE_PREFILL)
    w2 = wire(p)
    for rid in ("r1", "r2", "r3"):
        place(w2, rid)
    assert [generate_decoder.decode(m[1]).phase for m in sent(p)] == ["", "", ""]
    assert not w2.streams.waiting and p.inflight == 3
    assert counter(w2.metrics.disagg_decisions, "aggregated", "no_decode_worker") == 3
    # Once a decode worker serves, new prompts are disaggregated again and whole requests
    # that wait on the prefill worker move to it (its oldest one stays: it may be running).
    d2 = role("d2", MODE_DECODE)
    w2.pool.workers[d2.id] = d2
    QueueRebalance(w2.accounting, w2.selector, w2.streams.disagg, w2.metrics).worker_joined(d2)
    assert [generate_decoder.decode(m[1]).request_id for m in sent(d2)] == ["r2", "r3"]
    assert sent(p)[-2:] == [[KIND_CANCEL, encoder.encode(Cancel("r2"))],
                            [KIND_CANCEL, encoder.encode(Cancel("r3"))]]
    place(w2, "r4")
    assert generate_decoder.decode(sent(p)[-1][1]).phase == PHASE_PREFILL


def test_conditional_prefills_locally_where_the_prefix_is_cached() -> None:
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d, mode="conditional", kv=True)
    from common.block_hash import block_hashes
    from common.messages import KvBlockStored, KvEventBatch
    tokens = list(range(100, 132))  # 8 blocks of 4; d caches the first 7
    hashes = block_hashes(tokens, 4)
    assert w.migration.kv_index is not None
    w.migration.kv_index.apply("d", KvEventBatch("d", [KvBlockStored(
        hashes[:7], None, tokens[:28], 4)]))
    place(w, "r1", tokens=32)
    assert generate_decoder.decode(sent(d)[0][1]).phase == "" and sent(p) == []
    assert counter(w.metrics.disagg_decisions, "local", "short_uncached") == 1
    place(w, "r2", tokens=200)  # unrelated and long: remote
    assert generate_decoder.decode(sent(p)[0][1]).phase == PHASE_PREFILL


def test_a_resume_whose_prompt_waits_on_a_prefill_worker_goes_back_there() -> None:
    """Its router drained before the first token and named the prefill worker: the prompt is
    queued or prefilling there (which hands it over), so it goes back, on the remote path
    even where this prompt would prefill locally, and is not counted as a new decision."""
    p1, p2, d = role("p1", MODE_PREFILL), role("p2", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p1, p2, d, mode="conditional", kv=True)
    cache_on(w, "d", list(range(100, 132)), 7)  # a new request of these tokens runs on d

    def resume(rid: str, previous: str) -> None:
        req = msgspec.structs.replace(request(rid, 32), previous_worker=previous, resumed=True)
        w.streams.on_generate(b"fe", req, encoder.encode(req))

    for i, previous in enumerate(("p2", "p1", "p2")):  # whatever the policy would pick
        resume(f"r{i}", previous)
        placed = generate_decoder.decode(sent(p1 if previous == "p1" else p2)[-1][1])
        assert (placed.request_id, placed.phase) == (f"r{i}", PHASE_PREFILL)
    assert sent(d) == [] and (len(sent(p1)), len(sent(p2))) == (1, 2)
    assert sum(s.value for s in w.metrics.disagg_decisions.collect()[0].samples
               if s.name.endswith("_total")) == 0
    # A worker this router does not know (gone meanwhile): decided afresh, as a new one.
    resume("r-gone", "p9")
    assert counter(w.metrics.disagg_decisions, "local", "short_uncached") == 1
    # The decode worker it was prefilling on itself: back there whole, to be handed over.
    resume("r-local", "d")
    assert generate_decoder.decode(sent(d)[-1][1]).request_id == "r-local"
    assert counter(w.metrics.disagg_decisions, "local", "short_uncached") == 1


def test_a_prompt_back_where_this_router_cancelled_its_prefill_hears_only_its_new_run() -> None:
    """This router took a stalled frontend for gone and cancelled its prompt's prefill; the
    frontend resumes it here, back to that prefill worker, whose cancelled run's first token
    (sampled otherwise) and finish are still on their way. Had that one been taken for the new
    run's, its token would have gone to the client and its KV, freed by the cancel, been handed
    off. The prefill and decode phases carry the resume's number."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    p.instance.metadata["chunk_runs"] = d.instance.metadata["chunk_runs"] = True
    w = wire(p, d)
    place(w)
    assert generate_decoder.decode(sent(p)[-1][1]).run == 0  # a first run needs no number
    w.streams.on_cancel("r1")
    resumed = msgspec.structs.replace(request("r1", 8), previous_worker="p", resumed=True)
    w.streams.on_generate(b"fe", resumed, encoder.encode(resumed))
    prefill = generate_decoder.decode(sent(p)[-1][1])
    assert prefill.phase == PHASE_PREFILL and prefill.run > 0
    w.streams.on_batch(p, [TokenChunk("r1", [41], FINISH_LENGTH, num_prompt_tokens=8,
                                      offset=0)])  # the cancelled run's, late
    assert w.frontends.sent == [] and sent(d) == []
    w.streams.on_batch(p, [TokenChunk("r1", [42], FINISH_LENGTH, num_prompt_tokens=8,
                                      offset=0, run=prefill.run)])
    (_, chunks), = [frontend_chunks(f) for f in w.frontends.sent]
    assert [c.token_ids for c in chunks] == [[42]]
    decode = generate_decoder.decode(sent(d)[-1][1])
    assert (decode.phase, decode.generated_token_ids, decode.run) == \
        (PHASE_DECODE, [42], prefill.run)
    w.streams.on_batch(d, [TokenChunk("r1", [43], FINISH_LENGTH, offset=1, run=prefill.run)])
    assert [t for f in w.frontends.sent for c in frontend_chunks(f)[1] for t in c.token_ids] \
        == [42, 43]
    assert len(w.accounting) == 0
    assert w.metrics.stale_chunks._value.get() == 1


def test_a_lost_prefill_worker_reruns_the_prefill_on_another() -> None:
    p1, p2, d = role("p1", MODE_PREFILL), role("p2", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p1, p2, d)
    place(w)
    first = p1 if sent(p1) else p2
    other = p2 if first is p1 else p1
    entry = w.accounting.get("r1")
    assert entry is not None
    del w.pool.workers[first.id]
    w.migration.migrate(entry, "crash")
    assert generate_decoder.decode(sent(other)[0][1]).phase == PHASE_PREFILL
    assert counter(w.metrics.migrations, "prefill") == 1 and sent(d) == []
    # With no prefill worker left it runs whole on the decode worker.
    del w.pool.workers[other.id]
    w.migration.migrate(entry, "crash")
    assert generate_decoder.decode(sent(d)[0][1]).phase == ""


def test_a_hand_off_with_no_decode_worker_is_decoded_where_it_was_prefilled() -> None:
    """No decode worker left at the first token: the prefill worker drops its hold on the
    prompt's KV and continues the stream itself from its cache (a held first token goes out
    in front of its next chunk)."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d, **{"disagg_ttft_target_ms": 400.0, "disagg_itl_target_ms": 20.0,
                      "disagg_hold_first_token": True})
    place(w, "r1", tokens=8000)  # a hand-off predicted past the ITL target: held
    d.routable = False  # it left discovery meanwhile
    w.streams.on_batch(p, [TokenChunk("r1", [5], FINISH_LENGTH, num_prompt_tokens=8000)])
    assert w.frontends.sent == []  # the first token is held
    _, cancel, (kind, payload) = sent(p)
    assert cancel == [KIND_CANCEL, encoder.encode(Cancel("r1"))]
    whole = generate_decoder.decode(payload)
    assert (kind, whole.phase, whole.generated_token_ids) == (KIND_GENERATE, "", [5])
    assert not w.streams.waiting and p.inflight == 1
    assert counter(w.metrics.disagg_handoffs, "decoded_in_place") == 1
    w.streams.on_batch(p, [TokenChunk("r1", [6], num_prompt_tokens=8000, cached_tokens=7999)])
    (_, chunks), = [frontend_chunks(f) for f in w.frontends.sent]
    assert [(c.token_ids, c.num_prompt_tokens) for c in chunks] == [([5, 6], 8000)]
    w.streams.on_batch(p, [TokenChunk("r1", [7], FINISH_LENGTH)])
    assert len(w.accounting) == 0 and p.inflight == 0
    assert sent(p)[-1][0] == KIND_GENERATE  # over: no second cancel


def test_a_hand_off_carries_the_images_to_the_decode_phase_and_to_a_decode_in_place() -> None:
    """The decode side gets the request's images with the prompt (a failed pull recomputes,
    and an engine keys the image's blocks by them), as does a prefill worker decoding its own
    hand-off."""
    images = [ImageInput("ab" * 32, 2, 3, embedding=b"rows")]
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d)
    for rid in ("r1", "r2"):
        req = request(rid, 8)
        req.images = images
        w.streams.on_generate(b"fe", req, encoder.encode(req))
        assert generate_decoder.decode(sent(p)[-1][1]).images == images  # the prefill phase
    w.streams.on_batch(p, [TokenChunk("r1", [5], FINISH_LENGTH, num_prompt_tokens=8)])
    decode = generate_decoder.decode(sent(d)[0][1])
    assert (decode.phase, decode.images, decode.generated_token_ids) == (PHASE_DECODE, images,
                                                                          [5])
    d.routable = False  # no decode worker left: r2 is decoded where it was prefilled
    w.streams.on_batch(p, [TokenChunk("r2", [6], FINISH_LENGTH, num_prompt_tokens=8)])
    whole = generate_decoder.decode(sent(p)[-1][1])
    assert (whole.request_id, whole.phase, whole.images) == ("r2", "", images)


def test_the_prefill_pool_serves_only_once_the_decode_pool_is_empty_for_a_while() -> None:
    """--prefill-fallback-after-ms: a decode pool empty for less (a restart, a blip) keeps new
    requests and hand-offs waiting for a decode worker; past it the prefill pool serves them.
    The outage is dated from its start, not from the first request in it."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d)
    w.selector.fallback_after_s = 1.0
    place(w, "r1")  # a prefill phase on p
    d.routable = False
    w.selector.note_serving()
    w.clock.advance(0.5)
    place(w, "r2")
    w.streams.on_batch(p, [TokenChunk("r1", [5], FINISH_LENGTH, num_prompt_tokens=8)])
    assert w.streams.waiting and len(sent(p)) == 1
    assert counter(w.metrics.disagg_handoffs, "no_decode_worker") == 1
    w.clock.advance(0.4)
    w.streams.retry()
    assert w.streams.waiting and len(sent(p)) == 1
    w.clock.advance(0.2)  # 1.1 s since the decode pool emptied
    w.streams.retry()
    assert not w.streams.waiting
    placed = {generate_decoder.decode(m[1]).request_id: generate_decoder.decode(m[1])
              for m in sent(p) if m[0] == KIND_GENERATE}
    assert (placed["r1"].phase, placed["r1"].generated_token_ids) == ("", [5])
    assert placed["r2"].phase == ""
    assert counter(w.metrics.disagg_handoffs, "decoded_in_place") == 1
    assert counter(w.metrics.disagg_decisions, "aggregated", "no_decode_worker") == 1
    # A decode worker back resets the clock: the next outage waits again.
    d.routable = True
    w.selector.note_serving()
    d.routable = False
    place(w, "r3")
    assert w.streams.waiting


def test_a_negative_fallback_delay_is_refused_and_no_fallback_means_none() -> None:
    with pytest.raises(ValueError, match="--prefill-fallback-after-ms must be >= 0"):
        RouterConfig(prefill_fallback_after_ms=-1)
    pool = Wiring(RoundRobin(), role("p", MODE_PREFILL)).pool
    off = build_selection(RouterConfig(prefill_fallback=False), pool, RouterMetrics("r"))[0]
    assert off.fallback_after_s is None and not off.prefill_fallback(MODEL)
    on = build_selection(RouterConfig(prefill_fallback_after_ms=0), pool, RouterMetrics("r"))[0]
    assert on.fallback_after_s == 0 and on.prefill_fallback(MODEL)


def test_a_hand_off_with_no_decode_worker_from_a_leaving_prefill_worker_waits() -> None:
    """Its prefill worker is leaving too: it waits, then goes to the decode worker that comes
    as a decode phase pulling from the prefill worker (which holds the KV for it even while
    draining out of discovery)."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d)
    place(w)
    d.routable = False  # it left discovery meanwhile
    p.routable = False  # draining
    w.streams.on_batch(p, [TokenChunk("r1", [5], FINISH_LENGTH, num_prompt_tokens=8)])
    assert w.streams.waiting and counter(w.metrics.disagg_handoffs, "no_decode_worker") == 1
    del w.pool.workers["p"]  # drained: out of discovery, answering pulls until released
    d.routable = True
    w.streams.retry()
    resumed = generate_decoder.decode(sent(d)[0][1])
    assert resumed.generated_token_ids == [5]
    assert (resumed.phase, resumed.kv_sources) == (PHASE_DECODE, ["tcp://p:1"])
    assert counter(w.metrics.disagg_handoffs, "sent") == 1 and not w.streams.waiting


def test_a_request_over_before_its_decode_began_frees_the_prefill_workers_hold() -> None:
    """Cancelled while its hand-off waits for a decode worker: the prefill worker is told to
    drop the KV it holds for it (else it stays until the lease ends). Once decoding, the
    decode worker released that hold already: nothing is sent."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d)
    place(w, "r1")
    place(w, "r2")
    d.routable = p.routable = False  # p leaving too: the hand-off waits
    w.streams.on_batch(p, [TokenChunk("r1", [5], FINISH_LENGTH, num_prompt_tokens=8)])
    assert w.streams.waiting
    w.streams.on_cancel("r1")
    assert sent(p)[-1] == [KIND_CANCEL, encoder.encode(Cancel("r1"))]
    d.routable = True
    w.streams.on_batch(p, [TokenChunk("r2", [6], FINISH_LENGTH, num_prompt_tokens=8)])
    w.streams.on_batch(d, [TokenChunk("r2", [7], num_prompt_tokens=8, cached_tokens=8)])
    before = len(sent(p))
    w.streams.on_cancel("r2")
    assert len(sent(p)) == before and sent(d)[-1][0] == KIND_CANCEL
    # A draining router gives a waiting hand-off back: the stream goes on, the hold stays.
    p.routable = True
    place(w, "r3")
    d.routable = p.routable = False
    w.streams.on_batch(p, [TokenChunk("r3", [8], FINISH_LENGTH, num_prompt_tokens=8)])
    assert w.streams.waiting
    before = len(sent(p))
    HandBack(w.frontends, w.accounting, w.streams.parking, w.migration, w.metrics).start()
    assert len(sent(p)) == before and len(w.accounting) == 0


def test_a_decode_phase_lost_before_its_first_step_goes_to_another_decode_worker() -> None:
    """Its decode worker lost before a chunk came from it: the decode phase goes to another
    decode worker, which pulls the prompt from the prefill worker (counted as a migration);
    once decoding, or when the engine moves the KV itself, it migrates as any request."""
    p, d1, d2 = role("p", MODE_PREFILL), role("d1", MODE_DECODE), role("d2", MODE_DECODE)
    w = wire(p, d1, d2)
    for rid, params in (("r1", b""), ("r2", b""), ("r3", b'{"x": 1}')):
        place(w, rid)
        w.streams.on_batch(p, [TokenChunk(rid, [5], FINISH_LENGTH, num_prompt_tokens=8,
                                          kv_transfer_params=params)])
    first = {generate_decoder.decode(m[1]).request_id: h
             for h in (d1, d2) for m in sent(h)}
    assert sorted(first) == ["r1", "r2", "r3"]
    # r2 began decoding where it went.
    w.streams.on_batch(first["r2"], [TokenChunk("r2", [], num_prompt_tokens=8,
                                                cached_tokens=8)])
    for rid in ("r1", "r2", "r3"):
        before = {h.id: len(sent(h)) for h in (d1, d2)}
        entry = w.accounting.get(rid)
        assert entry is not None
        lost = first[rid]
        lost.routable = False
        assert w.migration.migrate(entry, "crash")
        lost.routable = True
        other = d2 if lost is d1 else d1
        assert len(sent(other)) == before[other.id] + 1
        moved = generate_decoder.decode(sent(other)[-1][1])
        assert moved.generated_token_ids == [5]
        if rid == "r1":
            assert (moved.phase, moved.kv_sources[0]) == (PHASE_DECODE, "tcp://p:1")
        else:
            assert moved.phase == ""
    assert counter(w.metrics.migrations, "crash") == 3
    assert counter(w.metrics.disagg_handoffs, "sent") == 4


@pytest.mark.parametrize("params", [b"", b'{"x": 1}'], ids=["pulled", "engine-moved"])
def test_a_decode_phase_lost_with_no_decode_worker_left_is_decoded_where_it_was_prefilled(
        params: bytes) -> None:
    """The only decode worker lost before its first step: the prefill worker drops its hold
    and decodes the request itself (whichever way the KV would have moved), counted as a
    migration; no hold is left to its lease."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d)
    place(w)
    w.streams.on_batch(p, [TokenChunk("r1", [5], FINISH_LENGTH, num_prompt_tokens=8,
                                      kv_transfer_params=params)])
    assert generate_decoder.decode(sent(d)[0][1]).phase == PHASE_DECODE
    entry = w.accounting.get("r1")
    assert entry is not None
    del w.pool.workers["d"]
    assert w.migration.migrate(entry, "crash")
    cancel, (kind, payload) = sent(p)[-2:]
    assert cancel == [KIND_CANCEL, encoder.encode(Cancel("r1"))]
    whole = generate_decoder.decode(payload)
    assert (kind, whole.phase, whole.generated_token_ids) == (KIND_GENERATE, "", [5])
    assert counter(w.metrics.migrations, "crash") == 1 and p.inflight == 1
    w.streams.on_batch(p, [TokenChunk("r1", [6], num_prompt_tokens=8, cached_tokens=8)])
    w.streams.on_batch(p, [TokenChunk("r1", [7], FINISH_LENGTH)])
    assert len(w.accounting) == 0 and sent(p)[-1][0] == KIND_GENERATE


SLA = {"disagg_ttft_target_ms": 200.0, "disagg_itl_target_ms": 20.0}


def cache_on(w: Wiring, worker_id: str, tokens: list[int], blocks: int) -> None:
    from common.block_hash import block_hashes
    from common.messages import KvBlockStored, KvEventBatch
    assert w.migration.kv_index is not None
    w.migration.kv_index.apply(worker_id, KvEventBatch(worker_id, [KvBlockStored(
        block_hashes(tokens, 4)[:blocks], None, tokens[:blocks * 4], 4)]))


def test_a_short_local_prefill_goes_remote_beside_decoding_streams() -> None:
    """The step-time prior: any prefill step costs >= 16.5 ms, a decode pass >= 5.7 ms, so with
    a 20 ms ITL target a decode worker with a stream in flight must not prefill."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d, mode="conditional", kv=True, **SLA)
    cache_on(w, "d", list(range(100, 132)), 7)
    place(w, "r1", tokens=32)  # d idle: its 4 uncached tokens are prefilled there
    assert generate_decoder.decode(sent(d)[0][1]).phase == "" and sent(p) == []
    place(w, "r2", tokens=32)  # the same, beside r1's stream: to the prefill worker
    assert generate_decoder.decode(sent(p)[0][1]).phase == PHASE_PREFILL
    assert counter(w.metrics.disagg_decisions, "local", "short_uncached") == 1
    assert counter(w.metrics.disagg_decisions, "remote", "decode_itl") == 1


def test_a_long_fresh_prompt_prefills_on_an_idle_decode_worker() -> None:
    """8,000 tokens to move (the prior: 128 KiB a token at 25 GB/s) would open a ~47 ms gap;
    on an idle decode worker the prefill (~165 ms) harms nobody and meets the TTFT target."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d, mode="conditional", kv=True, **SLA)
    place(w, "r1", tokens=8000)
    assert generate_decoder.decode(sent(d)[0][1]).phase == "" and sent(p) == []
    assert counter(w.metrics.disagg_decisions, "local", "handoff_gap") == 1
    # With a remote prefill in flight (due on d), the same prompt is not prefilled on d.
    w2 = wire(role("p", MODE_PREFILL), role("d", MODE_DECODE), mode="conditional", kv=True,
              **SLA)
    place(w2, "r0", tokens=2000)  # remote: over the ratio threshold, both paths fit
    place(w2, "r1", tokens=8000)
    assert counter(w2.metrics.disagg_decisions, "remote", "long_uncached") == 1
    assert counter(w2.metrics.disagg_decisions, "remote", "decode_itl") == 1


def test_observed_hand_offs_teach_the_gap() -> None:
    """Hand-offs slower than the prior predicts (and than the TTFT budget could absorb) send a
    prompt that would move little KV to the decode worker's own prefill (when it is idle)."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d, mode="conditional", kv=True, **SLA)
    disagg = w.streams.disagg
    assert disagg is not None
    place(w, "r0", tokens=400)  # 100% uncached, both fit: remote by the ratio threshold
    assert counter(w.metrics.disagg_decisions, "remote", "long_uncached") == 1
    for i in range(20):
        rid = f"h{i}"
        place(w, rid, tokens=400)
        w.streams.on_batch(p, [TokenChunk(rid, [7], FINISH_LENGTH, num_prompt_tokens=400)])
        w.clock.advance(0.250)  # 250 ms from the first token to the decode worker's
        w.streams.on_batch(d, [TokenChunk(rid, [8], num_prompt_tokens=400, cached_tokens=400)])
        w.streams.on_batch(d, [TokenChunk(rid, [9], FINISH_LENGTH)])
    w.streams.on_batch(p, [TokenChunk("r0", [1], FINISH_STOP, num_prompt_tokens=400)])
    assert disagg._handoff_model("m").predict(400) > 200
    place(w, "r1", tokens=400)
    assert counter(w.metrics.disagg_decisions, "local", "handoff_gap") == 1


def test_the_hand_off_model_fits_its_observations() -> None:
    from services.router.cost_model import HandoffCostModel

    m = HandoffCostModel()
    assert m.predict(0) == pytest.approx(5.0)
    assert m.predict(4096) == pytest.approx(5.0 + 4096 * 131072 / 25e6)
    for _ in range(200):
        for n in (0, 1000, 4000):
            m.observe(n, 3.0 + 0.01 * n)
    assert m.predict(2000) == pytest.approx(23.0, rel=0.05)
    assert m.spread_ms < 1.0  # exact observations: what is left is the prior's misfit, decaying
    noisy = HandoffCostModel()
    for i in range(400):
        noisy.observe(1000, 20.0 + (5.0 if i % 2 else -5.0))  # 20 ms on average, +-5
    assert noisy.predict(1000) == pytest.approx(20.0, abs=0.5)
    assert noisy.spread_ms == pytest.approx(5.0, rel=0.1)
    assert noisy.upper(1000) == pytest.approx(30.0, rel=0.05)
    flat = HandoffCostModel()
    for _ in range(200):
        flat.observe(0, 30.0)
        flat.observe(4000, 10.0)  # faster when moving more: refitted flat
    assert flat.predict(0) == pytest.approx(flat.predict(8000))


@pytest.mark.parametrize("name", ["disagg_ttft_target_ms", "disagg_itl_target_ms"])
def test_targets_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=name.replace("_", "-")):
        RouterConfig(**{name: 0.0})


def test_holds_first_token_only_when_the_ttft_budget_absorbs_the_gap() -> None:
    assert costs(handoff_ms=45, remote_ttft_ms=100).holds_first_token(LIMITS)
    assert not costs(handoff_ms=15, remote_ttft_ms=100).holds_first_token(LIMITS)  # fits ITL
    assert not costs(handoff_ms=45, remote_ttft_ms=170).holds_first_token(LIMITS)  # past TTFT
    # Off (the default): never held, and a gap past the ITL target makes remote miss.
    off = dataclasses.replace(LIMITS, hold_first_token=False)
    assert not costs(handoff_ms=45, remote_ttft_ms=100).holds_first_token(off)
    assert not costs(handoff_ms=45, remote_ttft_ms=100).remote_fits(off)


def test_a_slow_hand_off_moves_into_the_first_token() -> None:
    """A hand-off predicted past the ITL target (8,000 tokens to move: ~47 ms) with TTFT to
    spare: the prefill's first token is held and goes out with the decode worker's first, with
    the prompt figures; the client sees no gap between them."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d, **{"disagg_ttft_target_ms": 400.0, "disagg_itl_target_ms": 20.0,
                      "disagg_hold_first_token": True})
    place(w, "r1", tokens=8000)
    w.streams.on_batch(p, [TokenChunk("r1", [42], FINISH_LENGTH, num_prompt_tokens=8000)])
    assert w.frontends.sent == []  # held
    (_, payload), = sent(d)
    assert generate_decoder.decode(payload).generated_token_ids == [42]
    w.clock.advance(0.045)
    w.streams.on_batch(d, [TokenChunk("r1", [43], num_prompt_tokens=8000, cached_tokens=8000)])
    (_, chunks), = [frontend_chunks(f) for f in w.frontends.sent]
    assert [(c.token_ids, c.num_prompt_tokens, c.cached_tokens) for c in chunks] == [
        ([42, 43], 8000, 0)]
    assert counter(w.metrics.disagg_handoffs, "first_token_held") == 1
    w.streams.on_batch(d, [TokenChunk("r1", [44], FINISH_LENGTH)])
    _, chunks = frontend_chunks(w.frontends.sent[-1])
    assert [c.token_ids for c in chunks] == [[44]] and len(w.accounting) == 0
    # The decode worker's step begun with the KV (an empty chunk) lets a held token go a step
    # before the next; the empty chunk itself reaches no client.
    place(w, "r3", tokens=8000)
    w.streams.on_batch(p, [TokenChunk("r3", [42], FINISH_LENGTH, num_prompt_tokens=8000)])
    before = len(w.frontends.sent)
    w.clock.advance(0.040)
    w.streams.on_batch(d, [TokenChunk("r3", [])])
    out = [c for f in w.frontends.sent[before:] for c in frontend_chunks(f)[1]]
    assert [(c.token_ids, c.num_prompt_tokens, c.worker_id) for c in out] == [([42], 8000, "d")]
    w.streams.on_batch(d, [TokenChunk("r3", [], num_prompt_tokens=0)])  # nothing to relay
    w.clock.advance(0.005)
    w.streams.on_batch(d, [TokenChunk("r3", [43], num_prompt_tokens=8000, cached_tokens=8000)])
    out = [c for f in w.frontends.sent[before:] for c in frontend_chunks(f)[1]]
    assert [(c.token_ids, c.num_prompt_tokens) for c in out] == [([42], 8000), ([43], 0)]
    # A short prompt's hand-off fits the ITL target: its first token streams at once.
    place(w, "r2", tokens=8)
    w.streams.on_batch(p, [TokenChunk("r2", [7], FINISH_LENGTH, num_prompt_tokens=8)])
    _, chunks = frontend_chunks(w.frontends.sent[-1])
    assert [c.token_ids for c in chunks] == [[7]]


def test_a_held_first_token_goes_out_alone_when_the_decode_worker_is_late() -> None:
    """A held first token whose decode worker has not begun its next step by the hand-off
    fit's deadline (it is in a long step: a local prefill) goes out alone, paid from the ITL
    miss budget; the decode worker's first token then streams as usual. Without a budget no
    deadline is set, and a token released by the decode worker is never sent twice."""
    for budget in (0.05, 0.0):
        p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
        w = wire(p, d, **{"disagg_ttft_target_ms": 400.0, "disagg_itl_target_ms": 20.0,
                          "disagg_hold_first_token": True, "disagg_itl_miss_budget": budget})
        timers: list[tuple[float, Callable[[], None]]] = []
        w.streams.call_later = lambda delay, fn, t=timers: t.append((delay, fn))
        for rid in ("r1", "r2"):
            place(w, rid, tokens=8000, max_tokens=100)
            w.streams.on_batch(p, [TokenChunk(rid, [42], FINISH_LENGTH,
                                              num_prompt_tokens=8000)])
        assert w.frontends.sent == []  # both held
        if not budget:
            assert timers == []
            continue
        model = w.streams.disagg.handoff_models[MODEL]
        assert [round(t, 4) for t, _ in timers] == [round(model.upper(8000) / 1000, 4)] * 2
        w.clock.advance(timers[0][0])
        timers[0][1]()  # r1's deadline: the decode worker has sent nothing
        out = [c for f in w.frontends.sent for c in frontend_chunks(f)[1]]
        assert [(c.request_id, c.token_ids, c.num_prompt_tokens, c.worker_id) for c in out] == [
            ("r1", [42], 8000, "d")]
        assert counter(w.metrics.disagg_handoffs, "first_token_late") == 1
        w.streams.on_batch(d, [TokenChunk("r1", [43], num_prompt_tokens=8000,
                                          cached_tokens=8000)])
        # r2's decode worker began in time: its deadline finds nothing held.
        w.streams.on_batch(d, [TokenChunk("r2", [])])
        timers[1][1]()
        out = [(c.request_id, c.token_ids, c.num_prompt_tokens)
               for f in w.frontends.sent for c in frontend_chunks(f)[1]]
        assert out == [("r1", [42], 8000), ("r1", [43], 0), ("r2", [42], 8000)]
        assert counter(w.metrics.disagg_handoffs, "first_token_late") == 1
        assert counter(w.metrics.disagg_handoffs, "first_token_held") == 1


@pytest.mark.parametrize(("room", "kw", "veto", "expect"), [
    # The prefill pool's queue makes remote 3x slower; the budget pays for three streams.
    (True, {"local_step_ms": 45, "remote_ttft_ms": 150}, 0, ("local", "ttft_gain")),
    (False, {"local_step_ms": 45, "remote_ttft_ms": 150}, 0, ("remote", "decode_itl")),
    # Remote not slow enough to be worth a stretched step.
    (True, {"local_step_ms": 45, "remote_ttft_ms": 70}, 0, ("remote", "decode_itl")),
    # Local would itself miss the TTFT target.
    (True, {"local_step_ms": 45, "local_ttft_ms": 250, "remote_ttft_ms": 400}, 0,
     ("remote", "decode_itl")),
    # The decode worker's veto holds.
    (True, {"local_step_ms": 45, "remote_ttft_ms": 150}, 8, ("remote", "decode_busy")),
    # Harmless local prefills never touch the budget: the usual rules.
    (True, {"exposed_streams": 0, "remote_ttft_ms": 150}, 0, ("remote", "long_uncached")),
    # Not slow itself, but it would join two prompts waiting 40 ms already and delay them
    # 30 ms: their first tokens at 110 ms, against 70 ms without it.
    (True, {"local_step_ms": 45, "remote_ttft_ms": 70, "queue_wait_ms": 40,
            "queue_ttft_ms": 30}, 0, ("local", "ttft_gain")),
    # The same wait, and it would not delay them much: remote.
    (True, {"local_step_ms": 45, "remote_ttft_ms": 70, "queue_wait_ms": 40,
            "queue_ttft_ms": 60}, 0, ("remote", "decode_itl")),
])
def test_the_itl_miss_budget_buys_local_prefills_out_of_the_ttft_tail(
        room: bool, kw: dict[str, float], veto: int, expect: tuple[str, str]) -> None:
    assert choose_path(LIMITS, 1400, 1400, 0, veto, costs(**kw), room) == expect
    # `always` is remote whatever the budget.
    always = dataclasses.replace(LIMITS, mode="always")
    assert choose_path(always, 1400, 1400, 0, veto, costs(**kw), room)[0] == "remote"


def test_a_prompt_for_a_busy_prefill_worker_waits_for_the_running_step() -> None:
    """The remote TTFT the path decision prices: a prompt cannot join the prefill step running
    on the worker, so it waits for what is left of that step (less, the longer it has run),
    then goes in with the prompts that queued behind it."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d)
    disagg = w.streams.disagg
    steps = disagg.cost_models.get(MODEL).steps

    def ttft() -> float:
        return disagg.prefill_ttft(steps, p, 1400)

    assert ttft() == pytest.approx(steps.ttft_ms(0, 1400))  # idle
    place(w, "q0", tokens=1400)
    step = steps.ttft_ms(1400, 0)
    assert ttft() == pytest.approx(step + steps.ttft_ms(0, 1400))
    w.clock.advance(0.010)
    assert ttft() == pytest.approx(step - 10 + steps.ttft_ms(0, 1400))
    place(w, "q1", tokens=800)  # queued behind the running step: the next one takes both
    assert ttft() == pytest.approx(step - 10 + steps.ttft_ms(800, 1400))
    w.clock.advance(0.030)
    w.streams.on_batch(p, [TokenChunk("q0", [42], FINISH_LENGTH, num_prompt_tokens=1400)])
    assert ttft() == pytest.approx(steps.ttft_ms(800, 0) + steps.ttft_ms(0, 1400))  # q1's now
    w.clock.advance(1.0)  # overdue: it ends any moment
    assert ttft() == pytest.approx(steps.ttft_ms(0, 1400))


def test_prompts_waiting_for_the_running_step_are_dated_by_the_oldest() -> None:
    """A prompt placed on a prefill worker that is busy waits for the running step with the
    others placed since; the router dates that queue by its oldest, and forgets it when the
    step ends (they all go into the next one) or when the waiting ones are gone."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d)
    usage = p.usage
    place(w, "q0", tokens=1400)  # an idle worker starts on it: nothing waits
    assert usage.queued_since == 0.0
    w.clock.advance(0.010)
    place(w, "q1", tokens=800)
    waiting_since = w.clock()
    w.clock.advance(0.005)
    place(w, "q2", tokens=800)
    assert usage.queued_since == waiting_since  # the oldest's time
    w.streams.on_batch(p, [TokenChunk("q0", [42], FINISH_LENGTH, num_prompt_tokens=1400)])
    assert usage.queued_since == 0.0  # q1 and q2 run now
    w.clock.advance(0.005)
    place(w, "q3", tokens=800)
    assert usage.queued_since == w.clock()
    w.streams.on_cancel("q3")  # the client went away
    assert usage.queued_since == 0.0  # the only one waiting left


def test_a_local_prefill_out_of_the_ttft_tail_spends_the_budget() -> None:
    """A decode worker with a stream, a prefill worker busy with a long prompt: the next long
    prompt would wait for that step to end, so it prefills on the decode worker, paid by the
    gaps of the streams in flight; once the budget is spent the next goes remote again. When
    recent first tokens came slower than this one's would on the prefill pool, it is not in
    the TTFT tail: it goes remote and the budget is kept."""
    for tail in (False, True):
        p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
        w = wire(p, d, mode="conditional", kv=True, disagg_itl_miss_budget=0.01, **SLA)
        cache_on(w, "d", list(range(100, 132)), 7)
        # Cached on d, which is idle: local. Admitted to stream 300 tokens, it counts the
        # prior's 255 gaps (and each request below its 15): room for about 3 stretched ones.
        place(w, "s", tokens=32, max_tokens=300)
        w.streams.on_batch(d, [TokenChunk("s", [1], num_prompt_tokens=8)])
        w.streams.on_batch(d, [TokenChunk("s", [1] * 99)])
        place(w, "q0", tokens=1400)  # remote: the prefill worker is idle
        assert len(sent(p)) == 1
        w.clock.advance(0.005)  # its step has run 5 ms of ~38: the next waits ~33 ms more
        disagg = w.streams.disagg
        if tail:
            # Recent first tokens were slower still: r1 is not in the TTFT tail, and the
            # budget is kept for those that are.
            for _ in range(disagg.ttft_tail.min_samples):
                disagg.ttft_tail.observe(500.0)
            before = counter(w.metrics.disagg_decisions, "remote", "decode_itl")
            place(w, "r1", tokens=1400)
            assert counter(w.metrics.disagg_decisions, "remote", "decode_itl") == before + 1
            assert generate_decoder.decode(sent(p)[-1][1]).request_id == "r1"
            assert counter(w.metrics.disagg_decisions, "local", "ttft_gain") == 0
            assert w.metrics.disagg_stretched_streams._value.get() == 0
            continue
        place(w, "r1", tokens=1400)
        assert counter(w.metrics.disagg_decisions, "local", "ttft_gain") == 1
        assert generate_decoder.decode(sent(d)[-1][1]).request_id == "r1"
        stretched = w.metrics.disagg_stretched_streams._value.get()
        assert 1 <= stretched <= 3
        place(w, "r2", tokens=1400)  # the budget is spent
        assert counter(w.metrics.disagg_decisions, "local", "ttft_gain") == 1
        assert generate_decoder.decode(sent(p)[-1][1]).request_id == "r2"


def test_a_first_token_already_in_the_ttft_tail_goes_out_at_once_on_the_budget() -> None:
    """Twenty hand-offs held 10 ms after placement set the tail; a first token that came after
    100 ms would only get later held for its hand-off: with budget for one gap it goes out at
    once; without (the default budget 0), it is held as before."""
    for budget, tail_sent in ((0.02, 1), (0.0, 0)):
        p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
        w = wire(p, d, **{"disagg_ttft_target_ms": 400.0, "disagg_itl_target_ms": 20.0,
                          "disagg_hold_first_token": True, "disagg_itl_miss_budget": budget})
        for i in range(20):
            rid = f"h{i}"
            place(w, rid, tokens=8000)
            w.clock.advance(0.010)
            w.streams.on_batch(p, [TokenChunk(rid, [42], FINISH_LENGTH,
                                              num_prompt_tokens=8000)])
            w.streams.on_batch(d, [TokenChunk(rid, [43], num_prompt_tokens=8000,
                                              cached_tokens=8000)])
            w.streams.on_batch(d, [TokenChunk(rid, [44] * 10, FINISH_LENGTH)])
        assert counter(w.metrics.disagg_handoffs, "first_token_held") == 20
        before = len(w.frontends.sent)
        place(w, "slow", tokens=8000)
        w.clock.advance(0.100)
        w.streams.on_batch(p, [TokenChunk("slow", [42], FINISH_LENGTH, num_prompt_tokens=8000)])
        out = [c.token_ids for f in w.frontends.sent[before:] for c in frontend_chunks(f)[1]]
        assert out == ([[42]] if tail_sent else [])
        assert counter(w.metrics.disagg_handoffs, "first_token_tail") == tail_sent


def test_a_decode_worker_in_a_long_local_prefill_is_priced_by_what_is_left_of_it() -> None:
    """A prompt arriving while its decode worker runs a long local prefill: both its local TTFT
    and the hand-off gap it would get there (its KV lands mid-step) shrink as that step runs,
    as on a prefill worker. Priced from the step's start instead, a short prompt 150 ms into an
    8,000-token step looked ~150 ms worse on both paths: its first token, which could be held
    into a 200 ms TTFT, streamed at once and the rest of the step opened the gap after it."""
    p, d = role("p", MODE_PREFILL), role("d", MODE_DECODE)
    w = wire(p, d, mode="conditional", kv=True, **SLA)
    place(w, "r1", tokens=8000)
    assert counter(w.metrics.disagg_decisions, "local", "handoff_gap") == 1
    disagg = w.streams.disagg
    steps = disagg.cost_models.get(MODEL).steps
    step_ms = steps.ttft_ms(8000, 0, 1)
    short = request("r2", 32)

    def costs() -> PathCosts:
        return disagg.path_costs(MODEL, 32, 32, d, 1, disagg.prefill_policy.decide(short, [p]),
                                 prefill_inflight=0, decode_workers=1)

    start = costs()
    # It cannot join the running step: it waits for it, then takes the next.
    assert start.local_ttft_ms == pytest.approx(step_ms + steps.ttft_ms(0, 32, 1))
    assert start.handoff_ms > step_ms - start.remote_ttft_ms  # the whole step lies ahead
    w.clock.advance(0.150)
    later = costs()
    assert later.local_ttft_ms == pytest.approx(step_ms - 150 + steps.ttft_ms(0, 32, 1))
    assert later.handoff_ms == pytest.approx(start.handoff_ms - 150)
    assert later.remote_ttft_ms + later.handoff_ms <= SLA["disagg_ttft_target_ms"]
    w.clock.advance(1.0)  # overdue: it ends any moment; the pull alone is left
    assert costs().handoff_ms == pytest.approx(start.handoff_ms - (step_ms - start.remote_ttft_ms))
