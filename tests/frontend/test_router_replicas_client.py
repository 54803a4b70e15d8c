"""RouterClient with two real ROUTER sockets on loopback playing routers: requests spread over
both, and a router that hangs (stops answering pings), drops or drains has its streams resumed
on the other, from the tokens the client already has, with nothing repeated."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq
import zmq.asyncio

from common.discovery import StaticDiscovery
from common.messages import (
    FINISH_LENGTH,
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_PING,
    KIND_PONG,
    KIND_RESUME_ELSEWHERE,
    KIND_TOKENS,
    GenerateRequest,
    ResumeElsewhere,
    SamplingParams,
    TokenBatch,
    TokenChunk,
    encoder,
    generate_decoder,
)
from common.transport import bind_socket
from services.frontend.upstream import ChunkStream, RouterClient
from turnout.testing.deployment import eventually


class FakeRouter:
    """A ROUTER socket that answers pings (while `answering`) and records everything else."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.socket = ctx.socket(zmq.ROUTER)
        self.endpoint = bind_socket(self.socket, "127.0.0.1", 0)
        self.answering = True
        self.generated: asyncio.Queue[tuple[bytes, GenerateRequest]] = asyncio.Queue()
        self.cancelled: list[bytes] = []
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            ident, kind, payload = await self.socket.recv_multipart()
            if kind == KIND_PING:
                if self.answering:
                    await self.socket.send_multipart([ident, KIND_PONG, b""])
            elif kind == KIND_GENERATE:
                self.generated.put_nowait((ident, generate_decoder.decode(payload)))
            elif kind == KIND_CANCEL:
                self.cancelled.append(payload)

    async def next_request(self) -> tuple[bytes, GenerateRequest]:
        return await asyncio.wait_for(self.generated.get(), 10)

    async def send(self, ident: bytes, *chunks: TokenChunk) -> None:
        await self.socket.send_multipart([ident, KIND_TOKENS,
                                          encoder.encode(TokenBatch(list(chunks)))])

    def close(self) -> None:
        self.task.cancel()
        self.socket.close(linger=0)


def run(tmp_path: Path,
        body: Callable[[RouterClient, FakeRouter, FakeRouter], Awaitable[None]],
        resume_wait_s: float = 5.0) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        r1, r2 = FakeRouter(ctx), FakeRouter(ctx)
        records = tmp_path / "instances.json"
        records.write_text(json.dumps([
            {"id": "r1", "role": "router", "endpoints": {"request": r1.endpoint}},
            {"id": "r2", "role": "router", "endpoints": {"request": r2.endpoint}},
            {"id": "w1", "role": "worker", "model": "m"}]))
        discovery = StaticDiscovery(records)
        client = RouterClient(discovery, heartbeat_s=0.05, missed_heartbeats=3,
                              resume_wait_s=resume_wait_s)
        await client.start()
        try:
            await eventually(lambda: len(client.routers) == 2 and all(
                link.pongs is not None for link in client.routers.values()), "routers' pongs")
            await body(client, r1, r2)
        finally:
            await client.close()
            await discovery.close()
            r1.close()
            r2.close()
            ctx.destroy(linger=0)

    asyncio.run(asyncio.wait_for(main(), 30))


def request(request_id: str) -> GenerateRequest:
    return GenerateRequest(request_id, "m", [1, 2, 3], SamplingParams(max_tokens=8))


async def chunks_of(stream: ChunkStream) -> list[TokenChunk]:
    out: list[TokenChunk] = []
    while batch := await asyncio.wait_for(stream.next_batch(), 10):
        assert not any(c.error_code for c in batch), batch
        out += batch
    return out


def test_requests_spread_over_routers_by_streams_in_flight(tmp_path: Path) -> None:
    async def body(client: RouterClient, r1: FakeRouter, r2: FakeRouter) -> None:
        for i in range(4):
            client.open(request(f"s{i}"))
        await r1.next_request()
        await r2.next_request()
        await r1.next_request()
        await r2.next_request()
        assert {link.inflight for link in client.routers.values()} == {2}

    run(tmp_path, body)


