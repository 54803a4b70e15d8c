"""The worker's view of its routers: a router that pinged and went silent is lost, a stalled
worker judges nobody, a resumed request still running here is handed over with exactly the
tokens the new router's frontend lacks, and one that ended while its router did not listen is
replayed."""

from __future__ import annotations

import msgspec

from common.messages import GenerateRequest, SamplingParams, TokenChunk, TokenLogprob
from services.worker.router_watch import RouterWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_router_silent_past_the_timeout_is_lost_once() -> None:
    clock = Clock()
    watch = RouterWatch(1.0, clock)
    watch.on_ping(b"r1")
    watch.on_frame(b"peer")  # never pinged (a peer worker pulling KV): never judged
    clock.now += 0.9
    watch.on_frame(b"r1")
    clock.now += 0.9
    assert watch.lost() == []
    clock.now += 0.2
    assert watch.lost() == [b"r1"]
    assert watch.lost() == []


def test_a_worker_that_did_not_run_judges_no_router() -> None:
    clock = Clock()
    watch = RouterWatch(1.0, clock)
    watch.on_ping(b"r1")
    clock.now += 5
    watch.pause()
    assert watch.lost() == []


def test_after_its_own_pause_a_worker_loses_no_router_for_as_long_again() -> None:
    """A whole host paused 3 s and the worker runs again first: no router is lost for 3 s,
    not even after a ping read just after the pause (it may have been sent before it)."""
    clock = Clock()
    watch = RouterWatch(1.0, clock)
    watch.on_ping(b"queued")
    watch.on_ping(b"dead")
    clock.now += 3
    watch.pause(3.0)
    watch.on_ping(b"queued")
    clock.now += 2.9
    assert watch.lost() == []
    clock.now += 0.2
    assert sorted(watch.lost()) == [b"dead", b"queued"]


def request(generated: list[int]) -> GenerateRequest:
    return GenerateRequest("x", "m", [1, 2], SamplingParams(max_tokens=9),
                           generated_token_ids=generated)


def test_handover_sends_what_the_frontend_lacks() -> None:
    watch = RouterWatch(1.0)
    watch.admitted(request([5]))
    chunks = [TokenChunk("x", [6, 7]), TokenChunk("x", [8])]
    for chunk in chunks:
        watch.on_chunk(chunk)
    # Each chunk says where its tokens start in the response (the resumed request's included).
    assert [c.offset for c in chunks] == [1, 3]
    handed = watch.handover(request([5, 6]))
    assert handed is not None and (handed.token_ids, handed.offset) == ([7, 8], 2)
    handed = watch.handover(request([5, 6, 7, 8]))
    assert handed is not None and handed.token_ids == []
    # Not what this worker generated, or more than it has: start afresh.
    assert watch.handover(request([5, 9])) is None
    assert watch.handover(request([5, 6, 7, 8, 9])) is None
    last = TokenChunk("x", [9], finish_reason="length")
    watch.finished(last, b"r1", replayable=True)
    assert last.offset == 4
    assert watch.handover(request([5])) is None  # finished: nothing to hand over
    assert watch.generated == {}
    assert watch.replay(request([5])) is None  # r1 never pinged: no router to outlive


def test_every_chunk_of_a_numbered_run_carries_its_number() -> None:
    """A router numbers a resumed request's run (`GenerateRequest.run`): its chunks, the
    tokens a handover sends and a replay carry it, so the router can tell them from those of
    an earlier run it cancelled here; a run with no number clears it."""
    clock = Clock()
    watch = RouterWatch(1.0, clock)
    watch.admitted(msgspec.structs.replace(request([5]), run=3))
    chunk, last = TokenChunk("x", [6]), TokenChunk("x", [7], finish_reason="length")
    watch.on_chunk(chunk)
    watch.on_ping(b"r1")
    watch.finished(last, b"r1", replayable=True)
    assert (chunk.run, last.run) == (3, 3) and watch.runs == {}
    replay = watch.replay(msgspec.structs.replace(request([5]), run=4))
    assert replay is not None and (replay.token_ids, replay.run) == ([6, 7], 4)
    watch.admitted(msgspec.structs.replace(request([5]), run=5))
    handed = watch.handover(msgspec.structs.replace(request([5]), run=6))
    assert handed is not None and (handed.token_ids, handed.run) == ([], 6)
    after = TokenChunk("x", [6])
    watch.on_chunk(after)
    assert after.run == 6  # the new router's number from now on
    watch.admitted(request([5]))  # its next run unnumbered (a migration back here)
    unnumbered = TokenChunk("x", [6])
    watch.on_chunk(unnumbered)
    assert unnumbered.run == 0 and watch.runs == {}


