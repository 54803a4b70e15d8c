"""A ZeroMQ socket driven directly by the asyncio event loop: the request plane's transport.

pyzmq's asyncio shim costs a Future, a callback and a poller re-arm per message, which on the
token path (one frame per engine step per hop) was most of a process's CPU. Here the socket's
FD is watched with `loop.add_reader`; every wake drains all ready messages with NOBLOCK and
hands each to a plain callback. Sends go out synchronously; only a send ZeroMQ refuses (Again:
a peer's queue is full, rare with the request plane's unbounded queues) waits in a queue that
is flushed, in order, when the socket turns writable.

ZeroMQ's FD is edge-triggered and shared by both directions: it signals only when the socket's
state changes, and any call that processes the socket's commands (a send included) can consume
the notification that a message arrived. So after a send made outside a drain the socket's
EVENTS are read and a drain is scheduled if a message waits; a drain that spends its per-wake
budget reschedules itself; otherwise a drain stops only when EVENTS (or a NOBLOCK recv) found
nothing — both process the pending commands first, so whatever arrives later signals the FD.

Owns reading (from `start()`) and writing the socket, and closing it in `close()` (an owner
whose `run()` was cancelled has stopped the reading and may close the socket itself). Does not
own what the messages mean.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio

MessageHandler = Callable[[list[bytes]], None]

# Plain ints: pyzmq's enum flags cost an enum construction per `|`, about as much as the call.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)

# Messages handled per wake before yielding to the loop: a flooded socket must not starve the
# others (HTTP, timers, the other hops) in the same process.
MAX_PER_WAKE = 256


class LoopSocket:
    """`socket` (a plain `zmq.Socket`, never a zmq.asyncio one) read on the running loop from
    `start()` (or `run()`) on: each multipart message goes to `on_message` as a list of bytes
    frames, in arrival order. Without `on_message` the socket is only written to (the reader
    then only flushes queued sends). Sends work from construction.

    A handler that raises stops the reading; `run()` raises its exception."""

    def __init__(self, socket: zmq.Socket, on_message: MessageHandler | None = None,
                 max_per_wake: int = MAX_PER_WAKE) -> None:
        if isinstance(socket, zmq.asyncio.Socket):  # its own poller would fight ours for the FD
            raise TypeError("LoopSocket needs a plain zmq.Socket, not a zmq.asyncio one")
        if max_per_wake < 1:
            raise ValueError(f"max_per_wake must be at least 1, got {max_per_wake}")
        self.socket = socket
        self._on_message = on_message
        self._max_per_wake = max_per_wake
        self._fd: int = socket.FD
        self._out: deque[Sequence[bytes]] = deque()
        self._draining = False
        self._scheduled: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._done: asyncio.Future[None] | None = None  # resolved by close(), failed by _fail()
        self._watching = False  # the loop watches the FD (from start until close/cancel/failure)

    # -- sending -------------------------------------------------------------------------------

    def send_multipart(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message now, or queue it behind earlier ones when ZeroMQ would
        block. Raises `zmq.ZMQError` for anything but Again (a ROUTER_MANDATORY peer that is
        gone, a closed socket)."""
        if self._out:
            self._out.append(frames)
            return
        try:
            _send_now(self.socket, frames)
        except zmq.Again:
            self._out.append(frames)
            # The refused send processed commands; a POLLOUT among them is not signalled again.
            self._schedule()
            return
        if self._on_message is not None and not self._draining:
            self._after_send()

    def try_send(self, frames: Sequence[bytes]) -> bool:
        """Send one multipart message now if ZeroMQ takes it; False (nothing queued) when it
        would block: for a caller with its own policy for a slow peer (drop, retry later)."""
        if self._out:
            return False
        try:
            _send_now(self.socket, frames)
        except zmq.Again:
            return False
        if self._on_message is not None and not self._draining:
            self._after_send()
        return True

    def _after_send(self) -> None:
        # The send may have processed the socket's commands, consuming the FD's notice of a
        # message that arrived: look, and drain this turn if one waits. (Inside a drain the
        # drain looks itself before it stops.)
        if (self._watching and self._scheduled is None
                and self.socket.getsockopt(_EVENTS) & _POLLIN):
            self._schedule()

    @property
    def closed(self) -> bool:
        return bool(self.socket.closed)

    @property
    def queued(self) -> int:
        """Messages waiting for the socket to turn writable."""
        return len(self._out)

    def _flush(self) -> None:
        out = self._out
        socket = self.socket
        while out:
            try:
                _send_now(socket, out[0])
            except zmq.Again:
                return
            out.popleft()

    # -- reading -------------------------------------------------------------------------------

    def _schedule(self) -> None:
        if self._scheduled is None and self._watching:
            assert self._loop is not None
            self._scheduled = self._loop.call_soon(self._on_ready)

    def _on_ready(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if not self._watching:
            return
        if self._out:
            self._flush()
        handler = self._on_message
        socket = self.socket
        if handler is None:
            if self._out and socket.getsockopt(_EVENTS) & _POLLOUT:
                self._schedule()
            return
        recv = socket.recv
        getsockopt = socket.getsockopt
        self._draining = True
        try:
            for _ in range(self._max_per_wake):
                try:
                    frames = [recv(_NOBLOCK)]
                except zmq.Again:  # a wake for something else (POLLOUT, a command)
                    break
                while getsockopt(_RCVMORE):
                    frames.append(recv(_NOBLOCK))
                handler(frames)
                if not self._watching:  # the handler closed us
                    return
                # Cheaper than a recv that raises Again; like it, it processes the socket's
                # commands, so whatever arrives after it is signalled on the FD again.
                if not getsockopt(_EVENTS) & _POLLIN:
                    break
            else:
                self._schedule()  # budget spent with messages left: continue next turn
        except Exception as exc:
            self._fail(exc)
            return
        finally:
            self._draining = False
        if self._out:
            # Reads processed commands too: a POLLOUT among them is not signalled again.
            self._flush()
            if self._out and getsockopt(_EVENTS) & _POLLOUT:
                self._schedule()

    def read_pending(self) -> None:
        """Hand every message already waiting to the handler now, past the per-wake budget: for
        an owner about to act on news of the peer (its connection dropped) that must first see
        what the peer sent before it."""
        while self._watching and self._on_message is not None \
                and self.socket.getsockopt(_EVENTS) & _POLLIN:
            self._on_ready()

    def _fail(self, exc: BaseException) -> None:
        self._detach()
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start reading on the running loop (once; a no-op afterwards)."""
        if self._loop is not None:
            return
        self._loop = loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if self.socket.closed:
            self._done.set_result(None)
            return
        self._watching = True
        loop.add_reader(self._fd, self._on_ready)
        # Messages may have arrived (and consumed the FD's edge) before we watched it.
        self._schedule()

    async def run(self) -> None:
        """Start reading if not yet, then wait until `close()`; raise what a handler raised
        (reading stopped then). Cancelling this stops the reading (sends still go out until
        `close()`), so a service can stop taking messages before it tears the socket down."""
        self.start()
        assert self._done is not None
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self._detach()
            raise

    def _detach(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._watching:
            self._watching = False
            assert self._loop is not None
            # Before the socket closes: the FD number may be reused at once.
            self._loop.remove_reader(self._fd)

    def close(self) -> None:
        """Stop reading and close the socket now (queued and unread messages are dropped)."""
        self._detach()
        if not self.socket.closed:
            self.socket.close(linger=0)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


def _send_now(socket: zmq.Socket, frames: Sequence[bytes]) -> None:
    """send_multipart with NOBLOCK, minus its per-frame flag arithmetic. Only the first frame
    can be refused (Again): ZeroMQ counts its high-water mark in whole messages."""
    last = len(frames) - 1
    send = socket.send
    for i in range(last):
        send(frames[i], _SNDMORE_NOBLOCK)
    send(frames[last], _NOBLOCK)
