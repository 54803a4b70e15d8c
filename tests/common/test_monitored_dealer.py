"""MonitoredDealer against a real ROUTER on loopback: connects, sees the peer go away and come
back, and carries messages both ways."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from common.monitored_dealer import MonitoredDealer
from common.transport import bind_socket


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

