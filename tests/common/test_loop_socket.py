"""LoopSocket on real sockets (loopback TCP, and IPC where a peer must appear later): many
messages per wake in order, the lost-wakeup case (a send consumes the FD's edge while a message
waits), closing while readable, multipart frames, a failing handler, queued sends."""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
import zmq
import zmq.asyncio

from common.loop_socket import LoopSocket
from common.transport import bind_socket, tune_stream_socket
from turnout.testing.deployment import eventually

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    """Both loops: the services run on uvloop, whose add_reader is its own implementation."""
    return uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop


def run(loop_factory: LoopFactory,
        body: Callable[[zmq.Context], Awaitable[None]]) -> None:
    async def main() -> None:
        ctx = zmq.Context()
        try:
            await asyncio.wait_for(body(ctx), 20)
        finally:
            ctx.destroy(linger=0)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def pair(ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    """A ROUTER on loopback TCP and a DEALER connected to it."""
    router = ctx.socket(zmq.ROUTER)
    endpoint = bind_socket(router, "127.0.0.1", 0)
    tune_stream_socket(router)
    dealer = ctx.socket(zmq.DEALER)
    tune_stream_socket(dealer)
    dealer.connect(endpoint)
    return router, dealer



class LoopTurns:
    """Counts event-loop iterations, so a test can see how many messages one wake handled."""

    def __init__(self) -> None:
        self.turn = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.turn += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


def test_a_burst_is_delivered_in_order_many_per_wake_within_the_budget(
        loop_factory: LoopFactory) -> None:
    async def body(ctx: zmq.Context) -> None:
        router, dealer = pair(ctx)
        turns = LoopTurns()
        got: list[tuple[int, int]] = []  # (message number, loop turn it was handled in)
        sock = LoopSocket(router, lambda f: got.append((int(f[1]), turns.turn)), max_per_wake=64)
        sock.start()
        n = 5000
        for i in range(n):  # one synchronous burst: the loop cannot run meanwhile
            dealer.send(str(i).encode(), zmq.NOBLOCK)
        await eventually(lambda: len(got) == n, "the whole burst")
        turns.stop()
        assert [i for i, _ in got] == list(range(n))
        per_turn: dict[int, int] = {}
        for _, turn in got:
            per_turn[turn] = per_turn.get(turn, 0) + 1
        # A flooded socket yields to the loop. (A turn may hold two wakes: the FD's and the
        # one a drain that spent its budget scheduled for itself.)
        assert max(per_turn.values()) <= 2 * 64
        assert len(per_turn) < n / 8, "messages that were ready together came one per wake"
        sock.close()
        dealer.close(linger=0)

    run(loop_factory, body)


def test_multipart_frames_arrive_whole_and_replies_reach_the_sender(
        loop_factory: LoopFactory) -> None:
    async def body(ctx: zmq.Context) -> None:
        router, dealer = pair(ctx)
        got: list[list[bytes]] = []
        server: LoopSocket | None = None

        def echo(frames: list[bytes]) -> None:
            got.append(frames)
            assert server is not None
            server.send_multipart([frames[0], b"re", *frames[1:]])

        server = LoopSocket(router, echo)
        server.start()
        replies: list[list[bytes]] = []
        client = LoopSocket(dealer, replies.append)
        client.start()
        client.send_multipart([b"k", b"", b"payload"])
        client.send_multipart([b"single"])
        await eventually(lambda: len(replies) == 2, "both replies")
        assert [f[1:] for f in got] == [[b"k", b"", b"payload"], [b"single"]]
        assert replies == [[b"re", b"k", b"", b"payload"], [b"re", b"single"]]
        client.close()
        server.close()

    run(loop_factory, body)


def test_a_send_that_consumes_the_edge_does_not_lose_a_waiting_message(
        loop_factory: LoopFactory) -> None:
    """The classic lost wakeup: a message arrives, its notification is consumed by a send (which
    processes the socket's commands), so the FD never turns readable for it again."""

    async def body(ctx: zmq.Context) -> None:
        router, dealer = pair(ctx)
        got: list[list[bytes]] = []
        sock = LoopSocket(dealer, got.append)
        sock.start()
        sock.send_multipart([b"hello"])
        ident, _ = await asyncio.to_thread(router.recv_multipart)
        await asyncio.sleep(0)  # the drain scheduled by that send has run
        consumed = False
        for _ in range(10):
            router.send_multipart([ident, b"pending"])
            # Wait, without touching the socket, until the arrival is signalled on its FD.
            assert select.select([sock.socket.FD], [], [], 10)[0], "the message never arrived"
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:  # sends until one has consumed the edge
                sock.send_multipart([b"filler"])
                if not select.select([sock.socket.FD], [], [], 0)[0]:
                    consumed = True
                    break
            if consumed:
                break
            await eventually(lambda: bool(got), "the message (edge not consumed: try again)")
            got.clear()
        assert consumed, "no send ever consumed the edge: the case was not exercised"
        # The loop now runs with the FD quiet and a message waiting: it must still arrive.
        await eventually(lambda: got == [[b"pending"]], "the message behind the consumed edge")
        sock.close()
        router.close(linger=0)

    run(loop_factory, body)


def test_closing_from_the_handler_while_more_is_readable_stops_delivery(
        loop_factory: LoopFactory) -> None:
    async def body(ctx: zmq.Context) -> None:
        router, dealer = pair(ctx)
        got: list[list[bytes]] = []
        sock: LoopSocket | None = None

        def first_only(frames: list[bytes]) -> None:
            got.append(frames)
            assert sock is not None
            sock.close()

        for i in range(50):
            dealer.send(b"%d" % i)
        sock = LoopSocket(router, first_only)
        await asyncio.wait_for(sock.run(), 10)  # returns once closed
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(got) == 1 and got[0][1] == b"0"
        assert sock.closed and router.closed
        with pytest.raises(zmq.ZMQError):
            sock.send_multipart([b"x", b"y"])
        dealer.close(linger=0)

    run(loop_factory, body)


def test_closing_from_outside_with_a_drain_pending_delivers_nothing_more(
        loop_factory: LoopFactory) -> None:
    async def body(ctx: zmq.Context) -> None:
        router, dealer = pair(ctx)
        got: list[list[bytes]] = []
        sock = LoopSocket(router, got.append)
        sock.start()
        dealer.send(b"first")
        await eventually(lambda: len(got) == 1, "the first message")
        for i in range(20):
            dealer.send(b"%d" % i)
        assert select.select([router.FD], [], [], 10)[0]
        sock.close()  # readable, and not yet read
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(got) == 1
        await asyncio.wait_for(sock.run(), 1)
        dealer.close(linger=0)

    run(loop_factory, body)


def test_a_handler_that_raises_stops_reading_and_run_raises_it(
        loop_factory: LoopFactory) -> None:
    async def body(ctx: zmq.Context) -> None:
        router, dealer = pair(ctx)
        got: list[bytes] = []

        def handler(frames: list[bytes]) -> None:
            got.append(frames[1])
            if frames[1] == b"bad":
                raise ValueError("bad message")

        sock = LoopSocket(router, handler)
        for body_ in (b"ok", b"bad", b"after"):
            dealer.send(body_)
        with pytest.raises(ValueError, match="bad message"):
            await asyncio.wait_for(sock.run(), 10)
        assert got == [b"ok", b"bad"]
        sock.close()
        dealer.close(linger=0)

    run(loop_factory, body)


def test_sends_that_would_block_queue_in_order_and_flush_when_a_peer_appears(
        loop_factory: LoopFactory, tmp_path: Path) -> None:
    async def body(ctx: zmq.Context) -> None:
        endpoint = f"ipc://{tmp_path}/peer"
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # no peer yet: every send would block
        dealer.connect(endpoint)
        sock = LoopSocket(dealer)
        sock.start()
        for i in range(3):
            sock.send_multipart([b"%d" % i])
        assert sock.queued == 3
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(endpoint)
        await eventually(lambda: sock.queued == 0, "the queue to flush")
        sock.send_multipart([b"3"])
        received = [(await asyncio.to_thread(router.recv_multipart))[1] for _ in range(4)]
        assert received == [b"0", b"1", b"2", b"3"]
        sock.close()
        router.close(linger=0)

    run(loop_factory, body)


def test_messages_sent_before_start_are_read_at_start_and_sends_work_before_it(
        loop_factory: LoopFactory) -> None:
    async def body(ctx: zmq.Context) -> None:
        router, dealer = pair(ctx)
        got: list[list[bytes]] = []
        sock = LoopSocket(dealer, got.append)
        sock.send_multipart([b"early"])  # not reading yet: the send still goes out
        ident, early = await asyncio.to_thread(router.recv_multipart)
        assert early == b"early"
        router.send_multipart([ident, b"waiting"])
        # Arrived, and its notice on the FD consumed (polling processes the commands).
        assert dealer.poll(10_000, zmq.POLLIN)
        for _ in range(5):
            await asyncio.sleep(0)
        assert got == []  # nobody reads before start
        sock.start()
        await eventually(lambda: got == [[b"waiting"]], "the message that waited for start")
        sock.close()
        router.close(linger=0)

    run(loop_factory, body)


def test_bad_arguments_are_refused(
        loop_factory: LoopFactory) -> None:
    async def body(ctx: zmq.Context) -> None:
        actx = zmq.asyncio.Context()
        asock = actx.socket(zmq.DEALER)
        with pytest.raises(TypeError, match=r"plain zmq\.Socket"):
            LoopSocket(asock)
        asock.close(linger=0)
        actx.destroy(linger=0)
        plain = ctx.socket(zmq.DEALER)
        with pytest.raises(ValueError, match="max_per_wake"):
            LoopSocket(plain, max_per_wake=0)
        plain.close(linger=0)

    run(loop_factory, body)
