"""A request-plane DEALER to one peer whose connection is watched.

A dropped TCP connection is the fastest sign that a peer died (immediate on SIGKILL, long before
a discovery lease or missed heartbeats say so). On plain planes the DEALER is `ZmtpClient`
(ZeroMQ's protocol on the loop, which sees its own connection come and go); on a context with
fleet keys it is a libzmq CURVE socket whose connection is watched by a ZeroMQ socket monitor
(both read on the loop through `LoopSocket`). Owns the choice, the socket (and monitor), and
turning what they see into connection changes. Does not own what is sent or what a drop means
for the caller.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import zmq
from zmq.utils.monitor import parse_monitor_message

from common.loop_socket import LoopSocket, MessageHandler
from common.transport import connect_socket, fleet_keys, tune_stream_socket
from common.zmtp import ZmtpClient


class MonitoredDealer:
    """A DEALER connected to `endpoint` at once (ZeroMQ queues sends while it connects and
    reconnects by itself): send with `socket.send_multipart`; each message from the peer goes to
    `on_message`; `changes()` says when the connection comes up and when it drops. Construct it
    on the running loop."""

    def __init__(self, ctx: zmq.Context, endpoint: str, on_message: MessageHandler) -> None:
        self.endpoint = endpoint
        self.connected = False  # a connection to the peer is up right now
        self._changes: deque[bool] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.socket: LoopSocket | ZmtpClient
        self._monitor: LoopSocket | None = None
        if fleet_keys(ctx) is None:
            self.socket = ZmtpClient(endpoint, on_message, self._on_change)
            return
        socket = ctx.socket(zmq.DEALER, socket_class=zmq.Socket)
        tune_stream_socket(socket)
        # The monitor before connect, so the first CONNECTED is not missed. Set up by hand
        # rather than get_monitor_socket(), which makes the PAIR of the context's own class
        # (a zmq.asyncio one under an asyncio context).
        address = f"inproc://monitor.dealer-{id(self):x}-{socket.FD}"
        socket.monitor(address, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        monitor = ctx.socket(zmq.PAIR, socket_class=zmq.Socket)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(address)
        connect_socket(socket, endpoint)
        self.socket = LoopSocket(socket, on_message)
        self._monitor = LoopSocket(monitor, self._on_monitor_event)
        self.socket.start()
        self._monitor.start()

    def _on_monitor_event(self, frames: list[bytes]) -> None:
        kind = parse_monitor_message(frames)["event"]
        if kind == zmq.EVENT_CONNECTED and not self.connected:
            self._on_change(True)
        elif kind == zmq.EVENT_DISCONNECTED and self.connected:
            # The drop comes on the monitor, maybe ahead of the peer's last messages (a backlog
            # past one wake's budget): those first, as on a plain connection.
            assert isinstance(self.socket, LoopSocket)
            self.socket.read_pending()
            self._on_change(False)

    def _on_change(self, up: bool) -> None:
        self.connected = up
        self._changes.append(up)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def changes(self) -> AsyncIterator[bool]:
        """True when the connection comes up, False when an established one drops; only
        changes, in order, forever (ZeroMQ keeps reconnecting). One reader at a time."""
        while True:
            while self._changes:
                yield self._changes.popleft()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def wait_lost(self) -> None:
        """Return at the first drop of a connection that was up (waiting for it to come up
        first): for a caller that treats a drop as the peer's death."""
        async for up in self.changes():
            if not up:
                return

    async def run(self) -> None:
        """Wait until `close()`; raise what `on_message` raised (reading stopped then)."""
        await self.socket.run()

    def close(self) -> None:
        """Close the socket and its monitor now (pending messages are dropped). Cancel tasks
        reading `changes()` first."""
        if self._monitor is not None:
            assert isinstance(self.socket, LoopSocket)
            try:
                self.socket.socket.monitor(None, 0)
            except zmq.ZMQError:
                pass
            self._monitor.close()
        self.socket.close()
