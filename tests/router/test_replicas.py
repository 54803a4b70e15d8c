"""Router replicas, unit level: frontends' pings and the verdict on a gone frontend, the usage
shared between replicas and what it adds to a worker's load, the drain's hand-back, and a
resumed stream placed back on the worker that served it."""

from __future__ import annotations

import asyncio

import msgspec

from common.messages import (
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_PING,
    KIND_PONG,
    KIND_RESUME_ELSEWHERE,
    TOPIC_ROUTER_USAGE,
    Placements,
    RouterUsage,
    TokenChunk,
    WorkerShare,
    encoder,
    generate_decoder,
    placements_decoder,
    resume_elsewhere_decoder,
    token_batch_decoder,
)
from services.router.accounting import Accounting, RoutedRequest
from services.router.args import RouterConfig
from services.router.frontend_liveness import FrontendLiveness
from services.router.handback import HandBack
from services.router.kv_policy import KvAwarePolicy, load_of
from services.router.policies import LeastLoaded, RoundRobin
from services.router.replica_sync import ReplicaSync
from services.router.replicas import Replicas
from tests.router.fakes import FakeClock, FakeSocket, Wiring, pool_of, request, sent, worker


def pinged(live: FrontendLiveness, clock: FakeClock, frontend: bytes, times: int,
           every: float) -> None:
    for _ in range(times):
        live.on_ping(frontend)
        clock.advance(every)


def test_a_ping_is_answered_and_a_silent_frontend_is_lost_once() -> None:
    clock, sock = FakeClock(), FakeSocket()
    live = FrontendLiveness(sock, 0.1, 3, timeout_s=3.0, clock=clock)
    pinged(live, clock, b"fe1", 50, 0.1)  # regular pings
    live.on_frame(b"fe2")  # never pinged: an old frontend, never judged
    assert sock.sent[0] == [b"fe1", KIND_PONG, b""] and len(sock.sent) == 50
    clock.advance(0.2)  # silent 0.3 s: within the floor
    assert live.lost() == []
    clock.advance(0.3)  # 0.6 s after regular pings: gone
    assert live.lost() == [b"fe1"]
    assert live.lost() == []


def test_a_frontend_with_irregular_pings_gets_slack_but_not_past_the_timeout() -> None:
    clock = FakeClock()
    live = FrontendLiveness(FakeSocket(), 0.1, 3, timeout_s=3.0, clock=clock)
    for i in range(50):  # a busy host: pings 0.1 s to 0.4 s apart
        live.on_ping(b"fe")
        clock.advance(0.4 if i % 3 == 0 else 0.1)
    clock.advance(0.5)  # 0.6 s: lost for a regular frontend, not for this one
    assert live.lost() == []
    clock.advance(2.5)
    assert live.lost() == [b"fe"]


def test_a_router_that_did_not_run_judges_nobody() -> None:
    clock = FakeClock()
    live = FrontendLiveness(FakeSocket(), 0.1, 3, timeout_s=3.0, clock=clock)
    live.on_ping(b"fe1")
    clock.advance(5)  # this router was frozen
    live.pause(5)
    assert live.lost() == []


def test_after_its_own_pause_a_router_judges_no_frontend_for_as_long_again() -> None:
    """A whole host paused 5 s and the router runs again first, its frontends some moments
    later: no frontend is lost for 3 s (the pause's length, capped at the timeout), not even
    after a ping read just after the pause (it may have been sent before it); then silence
    convicts as ever."""
    clock = FakeClock()
    live = FrontendLiveness(FakeSocket(), 0.1, 3, timeout_s=3.0, clock=clock)
    for _ in range(50):
        live.on_ping(b"queued")
        live.on_ping(b"dead")
        clock.advance(0.1)
    assert live.lost() == []
    clock.advance(5)  # this router was frozen
    live.pause(5)
    live.on_ping(b"queued")
    clock.advance(2.9)
    assert live.lost() == []
    clock.advance(0.2)
    assert sorted(live.lost()) == [b"dead", b"queued"]


def test_a_router_that_ran_a_little_late_still_convicts_a_dead_frontend_fast() -> None:
    """A busy host's lag (one check 0.25 s late) is no pause to wait out: a frontend that is
    never heard again is lost ~0.4 s later, as ever (not at the 3 s timeout)."""
    clock = FakeClock()
    live = FrontendLiveness(FakeSocket(), 0.1, 3, timeout_s=3.0, clock=clock)
    pinged(live, clock, b"fe", 50, 0.1)
    assert live.lost() == []
    clock.advance(0.25)
    live.pause(0.25)
    clock.advance(0.6)
    assert live.lost() == [b"fe"]


