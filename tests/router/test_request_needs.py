"""What a request asks of a worker beyond its model. Requests with a `priority` go only to
workers that schedule by it (--scheduling-policy priority), requests with structured outputs
only to workers whose engine applies them (their discovery record says so: one that does not,
or is too old to say, would refuse the request or ignore the constraint); both in both
disaggregated phases; a model with none refuses them; a stream already under way goes where it
is honoured while such a worker is left, else anywhere."""

from __future__ import annotations

import msgspec
import pytest

from common.messages import (
    FINISH_LENGTH,
    MODE_DECODE,
    MODE_PREFILL,
    PHASE_DECODE,
    PHASE_PREFILL,
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


def by_priority(handle):  # type: ignore[no-untyped-def]
    handle.instance.metadata["scheduling"] = "priority"
    return handle


def test_a_prioritised_request_goes_only_where_priority_is_honoured() -> None:
    a, b = worker("a"), by_priority(worker("b"))
    selector = Selector(pool_of(a, b), RoundRobin(), RouterMetrics("r"))
    urgent = msgspec.structs.replace(request(), priority=-1)
    assert {selector.choose(urgent).worker.id for _ in range(4)} == {"b"}
    assert {selector.choose(request()).worker.id for _ in range(4)} == {"a", "b"}
    # A stream migrating off b goes on where it can rather than fail, where its priority
    # counts while a worker scheduling by it is left.
    moving = msgspec.structs.replace(request(generated=3), priority=-1)
    assert selector.choose(moving, exclude="b").worker.id == "a"
    c = by_priority(worker("c"))
    selector.pool.workers["c"] = c
    assert {selector.choose(moving, exclude="b").worker.id for _ in range(4)} == {"c"}
    del selector.pool.workers["c"]
    # Named by the client: the worker's to refuse (it says why).
    named = msgspec.structs.replace(request(target="a"), priority=-1)
    assert selector.choose(named).worker.id == "a"
    b.instance.metadata["scheduling"] = "fcfs"
    with pytest.raises(RoutingError) as refused:
        selector.choose(urgent)
    assert refused.value.code == 400 and "--scheduling-policy priority" in str(refused.value)


def prioritised(req):  # type: ignore[no-untyped-def]
    return msgspec.structs.replace(req, priority=2)


def shaped(req):  # type: ignore[no-untyped-def]
    return msgspec.structs.replace(req, sampling=msgspec.structs.replace(req.sampling,
                                                                          structured=SHAPE))


def applying(handle):  # type: ignore[no-untyped-def]
    handle.instance.metadata["structured_outputs"] = True
    return handle


# (what a request asks, a worker honouring it, its metadata key and a value that does not, and
# whether a phase sent on still asks it)
ASKS = [
    (prioritised, by_priority, "scheduling", "fcfs", lambda r: r.priority == 2),
    (shaped, applying, "structured_outputs", False, lambda r: r.sampling.structured == SHAPE),
]


@pytest.mark.parametrize(("asking", "honouring", "key", "off", "carried"), ASKS)
def test_both_phases_go_where_what_the_request_asks_is_honoured(  # type: ignore[no-untyped-def]
        asking, honouring, key, off, carried) -> None:
    p1, p2 = role("p1", MODE_PREFILL), honouring(role("p2", MODE_PREFILL))
    d1, d2 = role("d1", MODE_DECODE), honouring(role("d2", MODE_DECODE))
    w = wire(p1, p2, d1, d2)
    for i in range(2):
        req = asking(request(f"r{i}"))
        w.streams.on_generate(b"fe", req, encoder.encode(req))
        w.streams.on_batch(p2, [TokenChunk(f"r{i}", [42], FINISH_LENGTH, num_prompt_tokens=8)])
    assert sent(p1) == [] and sent(d1) == []
    phases = [generate_decoder.decode(payload) for _, payload in sent(p2) + sent(d2)]
    assert [r.phase for r in phases] == [PHASE_PREFILL] * 2 + [PHASE_DECODE] * 2
    assert all(carried(r) for r in phases)
    # No prefill worker honours it: its prompt runs on the decode worker that does.
    p2.instance.metadata[key] = off
    req = asking(request("r9"))
    w.streams.on_generate(b"fe", req, encoder.encode(req))
    assert generate_decoder.decode(sent(d2)[-1][1]).phase == ""


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