async def resume_after(fault: Callable[[FakeRouter, bytes], Awaitable[None]],
                       client: RouterClient, r1: FakeRouter, r2: FakeRouter,
                       late: bool = True) -> None:
    """One stream: 2 tokens through whichever router got it, then `fault`; the other router
    must get a resume with those tokens and the worker, and its tokens reach the client once."""
    stream = client.open(request("x"))
    first = client.streams["x"].router
    old, new = (r1, r2) if first == "r1" else (r2, r1)
    ident, _ = await old.next_request()
    await old.send(ident, TokenChunk("x", [10], num_prompt_tokens=3, worker_id="w1"),
                   TokenChunk("x", [11]))
    seen: list[TokenChunk] = []
    while sum(len(c.token_ids) for c in seen) < 2:
        seen += await asyncio.wait_for(stream.next_batch(), 10)
    await fault(old, ident)
    ident2, resumed = await new.next_request()
    assert resumed.generated_token_ids == [10, 11]
    assert resumed.previous_worker == "w1"
    assert resumed.token_ids == [1, 2, 3]
    if late:  # a late chunk from the old router: dropped
        await old.send(ident, TokenChunk("x", [12]))
    await new.send(ident2, TokenChunk("x", [12], num_prompt_tokens=5, worker_id="w1"),
                   TokenChunk("x", [13], FINISH_LENGTH))
    rest = await chunks_of(stream)
    assert [t for c in seen + rest for t in c.token_ids] == [10, 11, 12, 13]
    # Prompt and cached counts come from the first chunk only: usage is counted once.
    assert [c.num_prompt_tokens for c in seen + rest] == [3, 0, 0, 0]
    assert client.metrics.resumed._value.get() == 1


def test_a_hung_router_has_its_streams_resumed_on_another(tmp_path: Path) -> None:
    async def hang(old: FakeRouter, ident: bytes) -> None:
        old.answering = False

    async def body(client: RouterClient, r1: FakeRouter, r2: FakeRouter) -> None:
        await resume_after(hang, client, r1, r2)
        detection = client.metrics.detection.collect()[0].samples
        count = next(s.value for s in detection if s.name.endswith("_count"))
        assert count == 1

    run(tmp_path, body)


def test_a_draining_router_hands_its_streams_back(tmp_path: Path) -> None:
    async def drain(old: FakeRouter, ident: bytes) -> None:
        await old.socket.send_multipart([ident, KIND_RESUME_ELSEWHERE,
                                         encoder.encode(ResumeElsewhere(["x"]))])

    async def body(client: RouterClient, r1: FakeRouter, r2: FakeRouter) -> None:
        await resume_after(drain, client, r1, r2)
        # Nothing new goes to a draining router.
        assert sum(1 for link in client.routers.values() if link.draining) == 1

    run(tmp_path, body)


def test_a_drain_names_the_worker_of_a_stream_that_has_no_token_yet(tmp_path: Path) -> None:
    """The router knows where a stream waits before its first token names it: the resume
    carries that worker, so it goes back there and is handed over, not run a second time."""
    async def body(client: RouterClient, r1: FakeRouter, r2: FakeRouter) -> None:
        stream = client.open(request("x"))
        old, new = (r1, r2) if client.streams["x"].router == "r1" else (r2, r1)
        ident, _ = await old.next_request()
        await old.socket.send_multipart([ident, KIND_RESUME_ELSEWHERE, encoder.encode(
            ResumeElsewhere(["x"], True, ["w7"]))])
        ident2, resumed = await new.next_request()
        assert (resumed.previous_worker, resumed.generated_token_ids) == ("w7", [])
        await new.send(ident2, TokenChunk("x", [12], num_prompt_tokens=3, worker_id="w7"),
                       TokenChunk("x", [13], FINISH_LENGTH))
        assert [t for c in await chunks_of(stream) for t in c.token_ids] == [12, 13]

    run(tmp_path, body)


def test_a_router_seen_leaving_discovery_before_it_hands_back_is_lost_once_as_draining(
        tmp_path: Path) -> None:
    # A draining router leaves discovery, then gives its streams back; the frontend may see
    # either first. Seen leaving first, its loss was never counted.
    async def body(client: RouterClient, r1: FakeRouter, r2: FakeRouter) -> None:
        async def leave_then_drain(old: FakeRouter, ident: bytes) -> None:
            router_id = client.streams["x"].router
            await client.discovery.unregister(router_id)
            await eventually(lambda: client.routers[router_id].draining, "the removal")
            await old.socket.send_multipart([ident, KIND_RESUME_ELSEWHERE,
                                             encoder.encode(ResumeElsewhere(["x"]))])

        await resume_after(leave_then_drain, client, r1, r2)
        lost = {s.labels["why"]: s.value for s in client.metrics.routers_lost.collect()[0].samples
                if s.name.endswith("_total")}
        assert lost == {"draining": 1.0}
        # Out of discovery with nothing of ours left on it: forgotten, not retried forever
        # once it exits.
        gone = "r1" if "r2" in {e.router for e in client.streams.values()} else "r2"
        await eventually(lambda: gone not in client.routers, "the drained router forgotten")

    run(tmp_path, body)