def test_a_gone_frontends_requests_are_cancelled_on_their_workers() -> None:
    a = worker("a")
    wiring = Wiring(RoundRobin(), a)
    wiring.streams.on_generate(b"fe1", request("r1"), b"p1")
    wiring.streams.on_generate(b"fe2", request("r2"), b"p2")
    live = FrontendLiveness(wiring.frontends, 0.1, 3, timeout_s=3.0, clock=wiring.clock)
    orphans = live.orphans(b"fe1", wiring.accounting, wiring.streams.parking)
    assert orphans == ["r1"]
    for rid in orphans:
        wiring.streams.on_cancel(rid)
    assert [f[0] for f in sent(a)] == [KIND_GENERATE, KIND_GENERATE, KIND_CANCEL]
    assert "r2" in wiring.accounting and "r1" not in wiring.accounting


def share(worker_id: str, requests: int, active: int, prefill: int) -> WorkerShare:
    return WorkerShare(worker_id, requests, active, prefill)


def test_peer_usage_adds_to_a_workers_load_until_the_peer_goes_quiet() -> None:
    a, b = worker("a"), worker("b")
    clock = FakeClock()
    sync = ReplicaSync("me", pool_of(a, b), publisher=FakePublisher(), stale_s=0.3,
                       clock=clock)
    sync.on_event(encoder.encode(RouterUsage("r2", [share("a", 2, 10, 4)])))
    sync.on_event(encoder.encode(RouterUsage("r3", [share("a", 1, 5, 0)])))
    assert (a.peer_requests, a.peer_active_blocks, a.peer_prefill_blocks) == (3, 15, 4)
    assert load_of(a) == (4.0, 15.0) and load_of(b) == (0.0, 0.0)
    # least-loaded counts the peers' requests too
    assert LeastLoaded().decide(request("x"), [a, b]).worker is b
    # A full snapshot replaces what r2 said: nothing on a any more.
    sync.on_event(encoder.encode(RouterUsage("r2", [], full=True)))
    assert a.peer_requests == 1
    clock.advance(0.2)
    sync.on_event(encoder.encode(RouterUsage("r2", [share("b", 1, 1, 1)], full=True)))
    clock.advance(0.2)
    sync.expire()  # r3 silent 0.4 s: forgotten; r2 heard 0.2 s ago: kept
    assert (a.peer_requests, b.peer_requests) == (0, 1)
    # Our own messages, coming back through a shared subscription, are not a peer's.
    sync.on_event(encoder.encode(RouterUsage("me", [share("a", 9, 9, 9)])))
    assert a.peer_requests == 0


def test_without_sync_peers_are_ignored_and_nothing_is_published() -> None:
    a = worker("a")
    sync = ReplicaSync("me", pool_of(a), publisher=None, stale_s=0.3)
    sync.on_event(encoder.encode(RouterUsage("r2", [share("a", 2, 10, 4)])))
    sync.changed(a)
    sync.publish_snapshot()
    assert a.peer_requests == 0 and not sync.enabled


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[tuple[bytes, msgspec.Struct]] = []

    def publish(self, topic: bytes, body: msgspec.Struct) -> None:
        self.published.append((topic, body))


def test_placements_are_published_once_per_loop_turn() -> None:
    async def main() -> None:
        a, b = worker("a"), worker("b")
        wiring = Wiring(RoundRobin(), a, b)
        publisher = FakePublisher()
        sync = ReplicaSync("me", wiring.pool, publisher, stale_s=0.3)  # type: ignore[arg-type]
        wiring.accounting._on_change = sync.changed
        for i in range(4):
            wiring.streams.on_generate(b"fe", request(f"r{i}"), b"p")
        await asyncio.sleep(0)
        assert len(publisher.published) == 1
        topic, body = publisher.published[0]
        assert topic == TOPIC_ROUTER_USAGE and isinstance(body, RouterUsage)
        assert sorted((s.worker_id, s.requests) for s in body.workers) == [("a", 2), ("b", 2)]
        sync.publish_snapshot()
        assert publisher.published[-1][1].full  # type: ignore[attr-defined]

    asyncio.run(main())