def ended_while(watch: RouterWatch, router: bytes, request_id: str = "x",
                replayable: bool = True, error_code: int = 0) -> None:
    watch.admitted(GenerateRequest(request_id, "m", [1, 2], SamplingParams(max_tokens=9)))
    watch.on_chunk(TokenChunk(request_id, [6, 7]))
    watch.finished(TokenChunk(request_id, [8], finish_reason="stop", error_code=error_code),
                   router, replayable)


def test_a_stream_that_ended_while_its_router_was_silent_is_replayed_once() -> None:
    clock = Clock()
    watch = RouterWatch(1.0, clock)
    watch.on_ping(b"r1")
    ended_while(watch, b"r1")
    replay = watch.replay(request([6]))
    assert replay is not None
    assert (replay.token_ids, replay.finish_reason, replay.offset) == ([7, 8], "stop", 1)
    assert watch.replay(request([6])) is None  # once
    ended_while(watch, b"r1")
    assert watch.replay(request([6, 9])) is None  # not what was generated here: a rerun


def test_an_ended_stream_is_dropped_once_its_router_pings_or_long_after_it_is_lost() -> None:
    clock = Clock()
    watch = RouterWatch(1.0, clock)
    watch.on_ping(b"r1")
    watch.on_ping(b"r2")
    clock.now += 0.05
    ended_while(watch, b"r1")
    clock.now += 0.05
    watch.on_ping(b"r1")  # maybe sent before the last chunk landed: proves nothing
    assert b"r1" in watch.ended
    clock.now += 0.05
    watch.on_ping(b"r1")  # sent a period after the previous one came: it got the chunk
    assert watch.replay(request([])) is None
    ended_while(watch, b"r2", "y")
    clock.now += 1.5
    assert watch.lost() == [b"r1", b"r2"]
    # Lost just now: a resume may still be on its way.
    assert watch.replay(GenerateRequest("y", "m", [1, 2], SamplingParams(max_tokens=9),
                                        resumed=True)) is not None
    ended_while(watch, b"r3")  # never pinged
    assert watch.ended == {}
    watch.on_ping(b"r4")
    ended_while(watch, b"r4", "z")
    clock.now += 1.5
    watch.lost()
    assert b"r4" in watch.ended
    clock.now += 1.5
    watch.lost()
    assert watch.ended == {}


def test_no_replay_of_a_prefill_phase_or_a_failed_stream() -> None:
    watch = RouterWatch(1.0)
    watch.on_ping(b"r1")
    ended_while(watch, b"r1", replayable=False)
    ended_while(watch, b"r1", "y", error_code=500)
    ended_while(watch, b"r1", "z")
    assert list(watch.ended[b"r1"]) == ["z"]


def test_a_handover_and_a_replay_carry_the_logprobs_of_the_tokens_they_send() -> None:
    """With logprobs asked for, the tokens a worker sends again come with theirs: the
    history starts at the tokens the request came with (those reached the client already)."""
    clock = Clock()
    watch = RouterWatch(1.0, clock)
    asked = GenerateRequest("x", "m", [1, 2], SamplingParams(max_tokens=9, logprobs=1),
                            generated_token_ids=[5])
    watch.admitted(asked)
    lp = {t: TokenLogprob(-t / 10, [t], [-t / 10]) for t in (6, 7, 8)}
    watch.on_chunk(TokenChunk("x", [6, 7], logprobs=[lp[6], lp[7]]))
    handed = watch.handover(msgspec.structs.replace(asked, generated_token_ids=[5, 6]))
    assert handed is not None and (handed.token_ids, handed.logprobs) == ([7], [lp[7]])
    watch.on_ping(b"r1")
    watch.finished(TokenChunk("x", [8], "length", logprobs=[lp[8]]), b"r1", replayable=True)
    replay = watch.replay(msgspec.structs.replace(asked, generated_token_ids=[5]))
    assert replay is not None and replay.token_ids == [6, 7, 8]
    assert replay.logprobs == [lp[6], lp[7], lp[8]]
    assert watch.logprobs == {}
