"""A request-plane DEALER to one peer whose connection is watched (ZeroMQ socket monitor).

A dropped TCP connection is the fastest sign that a peer died (immediate on SIGKILL, long before
a discovery lease or missed heartbeats say so). Owns the socket, its monitor, and turning monitor
events into connection changes. Does not own what is sent or what a drop means for the caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common.transport import tune_stream_socket


class MonitoredDealer:
    """`socket` is connected to `endpoint` at once (ZeroMQ queues sends while it connects and
    reconnects by itself); `changes()` says when the connection comes up and when it drops."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self.socket = ctx.socket(zmq.DEALER)
        tune_stream_socket(self.socket)
        # The monitor before connect, so the first CONNECTED is not missed.
        self._monitor = self.socket.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(endpoint)
        self.connected = False  # a TCP connection to the peer is up right now

    async def changes(self) -> AsyncIterator[bool]:
        """True when the connection comes up, False when an established one drops; only
        changes, in order, forever (ZeroMQ keeps reconnecting). One reader at a time."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            kind = event["event"]
            if kind == zmq.EVENT_CONNECTED and not self.connected:
                self.connected = True
                yield True
            elif kind == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                yield False

    async def wait_lost(self) -> None:
        """Return at the first drop of a connection that was up (waiting for it to come up
        first): for a caller that treats a drop as the peer's death."""
        async for up in self.changes():
            if not up:
                return

    def close(self) -> None:
        """Close the socket and its monitor now (pending messages are dropped). Cancel tasks
        reading `changes()` or the socket first."""
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self.socket.close(linger=0)