def test_a_drain_gives_every_stream_back_to_its_frontend_without_cancelling() -> None:
    a = worker("a")
    wiring = Wiring(RoundRobin(), a)
    wiring.streams.on_generate(b"fe1", request("r1"), b"p1")
    wiring.streams.on_generate(b"fe1", request("r2"), b"p2")
    wiring.streams.on_generate(b"fe2", request("r3"), b"p3")
    back = HandBack(wiring.frontends, wiring.accounting, wiring.streams.parking,
                    wiring.migration, wiring.metrics)
    assert back.start() == 3
    given = {f[0]: resume_elsewhere_decoder.decode(f[2]) for f in wiring.frontends.sent
             if f[1] == KIND_RESUME_ELSEWHERE}
    assert sorted(given[b"fe1"].request_ids) == ["r1", "r2"] and given[b"fe1"].draining
    assert given[b"fe2"].request_ids == ["r3"]
    # Where each runs, token or not yet: its resume goes back there to be handed over.
    assert given[b"fe1"].workers == ["a", "a"] and given[b"fe2"].workers == ["a"]
    assert len(wiring.accounting) == 0 and a.inflight == 0
    assert KIND_CANCEL not in [f[0] for f in sent(a)]  # the worker hands them over instead
    # Tokens still coming from the worker for them are not relayed.
    before = len(wiring.frontends.sent)
    wiring.streams.on_batch(a, [TokenChunk("r1", [5])])
    assert len(wiring.frontends.sent) == before


def test_pongs_name_the_worker_of_each_stream_no_token_has_named_yet() -> None:
    """So a frontend can send a stream back where it waits when its router dies or hangs
    before the first token. Each placement or move is named once, to its own frontend, once
    that frontend pings; the first chunk still names the worker (an older frontend ignores
    the pong's payload)."""
    a, b = worker("a"), worker("b")
    wiring = Wiring(RoundRobin(), a, b)
    replicas = Replicas("r", RouterConfig(), wiring.frontends, wiring.pool, wiring.streams,
                        wiring.metrics, wiring.clock)

    def pong(frontend: bytes) -> Placements | None:
        assert replicas.on_frame(frontend, KIND_PING)
        frames = wiring.frontends.sent[-1]
        assert frames[:2] == [frontend, KIND_PONG]
        return placements_decoder.decode(frames[2]) if frames[2] else None

    def unannounced() -> float | None:
        return wiring.metrics.registry.get_sample_value("turnout_router_placements_unannounced")

    assert pong(b"fe") is None  # nothing placed for it yet
    for rid in ("r1", "r2"):
        wiring.streams.on_generate(b"fe", request(rid), b"p")
    wiring.streams.on_generate(b"fe2", request("r3"), b"p")  # a frontend that never pinged
    assert unannounced() == 2  # fe's, until its next pong
    told = pong(b"fe")
    assert unannounced() == 0
    assert told is not None and told.request_ids == ["r1", "r2"]
    where = {rid: wiring.accounting.get(rid).worker.id  # type: ignore[union-attr]
             for rid in ("r1", "r2")}
    assert told.workers == [where["r1"], where["r2"]] and sorted(told.workers) == ["a", "b"]
    assert pong(b"fe") is None  # told once
    runs_r1 = a if where["r1"] == "a" else b
    wiring.streams.on_batch(runs_r1, [TokenChunk("r1", [5])])
    assert token_batch_decoder.decode(wiring.frontends.sent[-1][2]).chunks[0].worker_id \
        == where["r1"]
    # r2 moves before its first token: named again, at its new worker.
    entry = wiring.accounting.get("r2")
    assert entry is not None
    old = entry.worker
    assert old is not None
    old.alive = False
    wiring.migration.migrate(entry, "crash")
    assert unannounced() == 1
    told = pong(b"fe")
    assert told is not None and told.request_ids == ["r2"] and told.workers != [old.id]
    assert wiring.metrics.placements_announced._value.get() == 3
    assert pong(b"fe2") is None  # its first ping: what came before is named by chunks


def test_a_resume_goes_to_the_worker_that_served_it_and_names_it() -> None:
    a, b = worker("a"), worker("b")
    wiring = Wiring(RoundRobin(), a, b)
    resumed = msgspec.structs.replace(request("r1"), generated_token_ids=[7, 8, 9, 10],
                                      previous_worker="b")
    for _ in range(2):  # whatever the round-robin turn
        wiring.streams.on_generate(b"fe", resumed, encoder.encode(resumed))
        entry = wiring.accounting.get("r1")
        assert entry is not None and entry.worker is b
        wiring.streams.on_batch(b, [TokenChunk("r1", [11])])
        wiring.streams.on_batch(b, [TokenChunk("r1", [12])])
        chunks = [token_batch_decoder.decode(f[2]).chunks for f in wiring.frontends.sent[-2:]]
        # The first chunk names the worker, the next not.
        assert [c[0].worker_id for c in chunks] == ["b", ""]
        wiring.streams.on_cancel("r1")
    assert wiring.metrics.resumes._value.get() == 2


