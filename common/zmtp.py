"""ZeroMQ's wire protocol (ZMTP 3.0, NULL mechanism) spoken on the asyncio loop: the request
plane's transport when the planes are plain (no fleet keys).

libzmq moves every message through its own I/O thread: a send wakes that thread, which writes
the TCP socket, and on the other side the peer's I/O thread reads it and wakes the application
thread. On the token path (one message per engine step per hop) those hand-offs were a third of
a relay's CPU and most of the latency it added (a ping-pong between two processes: 130 us per
round trip through libzmq, 20 us on the loop). Here a send is one write on the loop's transport
and a receive one `data_received`. The bytes on the wire are ZeroMQ's, so libzmq DEALER and
ROUTER sockets (tools, tests, `turnout status`) still talk to these ends unchanged.

Owns: the greeting and the NULL handshake (READY with Socket-Type; a peer of another mechanism
or an incompatible socket type is refused), framing (short and long frames, MORE; commands after
the handshake are ignored), `ZmtpServer` (ROUTER semantics: each connection gets a routing id,
the first frame of what it delivers and of what it is given to send; a send to an unknown id is
dropped, as a ROUTER drops it) and `ZmtpClient` (DEALER semantics: reconnects every
`RECONNECT_S`, queues sends while not connected, reports each connection change). Does not own
CURVE (libzmq's, chosen in `common.transport`) or what the messages mean.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
from collections import deque
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

MessageHandler = Callable[[list[bytes]], None]

RECONNECT_S = 0.1  # libzmq's default reconnect interval
MAX_FRAME_BYTES = 1 << 31  # a size beyond this is garbage, not a frame: the connection is dropped

_GREETING = (b"\xff" + bytes(8) + b"\x7f"  # signature
             + b"\x03\x00"  # version 3.0
             + b"NULL".ljust(20, b"\x00")  # mechanism
             + b"\x00"  # as-server: unused by NULL
             + bytes(31))  # filler
assert len(_GREETING) == 64
_MORE, _LONG, _COMMAND = 1, 2, 4
_refusals_logged: set[tuple[str, str]] = set()
_COMPATIBLE = {b"ROUTER": frozenset({b"DEALER", b"REQ", b"ROUTER"}),
               b"DEALER": frozenset({b"ROUTER", b"REP", b"DEALER"})}


def _command(name: bytes, properties: dict[bytes, bytes]) -> bytes:
    body = bytes((len(name),)) + name + b"".join(
        bytes((len(k),)) + k + len(v).to_bytes(4, "big") + v for k, v in properties.items())
    if len(body) < 256:
        return bytes((_COMMAND, len(body))) + body
    return bytes((_COMMAND | _LONG,)) + len(body).to_bytes(8, "big") + body


def _properties(body: bytes, start: int) -> dict[bytes, bytes]:
    """ZMTP metadata (name: 1-byte length, value: 4-byte length), from `start` of a command."""
    out: dict[bytes, bytes] = {}
    pos = start
    while pos < len(body):
        n = body[pos]
        name = body[pos + 1:pos + 1 + n]
        size = int.from_bytes(body[pos + 1 + n:pos + 5 + n], "big")
        value = body[pos + 5 + n:pos + 5 + n + size]
        if len(name) != n or len(value) != size:
            raise ValueError("truncated metadata")
        out[name.lower()] = value
        pos += 5 + n + size
    return out


def encode(frames: Sequence[bytes]) -> bytes:
    """One multipart message as ZMTP frames."""
    parts: list[bytes] = []
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        n = len(frame)
        more = _MORE if i < last else 0
        if n < 256:
            parts.append(bytes((more, n)))
        else:
            parts.append(bytes((more | _LONG,)) + n.to_bytes(8, "big"))
        parts.append(frame)
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    """One ZMTP connection: the handshake, then frames into messages for `on_message`."""

    def __init__(self, socket_type: bytes, on_ready: Callable[[_Connection], None],
                 on_message: Callable[[_Connection, list[bytes]], None],
                 on_lost: Callable[[_Connection], None]) -> None:
        self.socket_type = socket_type
        self._on_ready = on_ready
        self._on_message = on_message
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.open = False  # handshake done: messages flow
        self.closed = False
        self.peer_identity = b""
        self._greeted = False
        self._buf = bytearray()
        self._need = 0  # bytes the buffer must hold before parsing again
        self._frames: list[bytes] = []
        self.write = self._write_early

    # -- writing -------------------------------------------------------------------------------

    def _write_early(self, frames: Sequence[bytes]) -> None:
        raise ConnectionError("not connected")

    def _write_open(self, frames: Sequence[bytes]) -> None:
        assert self.transport is not None
        self.transport.write(encode(frames))

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's is not a subclass)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # As libzmq does for its TCP connections; heartbeats catch dead peers faster.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5)):
                if hasattr(socket, opt):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
        transport.write(_GREETING + _command(b"READY", {b"Socket-Type": self.socket_type}))

    def _mark_closed(self) -> bool:
        """Whether this call closed it (False: it already was)."""
        if self.closed:
            return False
        self.closed = True
        self.open = False
        self.write = self._write_early
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._mark_closed():
            self._on_lost(self)

    def abort(self) -> None:
        """Close now; `on_lost` is not called for a connection closed this way."""
        if self._mark_closed() and self.transport is not None:
            self.transport.close()

    def _refuse(self, why: str) -> None:
        peer = None if self.transport is None else self.transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        if (host, why) not in _refusals_logged:  # a client retries every RECONNECT_S
            _refusals_logged.add((host, why))
            log.warning("request-plane connection refused",
                        extra={"fields": {"peer": str(peer), "why": why}})
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return
            data = bytes(self._buf)
            self._buf = bytearray()
        pos = 0
        if not self.open:
            pos = self._handshake(data)
            if pos < 0:
                return
        self._parse(data, pos)

    def _handshake(self, data: bytes) -> int:
        """Consume the greeting and the peer's READY from `data`: where messages start, or -1
        (more bytes needed, kept; or the peer was refused)."""
        pos = 0
        if not self._greeted:
            if len(data) < 64:
                self._keep(data, 0, 64)
                return -1
            if data[0] != 0xFF or data[9] != 0x7F:
                self._refuse("not ZMTP")
                return -1
            if data[10] < 3:
                self._refuse(f"ZMTP {data[10]}.x (3.0 needed)")
                return -1
            mechanism = data[12:32].rstrip(b"\x00")
            if mechanism != b"NULL":
                self._refuse(f"mechanism {mechanism.decode('ascii', 'replace')} (plain planes "
                             "speak NULL: are the fleet keys set on one side only?)")
                return -1
            self._greeted = True
            pos = 64
        size, start = self._header(data, pos)
        if size < 0:
            self._keep(data, pos, start)
            return -1
        end = start + size
        if end > len(data):
            self._keep(data, pos, end)
            return -1
        if not data[pos] & _COMMAND:
            self._refuse("a message before the handshake")
            return -1
        body = data[start:end]
        if body[:6] != b"\x05READY":
            if body[:6] == b"\x05ERROR":
                self._refuse("the peer sent ERROR")
            else:
                self._refuse("no READY")
            return -1
        try:
            props = _properties(body, 6)
        except ValueError:
            self._refuse("malformed READY")
            return -1
        peer_type = props.get(b"socket-type", b"")
        if peer_type not in _COMPATIBLE[self.socket_type]:
            self._refuse(f"socket type {peer_type.decode('ascii', 'replace')} cannot talk to "
                         f"{self.socket_type.decode()}")
            return -1
        self.peer_identity = props.get(b"identity", b"")
        self.open = True
        self.write = self._write_open
        self._on_ready(self)
        return end if not self.closed else -1

    @staticmethod
    def _header(data: bytes, pos: int) -> tuple[int, int]:
        """(frame size, where its body starts), or (-1, bytes needed from pos on)."""
        if len(data) - pos < 2:
            return -1, pos + 2
        if data[pos] & _LONG:
            if len(data) - pos < 9:
                return -1, pos + 9
            return int.from_bytes(data[pos + 1:pos + 9], "big"), pos + 9
        return data[pos + 1], pos + 2

    def _keep(self, data: bytes, pos: int, need_end: int) -> None:
        self._buf = bytearray(data[pos:])
        self._need = need_end - pos

    def _parse(self, data: bytes, pos: int) -> None:
        n = len(data)
        frames = self._frames
        deliver = self._on_message
        while pos < n:
            if n - pos < 2:
                self._keep(data, pos, pos + 2)
                return
            flags = data[pos]
            if flags & _LONG:
                if n - pos < 9:
                    self._keep(data, pos, pos + 9)
                    return
                size = int.from_bytes(data[pos + 1:pos + 9], "big")
                start = pos + 9
                if size > MAX_FRAME_BYTES:
                    self._refuse(f"a frame of {size} bytes")
                    return
            else:
                size = data[pos + 1]
                start = pos + 2
            end = start + size
            if end > n:
                self._keep(data, pos, end)
                return
            pos = end
            if flags & _COMMAND:
                continue  # PING and the like: not used on these connections
            frames.append(data[start:end])
            if not flags & _MORE:
                self._frames = []
                deliver(self, frames)
                if self.closed:
                    return
                frames = self._frames


class ZmtpServer:
    """The listening end (ROUTER semantics) of the request plane. Bind with `bind()`; messages
    from each peer go to `on_message` as `[routing id, *frames]` from `start()` (or `run()`) on,
    those that arrive earlier are held until then; `send_multipart([routing id, *frames])`."""

    def __init__(self, on_message: MessageHandler) -> None:
        self._on_message = on_message
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()  # handshaking ones too
        self._peers: dict[bytes, _Connection] = {}
        self._ids = itertools.count(random.randrange(1 << 31))
        self._held: list[list[bytes]] | None = []  # None once delivering
        self._reading = True  # False once run() was cancelled: messages are dropped
        self._done: asyncio.Future[None] | None = None
        self.closed = False

    async def bind(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); the port."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        try:
            self._server = await loop.create_server(self._accept, host, port,
                                                    reuse_address=True)
        except OSError as exc:  # uvloop's message lowercases the reason; say it plainly
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"cannot listen on tcp://{host}:{port}: {reason}") from None
        return int(self._server.sockets[0].getsockname()[1])

    def _accept(self) -> _Connection:
        conn = _Connection(b"ROUTER", self._on_ready, self._deliver, self._on_lost)
        self._connections.add(conn)
        return conn

    def _on_ready(self, conn: _Connection) -> None:
        if self.closed:
            conn.abort()
            return
        ident = conn.peer_identity
        # A peer's own routing id (ZeroMQ: ROUTING_ID set on its socket) if free, as a ROUTER
        # does; otherwise a fresh one in libzmq's form (a zero byte, then 4 bytes).
        if not ident or ident[0] == 0 or ident in self._peers:
            ident = b"\x00" + (next(self._ids) & 0xFFFFFFFF).to_bytes(4, "big")
            while ident in self._peers:
                ident = b"\x00" + (next(self._ids) & 0xFFFFFFFF).to_bytes(4, "big")
        conn.peer_identity = ident
        self._peers[ident] = conn

    def _on_lost(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if self._peers.get(conn.peer_identity) is conn:
            del self._peers[conn.peer_identity]

    def _deliver(self, conn: _Connection, frames: list[bytes]) -> None:
        frames.insert(0, conn.peer_identity)
        if self._held is not None:
            if self._reading:
                self._held.append(frames)
            return
        try:
            self._on_message(frames)
        except Exception as exc:
            self._fail(exc)

    def send_multipart(self, frames: Sequence[bytes]) -> None:
        conn = self._peers.get(frames[0])
        if conn is not None:
            conn.write(frames[1:])

    def start(self) -> None:
        """Deliver held messages, then every later one, to `on_message`."""
        held, self._held = self._held, None
        for frames in held or ():
            if self.closed or not self._reading:
                return
            try:
                self._on_message(frames)
            except Exception as exc:
                self._fail(exc)
                return

    async def run(self) -> None:
        """Start, then wait until `close()`; raise what `on_message` raised. Cancelling this
        stops the reading (sends still go out until `close()`)."""
        if self._done is None:
            raise RuntimeError("bind() first")
        if self._held is not None:
            self.start()
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self._stop_reading()
            raise

    def _stop_reading(self) -> None:
        self._reading = False
        self._held = []  # dropped, never delivered
        for conn in self._connections:
            if conn.transport is not None and not conn.closed:
                conn.transport.pause_reading()

    def _fail(self, exc: BaseException) -> None:
        self._stop_reading()
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    def close(self) -> None:
        """Stop listening and close every connection now."""
        if self.closed:
            return
        self.closed = True
        self._stop_reading()
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        self._connections.clear()
        self._peers.clear()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


class ZmtpClient:
    """The connecting end (DEALER semantics) of the request plane: connects to `endpoint`
    (tcp://host:port) at once and again whenever the connection drops; sends made while it is
    not connected wait, in order, for the next connection. Each message from the peer goes to
    `on_message`; `on_change(True/False)` when the connection comes up and when it drops.
    Construct it on the running loop."""

    def __init__(self, endpoint: str, on_message: MessageHandler,
                 on_change: Callable[[bool], None]) -> None:
        if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
            raise ValueError(f"not a tcp://host:port endpoint: {endpoint!r}")
        host, _, port = endpoint[6:].rpartition(":")
        self.endpoint = endpoint
        self._host = host.strip("[]")
        self._port = int(port)
        self._on_message = on_message
        self._on_change = on_change
        self._conn: _Connection | None = None  # the connection messages flow on
        self._current: _Connection | None = None  # the latest one, handshaking or up
        self._waiting: deque[Sequence[bytes]] = deque()
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._lost: asyncio.Future[None] | None = None
        self._task = self._loop.create_task(self._connect_forever())

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def send_multipart(self, frames: Sequence[bytes]) -> None:
        conn = self._conn
        if conn is not None:
            conn.write(frames)
        elif not self.closed:
            self._waiting.append(frames)

    async def _connect_forever(self) -> None:
        loop = self._loop
        while not self.closed:
            self._lost = loop.create_future()
            try:
                await loop.create_connection(self._new_connection, self._host, self._port)
            except OSError:
                self._lost = None
                await asyncio.sleep(RECONNECT_S)
                continue
            await self._lost
            await asyncio.sleep(RECONNECT_S)

    def _new_connection(self) -> _Connection:
        conn = self._current = _Connection(b"DEALER", self._on_ready, self._deliver,
                                           self._on_lost)
        return conn

    def _on_ready(self, conn: _Connection) -> None:
        if self.closed:
            conn.abort()
            return
        self._conn = conn
        waiting = self._waiting
        while waiting and not conn.closed:
            conn.write(waiting.popleft())
        self._on_change(True)

    def _on_lost(self, conn: _Connection) -> None:
        was_up = self._conn is conn
        if was_up:
            self._conn = None
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if was_up and not self.closed:
            self._on_change(False)

    def _deliver(self, conn: _Connection, frames: list[bytes]) -> None:
        try:
            self._on_message(frames)
        except Exception as exc:
            if not self._done.done():
                self._done.set_exception(exc)
            self.close()

    async def run(self) -> None:
        """Wait until `close()`; raise what `on_message` raised (the client closed then)."""
        await asyncio.shield(self._done)

    def close(self) -> None:
        """Close the connection and stop reconnecting; waiting sends are dropped."""
        if self.closed:
            return
        self.closed = True
        self._task.cancel()
        self._waiting.clear()
        if self._current is not None:
            self._current.abort()
        self._conn = self._current = None
        if not self._done.done():
            self._done.set_result(None)
