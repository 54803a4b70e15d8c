"""MonitoredDealer against a real ROUTER on loopback: connects, sees the peer go away and come
back, and carries messages both ways."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from common.fleet_keys import generate
from common.monitored_dealer import MonitoredDealer
from common.transport import bind_socket, destroy_context, secure_context


def router(ctx: zmq.asyncio.Context, port: int = 0) -> tuple[zmq.asyncio.Socket, str]:
    sock = ctx.socket(zmq.ROUTER)
    return sock, bind_socket(sock, "127.0.0.1", port)


def test_peer_that_goes_away_is_observed_and_its_return_too() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        peer, endpoint = router(ctx)
        replies: asyncio.Queue[list[bytes]] = asyncio.Queue()
        dealer = MonitoredDealer(ctx, endpoint, replies.put_nowait)
        try:
            changes = dealer.changes()
            assert await asyncio.wait_for(anext(changes), 10) is True
            assert dealer.connected
            dealer.socket.send_multipart([b"k", b"hello"])
            ident, *body = await asyncio.wait_for(peer.recv_multipart(), 10)
            assert body == [b"k", b"hello"]
            await peer.send_multipart([ident, b"t", b"reply"])
            assert await asyncio.wait_for(replies.get(), 10) == [b"t", b"reply"]

            peer.close(linger=0)  # the peer goes away
            assert await asyncio.wait_for(anext(changes), 10) is False
            assert not dealer.connected

            port = int(endpoint.rsplit(":", 1)[1])
            peer, _ = router(ctx, port)  # and comes back on the same address
            assert await asyncio.wait_for(anext(changes), 10) is True
            await changes.aclose()
        finally:
            dealer.close()
            peer.close(linger=0)
            ctx.destroy(linger=0)

    asyncio.run(main())


def test_wait_lost_returns_at_the_first_drop_after_a_connection() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        peer, endpoint = router(ctx)
        dealer = MonitoredDealer(ctx, endpoint, lambda frames: None)
        try:
            lost = asyncio.create_task(dealer.wait_lost())
            # Connected (a message got through), and still waiting: only a drop ends it.
            dealer.socket.send_multipart([b"ping"])
            await asyncio.wait_for(peer.recv_multipart(), 10)
            assert not lost.done()
            peer.close(linger=0)
            await asyncio.wait_for(lost, 10)
            assert not dealer.connected
        finally:
            dealer.close()
            ctx.destroy(linger=0)

    asyncio.run(main())



@pytest.mark.parametrize("secured", [False, True], ids=["plain", "curve"])
def test_what_the_peer_sent_before_it_went_away_is_handed_over_before_the_drop(
        secured: bool, tmp_path: Path) -> None:
    """A peer sends, then dies: its last messages (a router's last pong, naming where its
    streams wait) reach the handler before the drop is reported, not after the owner acted on
    the drop. Under CURVE the drop comes on a monitor socket of its own, read in whatever order
    the loop finds the two ready; here both are ready when the loop next looks."""
    if secured:
        generate(tmp_path / "keys")

    async def main() -> None:
        ctx, peer_ctx = zmq.Context(), zmq.Context()
        if secured:
            secure_context(ctx, str(tmp_path / "keys"))
            secure_context(peer_ctx, str(tmp_path / "keys"))
        peer = peer_ctx.socket(zmq.ROUTER, socket_class=zmq.Socket)
        peer.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops what is past its high-water mark
        endpoint = bind_socket(peer, "127.0.0.1", 0)
        got: list[bytes] = []
        dealer = MonitoredDealer(ctx, endpoint, lambda frames: got.append(frames[-1]))
        try:
            changes = dealer.changes()
            assert await asyncio.wait_for(anext(changes), 10) is True
            dealer.socket.send_multipart([b"hello"])

            def hello() -> bytes:
                assert peer.poll(10_000), "the dealer's message never came"
                return peer.recv_multipart()[0]

            ident = await asyncio.to_thread(hello)
            for i in range(5000):
                peer.send_multipart([ident, b"%d" % i])
            peer.close(linger=1000)  # what it sent still goes out; then the connection drops
            # The loop blocked while both the messages and the drop arrive (had the drop come
            # later, this would pass whatever the order).
            time.sleep(0.5)  # noqa: ASYNC251
            assert await asyncio.wait_for(anext(changes), 10) is False
            assert got == [b"%d" % i for i in range(5000)]
        finally:
            dealer.close()
            destroy_context(ctx)
            destroy_context(peer_ctx)

    for _ in range(3):
        asyncio.run(main())
