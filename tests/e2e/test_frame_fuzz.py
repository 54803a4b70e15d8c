"""Hostile frames on every plane socket: 10,000 random and truncated frames each at the frontend's
upstream (reply side), the router's request side, the worker's request side and the router's
event-plane subscriber. Every one is counted and dropped, the services keep serving, and their
memory stays flat."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import openai
import psutil
import pytest
import zmq

from common.messages import (
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_KV_PULL,
    KIND_KV_RELEASE,
    KIND_TOKENS,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    TOPIC_LOAD,
    Cancel,
    EventEnvelope,
    GenerateRequest,
    KvBlockStored,
    KvEventBatch,
    SamplingParams,
    TokenBatch,
    TokenChunk,
    cancel_decoder,
    encoder,
    envelope_decoder,
    generate_decoder,
    kv_pull_decoder,
    kv_release_decoder,
    token_batch_decoder,
)
from turnout.testing.deployment import Deployment, reaped, wait_for

pytestmark = pytest.mark.e2e

FRAMES = 10_000
RSS_GROWTH_BOUND = 64 * 1024 * 1024  # bytes a process may grow over the whole fuzz
MALFORMED_ROUTER = "turnout_router_malformed_frames_total"


def fuzz_frames(rng: random.Random, decoders: dict[bytes, msgspec.msgpack.Decoder[Any]],
                valid: list[bytes], count: int = FRAMES) -> list[list[bytes]]:
    """`count` messages none of which decodes: random bytes, valid messages cut short, the
    wrong number of frames. `decoders`: the socket's kinds (first frames, or topics) and how
    it decodes their body; a random message that happens to decode is drawn again. `valid`:
    encoded bodies to truncate."""
    kinds = list(decoders)
    out: list[list[bytes]] = []
    while len(out) < count:
        shape = len(out) % 4
        kind = rng.choice(kinds)
        if shape == 0:  # a known kind, random body
            message = [kind, rng.randbytes(rng.randint(0, 64))]
        elif shape == 1:  # a known kind, a valid body truncated
            body = rng.choice(valid)
            message = [kind, body[:rng.randint(0, len(body) - 1)]]
        elif shape == 2:  # the wrong number of frames
            message = [kind] * rng.choice((1, 3, 4))
        else:  # an unknown kind
            message = [b"\xfe" + rng.randbytes(rng.randint(0, 8)), rng.randbytes(8)]
        if not decodes(message, decoders):
            out.append(message)
    return out


def decodes(message: list[bytes], decoders: dict[bytes, msgspec.msgpack.Decoder[Any]]) -> bool:
    if len(message) != 2 or message[0] not in decoders:
        return False
    try:
        decoders[message[0]].decode(message[1])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return True


def rss(dep: Deployment) -> dict[str, int]:
    return {s.name: psutil.Process(s.pid).memory_info().rss for s in dep.services}


def blast(sock: zmq.Socket, frames: list[list[bytes]], prefix: list[bytes] = ()) -> None:
    for message in frames:
        sock.send_multipart([*prefix, *message])


def wait_count(read: Callable[[], float], target: float, what: str) -> None:
    try:
        wait_for(lambda: read() >= target, 20, what)
    except TimeoutError:
        raise AssertionError(f"{what}: {read()} of {target}") from None
    assert read() == target, what  # exact: every frame counted once, none decoded


def steady(read: Callable[[], float]) -> float:
    """The counter once two reads 0.2 s apart agree (frames still in flight are counted)."""
    last = [read()]

    def settled() -> bool:
        time.sleep(0.2)
        now, last[0] = read(), last[0]
        same = now == last[0]
        last[0] = now
        return same

    wait_for(settled, 10, "a steady count")
    return last[0]


@pytest.fixture
def plain_deployment(tmp_path: Path) -> Iterator[Deployment]:
    """Without CURVE even under TURNOUT_TEST_CURVE=1: the fuzzers are plain ZeroMQ peers."""
    yield from reaped(Deployment(tmp_path, curve=False))


def test_ten_thousand_bad_frames_per_socket_are_counted_and_dropped(
        plain_deployment: Deployment) -> None:
    dep = plain_deployment
    dep.start(workers=1, worker_args=("--speedup-ratio", "0"))
    oai = openai.OpenAI(base_url=dep.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    assert oai.completions.create(model="mock", prompt="warm up", max_tokens=4).usage
    rng = random.Random(20261203)
    request = encoder.encode(GenerateRequest("fuzz", "mock", list(range(40)),
                                             SamplingParams(max_tokens=8)))
    cancel = encoder.encode(Cancel("fuzz-cancel"))
    tokens = encoder.encode(TokenBatch([TokenChunk("r", [1, 2, 3])]))
    router = next(r for r in dep.records() if r["role"] == "router")
    worker = dep.record("w1")
    assert worker is not None
    before = rss(dep)
    start = time.monotonic()
    ctx = zmq.Context()
    try:
        # Router, request side (a frontend's DEALER) and worker, request side (a router's).
        for endpoint, read, kinds in (
                (router["endpoints"]["request"],
                 lambda: dep.metrics_of(router["id"]).value(MALFORMED_ROUTER, plane="request"),
                 {KIND_GENERATE: generate_decoder, KIND_CANCEL: cancel_decoder,
                  KIND_TOKENS: token_batch_decoder}),
                (worker["endpoints"]["request"],
                 lambda: dep.metrics_of("w1").value("turnout_worker_malformed_frames_total"),
                 # (KIND_KV_DUMP is not here: any payload is a valid dump request.)
                 {KIND_GENERATE: generate_decoder, KIND_CANCEL: cancel_decoder,
                  KIND_KV_PULL: kv_pull_decoder, KIND_KV_RELEASE: kv_release_decoder})):
            base = read()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(endpoint)
            blast(sock, fuzz_frames(rng, kinds, [request, cancel]))
            wait_count(read, base + FRAMES, f"{FRAMES} malformed frames counted at {endpoint}")
            sock.close(linger=0)

        # The router's event-plane subscriber: a publisher it discovers (a worker record for
        # another model), first heard through a valid heartbeat, then fuzzing every topic.
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 0)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        (dep.discovery / "fuzz-pub.json").write_text(json.dumps({
            "id": "fuzz-pub", "role": "worker", "model": "other-model",
            "endpoints": {"request": "tcp://127.0.0.1:1", "events": f"tcp://127.0.0.1:{port}"},
            "metadata": {"started": 1.0}}))
        def subscribed() -> bool:
            # A message the router counts proves the subscription is live.
            pub.send_multipart([TOPIC_HEARTBEAT])
            return dep.metrics_of(router["id"]).value(MALFORMED_ROUTER, plane="event") > 0

        wait_for(subscribed, 20, "the router to subscribe to the fuzzing publisher")
        read_event = lambda: dep.metrics_of(router["id"]).value(  # noqa: E731
            MALFORMED_ROUTER, plane="event")
        base = steady(read_event)
        envelope = encoder.encode(EventEnvelope("fuzz-pub", 2, time.time(), msgspec.Raw(
            encoder.encode(KvEventBatch("fuzz-pub", [KvBlockStored([1], None, [0] * 16, 16)])))))
        events = fuzz_frames(rng, dict.fromkeys((TOPIC_HEARTBEAT, TOPIC_KV, TOPIC_LOAD),
                                                envelope_decoder), [envelope])
        # A SUB filters by topic: every message must start with a subscribed one.
        for message in events:
            if not any(message[0].startswith(t) for t in (TOPIC_HEARTBEAT, TOPIC_KV, TOPIC_LOAD)):
                message[0] = TOPIC_KV + message[0]
        blast(pub, events)
        wait_count(read_event, base + FRAMES, f"{FRAMES} malformed event frames counted")
        pub.close(linger=0)
        (dep.discovery / "fuzz-pub.json").unlink()

        # The frontend's upstream, reply side: a router it discovers, answering its first ping
        # with 10,000 bad frames. Then it leaves, and the real router serves the next request.
        fake = ctx.socket(zmq.ROUTER)
        fake.setsockopt(zmq.SNDHWM, 0)
        port = fake.bind_to_random_port("tcp://127.0.0.1")
        (dep.discovery / "fuzz-router.json").write_text(json.dumps({
            "id": "fuzz-router", "role": "router",
            "endpoints": {"request": f"tcp://127.0.0.1:{port}"}, "metadata": {"started": 1.0}}))
        assert fake.poll(20_000), "the frontend never pinged the fake router"
        frontend = fake.recv_multipart()[0]
        read_front = lambda: dep.frontend_metrics().value(  # noqa: E731
            "turnout_frontend_malformed_frames_total")
        base = read_front()
        replies = fuzz_frames(rng, {KIND_TOKENS: token_batch_decoder}, [tokens])
        blast(fake, replies, [frontend])
        wait_count(read_front, base + FRAMES, f"{FRAMES} malformed frames counted at frontend")
        (dep.discovery / "fuzz-router.json").unlink()
        fake.close(linger=0)
        wait_for(lambda: dep.frontend_metrics().value("turnout_frontend_routers") == 1, 20,
                 "the frontend to drop the fake router")
    finally:
        ctx.destroy(linger=0)
    elapsed = time.monotonic() - start
    out = oai.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "still serving?"}], max_tokens=5)
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert all(s.alive() for s in dep.services)
    after = rss(dep)
    growth = {name: after[name] - before[name] for name in before}
    print(f"fuzz: {4 * FRAMES} frames in {elapsed:.1f}s; RSS growth (bytes): {growth}")
    assert all(g < RSS_GROWTH_BOUND for g in growth.values()), growth
