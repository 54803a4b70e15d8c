"""Requests with structured outputs go only to workers whose engine applies them (their
discovery record says so: a worker that does not, or too old to say, would refuse the request
or ignore the constraint), in both disaggregated phases; a model with none refuses them; a
stream already under way goes to such a worker while one is left, else anywhere."""

from __future__ import annotations

import msgspec
import pytest

from common.messages import (
    FINISH_LENGTH,
    MODE_DECODE,
    MODE_PREFILL,
    PHASE_DECODE,
    StructuredOutput,
    TokenChunk,
    encoder,
)
from services.router.metrics import RouterMetrics
from services.router.policies import RoundRobin, RoutingError
from services.router.selection import Selector
from tests.router.fakes import pool_of, request, sent, worker
from tests.router.test_disaggregation import generate_decoder, role, wire

SHAPE = StructuredOutput(regex="[a-z]+")


def applying(handle):  # type: ignore[no-untyped-def]
    handle.instance.metadata["structured_outputs"] = True
    return handle


def shaped(req):  # type: ignore[no-untyped-def]
    return msgspec.structs.replace(req, sampling=msgspec.structs.replace(req.sampling,
                                                                          structured=SHAPE))


def test_a_constrained_request_goes_only_where_constraints_are_applied() -> None:
    a, b = worker("a"), applying(worker("b"))
    selector = Selector(pool_of(a, b), RoundRobin(), RouterMetrics("r"))
    assert {selector.choose(shaped(request())).worker.id for _ in range(4)} == {"b"}
    assert {selector.choose(request()).worker.id for _ in range(4)} == {"a", "b"}
    # Moving off b: to another worker that applies it while one is left, else on anyway.
    moving = shaped(request(generated=3))
    c = applying(worker("c"))
    selector.pool.workers["c"] = c
    assert {selector.choose(moving, exclude="b").worker.id for _ in range(4)} == {"c"}
    del selector.pool.workers["c"]
    assert selector.choose(moving, exclude="b").worker.id == "a"
    # With a priority too, it needs both.
    both = msgspec.structs.replace(shaped(request()), priority=1)
    with pytest.raises(RoutingError) as refused:
        selector.choose(both)
    assert refused.value.code == 400 and "--scheduling-policy priority" in str(refused.value)
    b.instance.metadata["scheduling"] = "priority"
    assert selector.choose(both).worker.id == "b"
    b.instance.metadata["structured_outputs"] = False
    with pytest.raises(RoutingError) as refused:
        selector.choose(shaped(request()))
    assert refused.value.code == 400 and "--engine vllm" in str(refused.value)


def test_both_phases_of_a_constrained_request_go_where_it_is_applied() -> None:
    p1, p2 = role("p1", MODE_PREFILL), applying(role("p2", MODE_PREFILL))
    d1, d2 = role("d1", MODE_DECODE), applying(role("d2", MODE_DECODE))
    w = wire(p1, p2, d1, d2)
    for i in range(2):
        req = shaped(request(f"r{i}"))
        w.streams.on_generate(b"fe", req, encoder.encode(req))
        w.streams.on_batch(p2, [TokenChunk(f"r{i}", [42], FINISH_LENGTH, num_prompt_tokens=8)])
    assert sent(p1) == [] and sent(d1) == []
    decoded = [generate_decoder.decode(payload) for _, payload in sent(d2)]
    assert [(r.phase, r.sampling.structured) for r in decoded] == [(PHASE_DECODE, SHAPE)] * 2