def test_a_stream_back_where_this_router_cancelled_it_drops_the_old_runs_late_tokens() -> None:
    """This router took a stalled frontend for gone and cancelled its stream on worker b; the
    frontend resumes it here and it goes back to b, whose old run had a token on its way
    before the cancel. That token reaches the client once: the new run's copy of it (the
    same offset in the response) is dropped, and the next token goes through."""
    a, b = worker("a"), worker("b")
    wiring = Wiring(RoundRobin(), a, b)
    first = request("r1", target="b")
    wiring.streams.on_generate(b"fe", first, encoder.encode(first))
    wiring.streams.on_batch(b, [TokenChunk("r1", [7], num_prompt_tokens=8, offset=0)])
    wiring.streams.on_cancel("r1")
    resumed = msgspec.structs.replace(request("r1"), generated_token_ids=[7],
                                      previous_worker="b", resumed=True)
    wiring.streams.on_generate(b"fe", resumed, encoder.encode(resumed))
    wiring.streams.on_batch(b, [TokenChunk("r1", [8], offset=1)])  # the old run's, late
    wiring.streams.on_batch(b, [TokenChunk("r1", [8], num_prompt_tokens=9, offset=1)])
    wiring.streams.on_batch(b, [TokenChunk("r1", [9], offset=2)])
    relayed = [token_batch_decoder.decode(f[2]).chunks for f in wiring.frontends.sent]
    assert [t for chunks in relayed for c in chunks for t in c.token_ids] == [7, 8, 9]
    entry = wiring.accounting.get("r1")
    assert entry is not None and entry.generated == [7, 8, 9]
    assert wiring.metrics.stale_tokens._value.get() == 1


def test_a_stream_back_where_this_router_cancelled_it_hears_only_its_new_run() -> None:
    """As above, with a worker that stamps runs: the resumed request gets a run number, and
    every chunk of the old run is dropped, its finish included (it would have ended the stream
    there, with the new run going on for nobody); an error ends it whatever its run."""
    a, b = worker("a"), worker("b")
    b.instance.metadata["chunk_runs"] = True
    wiring = Wiring(RoundRobin(), a, b)
    first = request("r1", target="b")
    wiring.streams.on_generate(b"fe", first, encoder.encode(first))
    assert generate_decoder.decode(sent(b)[-1][1]).run == 0  # a first run needs no number
    wiring.streams.on_batch(b, [TokenChunk("r1", [7], num_prompt_tokens=8, offset=0)])
    wiring.streams.on_cancel("r1")
    resumed = msgspec.structs.replace(request("r1"), generated_token_ids=[7],
                                      previous_worker="b", resumed=True)
    wiring.streams.on_generate(b"fe", resumed, encoder.encode(resumed))
    run = generate_decoder.decode(sent(b)[-1][1]).run
    assert run > 0
    late = [TokenChunk("r1", [5], offset=1), TokenChunk("r1", [6], "stop", offset=2)]
    wiring.streams.on_batch(b, late)  # the old run's, sampled otherwise, and its finish
    wiring.streams.on_batch(b, [TokenChunk("r1", [8], num_prompt_tokens=9, offset=1, run=run)])
    wiring.streams.on_batch(b, [TokenChunk("r1", [9], offset=2, run=run)])
    relayed = [token_batch_decoder.decode(f[2]).chunks for f in wiring.frontends.sent]
    assert [t for chunks in relayed for c in chunks for t in c.token_ids] == [7, 8, 9]
    entry = wiring.accounting.get("r1")
    assert entry is not None and entry.generated == [7, 8, 9]  # still running
    assert wiring.metrics.stale_chunks._value.get() == 2
    assert wiring.metrics.stale_tokens._value.get() == 2
    wiring.streams.on_batch(b, [TokenChunk("r1", [], "error", error_code=500)])
    assert wiring.accounting.get("r1") is None
    # Another resume, a second number, which every run of it carries; on a worker that does
    # not stamp runs (a release behind) its chunks are not judged by it.
    wiring.streams.on_generate(b"fe", resumed, encoder.encode(resumed))
    again = wiring.accounting.get("r1")
    assert again is not None and again.request.run > run
    again.worker.alive = False  # type: ignore[union-attr]
    wiring.migration.migrate(again, "crash")
    assert again.worker is a
    assert generate_decoder.decode(sent(a)[-1][1]).run == again.request.run
    wiring.streams.on_batch(a, [TokenChunk("r1", [8], offset=1)])
    assert again.generated == [7, 8]


