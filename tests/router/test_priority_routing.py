"""Requests with a `priority` go only to workers that schedule by it (--scheduling-policy
priority), in both disaggregated phases; a model with none refuses them; a stream already under
way goes where priority counts while such a worker is left, else anywhere."""

from __future__ import annotations

import msgspec
import pytest

from common.messages import (
    FINISH_LENGTH,
    MODE_DECODE,
    MODE_PREFILL,
    PHASE_DECODE,
    PHASE_PREFILL,
    TokenChunk,
    encoder,
)
from services.router.metrics import RouterMetrics
from services.router.policies import RoundRobin, RoutingError
from services.router.selection import Selector
from tests.router.fakes import pool_of, request, sent, worker
from tests.router.test_disaggregation import generate_decoder, role, wire


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


def test_both_phases_of_a_prioritised_request_go_where_priority_is_honoured() -> None:
    p1, p2 = role("p1", MODE_PREFILL), by_priority(role("p2", MODE_PREFILL))
    d1, d2 = role("d1", MODE_DECODE), by_priority(role("d2", MODE_DECODE))
    w = wire(p1, p2, d1, d2)
    for i in range(2):
        req = msgspec.structs.replace(request(f"r{i}"), priority=2)
        w.streams.on_generate(b"fe", req, encoder.encode(req))
        w.streams.on_batch(p2, [TokenChunk(f"r{i}", [42], FINISH_LENGTH, num_prompt_tokens=8)])
    assert sent(p1) == [] and sent(d1) == []
    phases = [generate_decoder.decode(payload) for _, payload in sent(p2) + sent(d2)]
    assert [(r.phase, r.priority) for r in phases] == [(PHASE_PREFILL, 2)] * 2 + [
        (PHASE_DECODE, 2)] * 2
    # No prefill worker honours it: its prompt runs on the decode worker that does.
    p2.instance.metadata["scheduling"] = "fcfs"
    req = msgspec.structs.replace(request("r9"), priority=2)
    w.streams.on_generate(b"fe", req, encoder.encode(req))
    assert generate_decoder.decode(sent(d2)[-1][1]).phase == ""
    assert sent(p1) == [] and len(sent(p2)) == 2
