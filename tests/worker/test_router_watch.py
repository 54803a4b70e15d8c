"""The worker's view of its routers: a router that pinged and went silent is lost, a stalled
worker judges nobody, and a resumed request still running here is handed over with exactly the
tokens the new router's frontend lacks."""

from __future__ import annotations

from common.messages import GenerateRequest, SamplingParams, TokenChunk
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


def request(generated: list[int]) -> GenerateRequest:
    return GenerateRequest("x", "m", [1, 2], SamplingParams(max_tokens=9),
                           generated_token_ids=generated)


def test_handover_sends_what_the_frontend_lacks() -> None:
    watch = RouterWatch(1.0)
    watch.admitted(request([5]))
    watch.on_chunk(TokenChunk("x", [6, 7]))
    watch.on_chunk(TokenChunk("x", [8]))
    assert watch.handover(request([5, 6])) == [7, 8]
    assert watch.handover(request([5, 6, 7, 8])) == []
    # Not what this worker generated, or more than it has: start afresh.
    assert watch.handover(request([5, 9])) is None
    assert watch.handover(request([5, 6, 7, 8, 9])) is None
    watch.on_chunk(TokenChunk("x", [9], finish_reason="length"))
    assert watch.handover(request([5])) is None  # finished: nothing to hand over
    assert watch.generated == {}