def test_a_resume_goes_back_to_its_worker_even_when_another_is_cheaper() -> None:
    """Its worker most likely still runs it (and hands it over); placed on the idle one, it
    would run twice. A worker no longer serving is not insisted on."""
    a, b = worker("a"), worker("b")
    wiring = Wiring(KvAwarePolicy(FixedIndex({})), a, b)  # type: ignore[arg-type]
    for i in range(6):  # b is loaded, a idle
        busy = msgspec.structs.replace(request(f"busy{i}"), target_worker="b")
        wiring.streams.on_generate(b"fe", busy, encoder.encode(busy))
    resumed = msgspec.structs.replace(request("r1"), previous_worker="b", resumed=True)
    wiring.streams.on_generate(b"fe", resumed, encoder.encode(resumed))
    entry = wiring.accounting.get("r1")
    assert entry is not None and entry.worker is b
    gone = msgspec.structs.replace(request("r2"), previous_worker="c", resumed=True)
    wiring.streams.on_generate(b"fe", gone, encoder.encode(gone))
    entry = wiring.accounting.get("r2")
    assert entry is not None and entry.worker is a


def test_a_resume_placed_away_from_its_worker_pulls_the_kv_that_worker_holds() -> None:
    """Its worker no longer takes it (a prefill worker holding the prompt's KV for a decode
    side, or a draining one), but still holds its blocks: the new worker is told to pull them
    there, as in a migration, rather than recompute the prompt. One placed back on its worker
    (handed over there) names none."""
    a, b = worker("a"), worker("b")
    wiring = Wiring(RoundRobin(), a, b)
    b.routable = False  # draining: alive, not a candidate
    resumed = msgspec.structs.replace(request("r1", generated=2), previous_worker="b",
                                      resumed=True)
    wiring.streams.on_generate(b"fe", resumed, encoder.encode(resumed))
    kind, payload = sent(a)[-1]
    assert kind == KIND_GENERATE
    assert generate_decoder.decode(payload).kv_sources == ["tcp://b:1"]
    b.routable = True
    back = msgspec.structs.replace(request("r2", generated=2), previous_worker="b",
                                   resumed=True)
    wiring.streams.on_generate(b"fe", back, encoder.encode(back))
    assert generate_decoder.decode(sent(b)[-1][1]).kv_sources == []
    assert wiring.metrics.resumes._value.get() == 2


class FixedIndex:
    def __init__(self, overlaps: dict[str, int]) -> None:
        self.overlaps = overlaps

    def find_matches(self, hashes: list[int]) -> dict[str, int]:
        return dict(self.overlaps)


def pile_up(sync: bool) -> dict[str, int]:
    """Two routers take turns placing 12 requests whose prefix one worker caches, between two
    load reports (so only their own accounting, and with sync each other's, is fresh): how
    many requests each worker gets."""
    async def run() -> dict[str, int]:
        routers = []
        for name in ("A", "B"):
            handles = [worker(f"w{i}") for i in range(1, 5)]
            publisher = FakePublisher()
            replica = ReplicaSync(name, pool_of(*handles), publisher if sync else None, 1.0)
            policy = KvAwarePolicy(FixedIndex({"w1": 6}))  # type: ignore[arg-type]
            routers.append((handles, Accounting(on_change=replica.changed), policy, replica,
                            publisher))
        for i in range(12):
            handles, accounting, policy, _, publisher = routers[i % 2]
            req = request(f"r{i}", tokens=32)
            decision = policy.decide(req, handles)
            policy.commit(decision)
            accounting.place(RoutedRequest(req, b"fe"), decision)
            await asyncio.sleep(0)  # the sync flush
            other = routers[(i + 1) % 2][3]
            for _, body in publisher.published:
                other.on_event(encoder.encode(body))
            publisher.published.clear()
        return {h.id: h.inflight + routers[1][0][n].inflight
                for n, h in enumerate(routers[0][0])}

    return asyncio.run(run())


def test_replica_sync_keeps_two_routers_from_piling_onto_the_cached_worker() -> None:
    without, with_sync = pile_up(False), pile_up(True)
    assert sum(without.values()) == sum(with_sync.values()) == 12
    # Without sync each router's hotspot guard sees half the load: the cached worker gets
    # twice what one router would let it have; with sync, what one router would.
    assert with_sync["w1"] < without["w1"], (with_sync, without)
    assert max(with_sync.values()) - min(with_sync.values()) \
        < max(without.values()) - min(without.values())