def test_a_dropped_router_has_its_streams_resumed_at_once(tmp_path: Path) -> None:
    async def drop(old: FakeRouter, ident: bytes) -> None:
        old.close()

    async def body(client: RouterClient, r1: FakeRouter, r2: FakeRouter) -> None:
        await resume_after(drop, client, r1, r2, late=False)

    run(tmp_path, body)


def test_when_every_router_looks_hung_streams_stay_and_new_requests_still_go(
        tmp_path: Path) -> None:
    """A host so busy that no router answers in time: nothing is moved to a router that is
    itself suspected, nothing is cancelled, and the stream finishes once its router answers."""
    async def body(client: RouterClient, r1: FakeRouter, r2: FakeRouter) -> None:
        stream = client.open(request("x"))
        first = client.routers[client.streams["x"].router]
        old, other = (r1, r2) if first.router_id == "r1" else (r2, r1)
        ident, _ = await old.next_request()
        for silenced in (other, old):  # the other one first: then nothing is healthy
            silenced.answering = False
            link = client.routers["r1" if silenced is r1 else "r2"]
            await eventually(lambda: link.hung, "a silent router declared hung")  # noqa: B023
        assert other.generated.empty() and old.cancelled == []
        assert client.streams["x"].router == first.router_id
        client.open(request("y"))  # the last resort: a router declared hung
        _, sent = await (r1 if client.streams["y"].router == "r1" else r2).next_request()
        assert sent.request_id == "y"
        old.answering = other.answering = True
        await old.send(ident, TokenChunk("x", [1], num_prompt_tokens=3),
                       TokenChunk("x", [2], FINISH_LENGTH))
        chunks = await chunks_of(stream)
        assert [t for c in chunks for t in c.token_ids] == [1, 2]
        assert client.metrics.resumed._value.get() == 0

    run(tmp_path, body)


def test_a_router_back_from_a_dropped_connection_gets_no_burst_of_stale_pings(
        tmp_path: Path) -> None:
    """Pings to a router whose connection is down are not queued for its return (they say
    nothing, and would pile up for as long as it stays away)."""
    async def body(client: RouterClient, r1: FakeRouter, r2: FakeRouter) -> None:
        endpoint = r1.endpoint
        r1.close()
        loop = asyncio.get_running_loop()
        await eventually(lambda: not client.routers["r1"].dealer.connected, "the drop")
        await asyncio.sleep(1.0)  # down for 20 heartbeat periods
        back = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        back.bind(endpoint)
        try:
            assert (await asyncio.wait_for(back.recv_multipart(), 10))[1] == KIND_PING
            pings = 1
            end = loop.time() + 0.15  # three periods more
            while (left := end - loop.time()) > 0:
                try:
                    frames = await asyncio.wait_for(back.recv_multipart(), left)
                except TimeoutError:
                    break
                pings += frames[1] == KIND_PING
            assert pings <= 6, f"{pings} pings within 0.15 s of the reconnect"
        finally:
            back.close(linger=0)

    run(tmp_path, body)


def test_a_stream_with_no_router_to_resume_through_ends_after_the_wait(tmp_path: Path) -> None:
    """Every router's connection drops: the stream waits `resume_wait_s` for one to come
    back, then ends with a 503 (not at once, not never)."""
    async def body(client: RouterClient, r1: FakeRouter, r2: FakeRouter) -> None:
        stream = client.open(request("x"))
        loop = asyncio.get_running_loop()
        await (r1 if client.streams["x"].router == "r1" else r2).next_request()
        r1.close()
        r2.close()
        lost = loop.time()
        batch = await asyncio.wait_for(stream.next_batch(), 10)
        assert loop.time() - lost >= 0.5
        assert [(c.error_code, c.finish_reason) for c in batch] == [(503, "error")]
        assert client.metrics.resume_failed._value.get() == 1
        assert client.metrics.resumed._value.get() == 0

    run(tmp_path, body, resume_wait_s=0.5)
