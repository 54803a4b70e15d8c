"""The router's loops and worker lifecycle, over fake sockets, a fake discovery and a fake
clock: frames in, frames out; workers admitted, retired, lost and recovered."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest

from common.discovery.base import DiscoveryEvent
from common.messages import (
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_KV_DUMP,
    KIND_PING,
    KIND_TOKENS,
    TOPIC_FPM,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    TOPIC_LOAD,
    Cancel,
    EventEnvelope,
    ForwardPass,
    ForwardPassBatch,
    Heartbeat,
    Instance,
    KvBlockStored,
    KvEventBatch,
    LoadReport,
    TokenBatch,
    TokenChunk,
    cancel_decoder,
    encoder,
    generate_decoder,
)
from services.router.args import RouterConfig
from services.router.main import Router
from services.router.streams import send_error
from services.router.worker_pool import WorkerHandle
from tests.router.fakes import (
    FakeClock,
    FakeDealer,
    FakeSocket,
    SocketDone,
    counter,
    frontend_chunks,
    request,
)


class FakeSubscriber:
    def __init__(self, events: list[tuple[bytes, EventEnvelope]] | None = None) -> None:
        self.events = list(events or [])
        self.connected: list[str] = []
        self.disconnected: list[str] = []
        self.forgotten: list[str] = []

    def connect(self, endpoint: str) -> None:
        self.connected.append(endpoint)

    def disconnect(self, endpoint: str) -> None:
        self.disconnected.append(endpoint)

    def forget(self, publisher_id: str) -> None:
        self.forgotten.append(publisher_id)

    async def recv(self) -> tuple[bytes, EventEnvelope]:
        if not self.events:
            raise SocketDone
        return self.events.pop(0)


class FakeDiscovery:
    def __init__(self, events: list[DiscoveryEvent]) -> None:
        self.events = events

    async def watch(self, role: str) -> AsyncIterator[DiscoveryEvent]:
        for event in self.events:
            yield event


class Harness:
    def __init__(self, tmp_path: Path, **config: Any) -> None:
        config.setdefault("no_worker_wait_ms", 2000)
        self.clock = FakeClock()
        self.router = r = Router(RouterConfig(discovery=f"file:{tmp_path}", **config),
                                 self.clock)
        self.real_frontends = r.frontends
        self.frontends = FakeSocket()
        r.frontends = r.streams.frontends = self.frontends  # type: ignore[assignment]
        r.replicas.frontends.frontends = self.frontends  # type: ignore[assignment]
        r.replicas.handback.frontends = self.frontends  # type: ignore[assignment]
        r.migration.reply_error = functools.partial(send_error, self.frontends)
        r.pool.open_dealer = lambda endpoint, handler: FakeDealer(  # type: ignore[assignment]
            endpoint)
        self.subscriber = FakeSubscriber()
        r.subscriber = self.subscriber  # type: ignore[assignment]

    def admit(self, worker_id: str, started: float = 1.0) -> WorkerHandle:
        self.router._admit(instance(worker_id, started))
        return self.router.pool.workers[worker_id]

    def generate(self, rid: str = "r1", tokens: int = 8) -> None:
        req = request(rid, tokens=tokens)
        self.router.streams.on_generate(b"fe", req, encoder.encode(req))

    def event(self, worker_id: str, topic: bytes, message: Any) -> None:
        self.router.intake.on_event(self.router.pool.workers[worker_id], topic,
                                    encoder.encode(message))

    def close(self) -> None:
        for task in self.router._watchers.values():
            task.cancel()
        self.real_frontends.close()
        self.router.ctx.destroy(linger=0)


def instance(worker_id: str, started: float = 1.0) -> Instance:
    return Instance(id=worker_id, role="worker", model="m",
                    endpoints={"request": f"tcp://{worker_id}:1",
                               "events": f"tcp://{worker_id}:2"},
                    metadata={"block_size": 4, "started": started})


def sock(worker: WorkerHandle) -> FakeSocket:
    return worker.socket  # type: ignore[return-value]


def dealer(worker: WorkerHandle) -> FakeDealer:
    return worker.dealer  # type: ignore[return-value]


Scenario = Callable[["Harness"], Coroutine[Any, Any, None]]


def scenario(**config: Any) -> Callable[[Scenario], Callable[[Path], None]]:
    """Run an async test body against a router over fakes, inside an event loop (admitting a
    worker starts its connection task)."""
    def wrap(body: Scenario) -> Callable[[Path], None]:
        def test(tmp_path: Path) -> None:
            async def main() -> None:
                h = Harness(tmp_path, **config)
                try:
                    await body(h)
                finally:
                    h.close()
            asyncio.run(main())
        test.__name__, test.__doc__ = body.__name__, body.__doc__
        return test
    return wrap


def envelope(worker_id: str, message: Any) -> EventEnvelope:
    return EventEnvelope(worker_id, 1, 0.0, msgspec.Raw(encoder.encode(message)))


@scenario(router_mode="round-robin")
async def test_frontend_frames_are_placed_cancelled_or_counted_malformed(h: Harness) -> None:
    a = h.admit("a")
    payload = encoder.encode(request("r1"))
    for frames in ([b"fe", KIND_GENERATE, payload],
                   [b"fe", KIND_CANCEL, encoder.encode(Cancel("r1"))],
                   [b"fe", KIND_GENERATE],
                   [b"fe", b"??", b""],
                   [b"fe", KIND_GENERATE, b"\xc1"]):
        h.router.on_frontend_message(frames)
    assert sock(a).kinds() == [KIND_GENERATE, KIND_CANCEL]
    assert sock(a).sent[0][1] == payload
    assert cancel_decoder.decode(sock(a).sent[1][1]).request_id == "r1"
    assert counter(h.router.metrics.malformed, "request") == 3
    assert counter(h.router.metrics.requests, "cancelled") == 1


@scenario(router_mode="round-robin")
async def test_worker_frames_are_relayed_or_counted_malformed(h: Harness) -> None:
    a = h.admit("a")
    h.generate()
    for frames in ([KIND_TOKENS, encoder.encode(TokenBatch([TokenChunk("r1", [5])]))],
                   [KIND_TOKENS],
                   [b"??", b""],
                   [KIND_TOKENS, b"\xc1"]):
        h.router.on_worker_message(a, frames)
    ((ident, (chunk,)),) = [frontend_chunks(f) for f in h.frontends.sent]
    assert (ident, chunk.request_id, chunk.token_ids) == (b"fe", "r1", [5])
    assert counter(h.router.metrics.malformed, "request") == 3


@scenario(router_mode="round-robin")
async def test_a_dropped_connection_kills_the_worker_and_moves_its_requests(h: Harness) -> None:
    a, b = h.admit("a"), h.admit("b")
    h.generate("r1")  # to b (round-robin)
    h.generate("r2")  # to a
    watcher = h.router._watchers["a"]
    dealer(a).lost.set()  # its connection dropped
    await asyncio.wait_for(watcher, 5)
    assert "a" not in h.router.pool.workers and "a" in h.router.pool.dead
    assert a.inflight == 0 and sock(a).closed
    assert [generate_decoder.decode(f[1]).request_id for f in sock(b).sent] == ["r1", "r2"]
    assert counter(h.router.metrics.worker_deaths, "crash") == 1
    assert counter(h.router.metrics.migrations, "crash") == 1
    assert counter(h.router.metrics.workers, "dead") == 1
    assert h.subscriber.disconnected == ["tcp://a:2"] and h.subscriber.forgotten == ["a"]
    assert "a" not in h.router._watchers
    h.router.worker_lost(a, "crash")  # a second verdict changes nothing
    assert counter(h.router.metrics.worker_deaths, "crash") == 1


@scenario(router_mode="round-robin")
async def test_a_draining_workers_drop_is_a_drain(h: Harness) -> None:
    a = h.admit("a")
    h.event("a", TOPIC_HEARTBEAT, Heartbeat("a", 1, 0, draining=True))
    dealer(a).lost.set()
    await asyncio.wait_for(h.router.watch_connection(a), 5)
    assert counter(h.router.metrics.worker_deaths, "drain") == 1


@scenario(router_mode="kv")
async def test_a_silent_worker_becomes_a_suspect_and_recovers(h: Harness) -> None:
    a, b = h.admit("a"), h.admit("b")
    b.routable = False
    h.event("a", TOPIC_HEARTBEAT, Heartbeat("a", 3, 0, replica_peers=["b"]))
    assert sock(a).kinds() == [KIND_KV_DUMP]  # its events flow: one full dump
    h.generate("r1")
    b.routable = True
    h.clock.advance(0.05)
    h.router.check_liveness()
    h.clock.advance(0.31)  # a and b silent; b is judged too and has no requests
    h.event("b", TOPIC_HEARTBEAT, Heartbeat("b", 1, 0))
    h.router.check_liveness()  # late (0.31 > one period since the last check): skipped
    assert a.alive
    # The router did not run for 0.31 s: nor, maybe, did the workers. Silence counts from the
    # late check, and a gets as long again to be heard (b is) before its verdict.
    silent = 0.0
    while a.alive and silent < 1.0:
        h.clock.advance(0.05)
        silent += 0.05
        h.event("b", TOPIC_HEARTBEAT, Heartbeat("b", 1, 0))
        h.router.check_liveness()
    assert 0.31 < silent < 0.6
    assert not a.alive and a.suspect == 3 and "a" in h.router.pool.workers
    assert sock(a).kinds()[-1] == KIND_CANCEL  # it must not keep computing r1
    moved = generate_decoder.decode(sock(b).sent[-1][1])
    assert moved.request_id == "r1" and moved.kv_sources == []
    assert counter(h.router.metrics.worker_deaths, "hang") == 1
    assert counter(h.router.metrics.workers, "routable") == 1
    h.event("a", TOPIC_HEARTBEAT, Heartbeat("a", 4, 0))  # progress: back
    assert a.alive and a.routable
    assert counter(h.router.metrics.worker_recoveries) == 1
    assert sock(a).kinds()[-1] == KIND_KV_DUMP and counter(h.router.metrics.resyncs) == 3
    assert counter(h.router.metrics.workers, "routable") == 2


@scenario(router_mode="round-robin")
async def test_a_pause_that_lands_mid_check_judges_nobody(h: Harness) -> None:
    """SIGSTOP strikes anywhere: a router stopped in the middle of a check, after the check
    read the clock, and run again 5 s later (its workers and frontend stopped with it) judges
    no worker and no frontend by that check, whose verdicts are as of when it began; the next
    check, late, forgives the pause. Silence after it still counts."""
    a = h.admit("a")
    h.generate("r1")
    steps = 0

    def heard() -> None:
        nonlocal steps
        steps += 1
        h.event("a", TOPIC_HEARTBEAT, Heartbeat("a", steps, 1))
        h.router.replicas.on_frame(b"fe", KIND_PING)

    for _ in range(20):  # regular heartbeats and pings: their rhythm is learnt
        h.clock.advance(0.05)
        heard()
        h.router.check_liveness()
    note_serving = h.router.selector.note_serving

    def stopped_here() -> None:
        h.clock.advance(5.0)
        note_serving()

    h.router.selector.note_serving = stopped_here  # type: ignore[method-assign]
    h.clock.advance(0.05)
    h.router.check_liveness()
    h.router.selector.note_serving = note_serving  # type: ignore[method-assign]
    h.clock.advance(0.05)
    h.router.check_liveness()  # late: the pause is forgiven
    assert a.alive and a.inflight == 1
    assert counter(h.router.metrics.frontends_lost) == 0
    assert counter(h.router.metrics.worker_deaths, "hang") == 0
    for _ in range(20):  # they run again: heard as before
        h.clock.advance(0.05)
        heard()
        h.router.check_liveness()
    assert a.alive and counter(h.router.metrics.frontends_lost) == 0
    for _ in range(400):  # then silence, past the grace: judged
        h.clock.advance(0.05)
        h.router.check_liveness()
    assert not a.alive and counter(h.router.metrics.worker_deaths, "hang") == 1
    assert counter(h.router.metrics.frontends_lost) == 1


@scenario(router_mode="round-robin", no_worker_wait_ms=5000)
async def test_a_recovered_worker_takes_the_stranded_request(h: Harness) -> None:
    a = h.admit("a")
    h.generate("r1")
    h.clock.advance(0.5)
    h.router.check_liveness()  # the first check is never late
    assert not a.alive and "r1" in h.router.migration.stranded
    h.event("a", TOPIC_HEARTBEAT, Heartbeat("a", 1, 0))
    assert a.alive and a.inflight == 1 and not h.router.streams.waiting
    assert generate_decoder.decode(sock(a).sent[-1][1]).request_id == "r1"
    assert counter(h.router.metrics.resyncs) == 0  # no kv index to resync


@scenario(router_mode="round-robin", stall_timeout_ms=1000)
async def test_a_stalled_worker_is_judged_by_the_check(h: Harness) -> None:
    a = h.admit("a")
    h.generate("r1")
    for _ in range(25):
        h.clock.advance(0.05)
        h.event("a", TOPIC_HEARTBEAT, Heartbeat("a", 0, 1))
        h.router.check_liveness()
    assert not a.alive and counter(h.router.metrics.worker_deaths, "stall") == 1


@scenario(router_mode="kv")
async def test_events_feed_load_and_the_kv_index(h: Harness) -> None:
    a = h.admit("a")
    h.subscriber.events = [
        (TOPIC_LOAD, envelope("a", LoadReport("a", 7, 0, 3, 100, 0, 1))),
        (TOPIC_KV, envelope("a", KvEventBatch("a", [KvBlockStored([11, 12], None,
                                                                  list(range(8)), 4)]))),
        (TOPIC_LOAD, envelope("stranger", LoadReport("x", 1, 0, 0, 1, 0, 0))),
        (TOPIC_HEARTBEAT, EventEnvelope("a", 2, 0.0, msgspec.Raw(b"\xc1"))),
    ]
    with pytest.raises(SocketDone):
        await h.router.consume_events()
    assert a.load is not None and a.load.active_decode_blocks == 7
    assert a.load_at == h.clock.now
    assert h.router.kv_index is not None and h.router.kv_index.blocks_of("a") == {11, 12}
    assert counter(h.router.metrics.kv_events) == 1
    assert counter(h.router.metrics.malformed, "event") == 1
    h.router.check_liveness()
    assert counter(h.router.metrics.index_blocks) == 2


@scenario(router_mode="kv")
async def test_forward_passes_feed_the_adaptive_cost_and_its_metrics(h: Harness) -> None:
    """kv mode without a fixed weight subscribes to `fpm`; records fit the worker's model
    (once a load report has said how big its KV pool is) and the fit is exported."""
    assert TOPIC_FPM in h.router.topics
    h.admit("a")
    # An engine twice as slow at prefill as the prior assumes.
    records = [ForwardPass(i, 1, t, 0, 2 * (4.209989e-7 * t * t + 0.01518344 * t + 16.50142),
                           10) for i, t in enumerate(range(256, 8193, 256))]
    batch = ForwardPassBatch("a", records)
    h.subscriber.events = [
        (TOPIC_FPM, envelope("a", batch)),  # before any load report: dropped
        (TOPIC_LOAD, envelope("a", LoadReport("a", 0, 0, 10, 100, 0, 1))),
        (TOPIC_FPM, envelope("a", batch)),
    ]
    with pytest.raises(SocketDone):
        await h.router.consume_events()
    metrics = h.router.metrics
    assert counter(metrics.fpm_records, "no_load_report") == len(records)
    assert counter(metrics.fpm_records, "fitted") == len(records)
    models = h.router.selector.cost_models
    assert models is not None
    steps = models.get("m").steps
    assert steps.records == len(records) and steps.chunk_tokens == 8192
    assert steps.prefill_ms(4096) == pytest.approx(
        2 * (4.209989e-7 * 4096 ** 2 + 0.01518344 * 4096 + 16.50142), rel=0.02)
    h.router.check_liveness()
    coef = steps.coefficients
    assert counter(metrics.cost_coefficient, "m", "b") == coef.b
    assert counter(metrics.cost_records, "m") == len(records)
    assert counter(metrics.cost_chunk_tokens, "m") == 8192
    assert counter(metrics.queue_pressure, "m") == 0.0


@scenario(router_mode="kv", kv_overlap_weight=16.0)
async def test_a_fixed_overlap_weight_needs_no_forward_passes(h: Harness) -> None:
    assert TOPIC_FPM not in h.router.topics and h.router.selector.cost_models is None
    h.admit("a")
    h.event("a", TOPIC_FPM, ForwardPassBatch("a", [ForwardPass(1, 1, 64, 0, 17.0, 1)]))
    assert counter(h.router.metrics.fpm_records, "fitted") == 0


@scenario(router_mode="kv")
async def test_a_kv_event_gap_asks_for_a_dump(h: Harness) -> None:
    a = h.admit("a")
    h.router.intake.on_gap("a", TOPIC_KV, 5, 9)
    h.router.intake.on_gap("a", TOPIC_HEARTBEAT, 5, 9)
    h.router.intake.on_gap("stranger", TOPIC_KV, 5, 9)
    assert sock(a).kinds() == [KIND_KV_DUMP]
    assert counter(h.router.metrics.event_gaps, "kv") == 2
    assert counter(h.router.metrics.event_gaps, "hb") == 1


@scenario(router_mode="round-robin")
async def test_discovery_admits_places_parked_and_retires(h: Harness) -> None:
    h.generate("p1")  # parked: nobody serves m yet
    h.router.discovery = FakeDiscovery([  # type: ignore[assignment]
        DiscoveryEvent("added", instance("a")),
        DiscoveryEvent("added", Instance(id="nameless", role="worker", model="m")),
        DiscoveryEvent("added", instance("b")),
        DiscoveryEvent("removed", instance("b")),  # idle: retired at once
        DiscoveryEvent("removed", instance("a")),  # busy: stays until its streams end
        DiscoveryEvent("removed", instance("ghost")),
    ])
    await h.router.watch_workers()
    a = h.router.pool.workers["a"]
    assert generate_decoder.decode(sock(a).sent[0][1]).request_id == "p1"
    assert not a.routable and "b" not in h.router.pool.workers
    assert "nameless" not in h.router.pool.workers
    assert h.subscriber.connected == ["tcp://a:2", "tcp://b:2"]
    assert h.subscriber.disconnected == ["tcp://b:2"]
    assert counter(h.router.metrics.workers, "draining") == 1
    assert h.router.metrics._up == {"a"}


@scenario(router_mode="kv", kv_events=False)
async def test_a_new_incarnation_replaces_the_old_handle(h: Harness) -> None:
    old = h.admit("a", started=1.0)
    h.generate("r1")
    assert h.router.selector.approx_index is not None
    h.admit("a", started=1.0)  # the same record again: nothing new
    assert h.router.pool.workers["a"] is old
    new = h.admit("a", started=2.0)
    assert new is not old and sock(old).closed
    assert h.router.selector.approx_index.find_matches(
        h.router.accounting.requests["r1"].hashes) == {}
    old.alive = False
    h.router.pool.dead["a"] = 2.0
    assert h.router._admit(instance("a", 2.0)) is None  # declared dead: not re-admitted


@scenario(router_mode="round-robin")
async def test_dead_workers_still_listed_show_as_down(h: Harness) -> None:
    a = h.admit("a")
    b = h.admit("b")
    h.router._listed.update({w.id: w.instance for w in (a, b)})
    h.router.worker_lost(a, "crash")
    assert h.router.metrics._up == {"a", "b"}
    assert h.router.metrics.worker_up.labels("a")._value.get() == 0
    assert h.router.metrics.worker_up.labels("b")._value.get() == 1
    h.router._listed.pop("a")
    h.router._update_worker_gauges()
    assert h.router.metrics._up == {"b"}


def test_the_liveness_loop_checks_every_half_period(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, heartbeat_interval_ms=2)
        checks = 0

        def check() -> None:
            nonlocal checks
            checks += 1
            if checks == 3:
                raise SocketDone
        h.router.check_liveness = check  # type: ignore[method-assign]
        try:
            with pytest.raises(SocketDone):
                await asyncio.wait_for(h.router.watch_liveness(), 5)
        finally:
            h.close()
    asyncio.run(main())
