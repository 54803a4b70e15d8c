"""The event plane: brokerless ZeroMQ PUB/SUB with per-publisher, per-topic sequence numbers.

Every publisher binds its own PUB socket and advertises it through discovery; subscribers connect
to each publisher they discover. A message is two frames, `[topic, EventEnvelope]`; the envelope
carries `publisher_id` and a sequence that counts per (publisher, topic), so a subscriber of any
subset of topics notices a lost message and can ask for a resync instead of drifting silently.
A frame that does not decode is counted and dropped (logged once per subscriber: a SUB socket
cannot tell which publisher sent it). The SUB socket is read on the loop (`LoopSocket`): every
ready event per wake, no Future per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

import msgspec
import zmq

from common.loop_socket import LoopSocket
from common.malformed import MALFORMED, MalformedFrames
from common.messages import EventEnvelope, encoder, envelope_decoder
from common.transport import bind_socket, connect_socket

log = logging.getLogger(__name__)

GapHandler = Callable[[str, bytes, int, int], None]  # publisher, topic, expected, received


class EventPublisher:
    """Binds one PUB socket; `publish` never blocks (ZeroMQ drops past the high-water mark, which
    subscribers then see as a gap)."""

    def __init__(self, ctx: zmq.Context, publisher_id: str, host: str = "127.0.0.1",
                 port: int = 0, advertise_host: str | None = None) -> None:
        self.publisher_id = publisher_id
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.endpoint = bind_socket(self.socket, host, port, advertise_host)
        self._sequences: dict[bytes, int] = {}

    def publish(self, topic: bytes, body: msgspec.Struct) -> None:
        seq = self._sequences.get(topic, 0) + 1
        self._sequences[topic] = seq
        envelope = EventEnvelope(self.publisher_id, seq, time.time(),
                                 msgspec.Raw(encoder.encode(body)))
        try:
            self.socket.send_multipart([topic, encoder.encode(envelope)], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.socket.close(linger=0)


class EventSubscriber:
    """One SUB socket connected to many publishers; yields decoded envelopes per topic."""

    def __init__(self, ctx: zmq.Context, topics: Iterable[bytes],
                 on_gap: GapHandler | None = None,
                 on_malformed: Callable[[], None] | None = None) -> None:
        self.socket = ctx.socket(zmq.SUB, socket_class=zmq.Socket)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.on_gap = on_gap
        self.endpoints: set[str] = set()
        self._last_seq: dict[tuple[str, bytes], int] = {}
        self._malformed = MalformedFrames("event frame", on_malformed, log)
        self.gaps = 0
        # Read on the first recv() (the subscriber may be built before the loop runs).
        self._reader: LoopSocket | None = None
        self._ready: deque[list[bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None

    @property
    def malformed(self) -> int:
        """Frames dropped so far because they did not decode."""
        return self._malformed.total

    def connect(self, endpoint: str) -> None:
        if endpoint not in self.endpoints:
            self.endpoints.add(endpoint)
            connect_socket(self.socket, endpoint)

    def disconnect(self, endpoint: str) -> None:
        if endpoint in self.endpoints:
            self.endpoints.discard(endpoint)
            try:
                self.socket.disconnect(endpoint)
            except zmq.ZMQError:
                pass

    def forget(self, publisher_id: str) -> None:
        """Drop sequence state of a publisher that left (a restart then starts clean)."""
        for key in [k for k in self._last_seq if k[0] == publisher_id]:
            del self._last_seq[key]

    def _on_frames(self, frames: list[bytes]) -> None:
        self._ready.append(frames)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def recv(self) -> tuple[bytes, EventEnvelope]:
        """Next well-formed event; malformed frames are counted and skipped. One reader at a
        time; it returns without yielding while events are ready."""
        ready = self._ready
        while True:
            while not ready:
                if self._reader is None:
                    self._reader = LoopSocket(self.socket, self._on_frames)
                    self._reader.start()
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
            frames = ready.popleft()
            if len(frames) != 2:
                self._malformed.drop(f"{len(frames)} frames")
                continue
            try:
                env = envelope_decoder.decode(frames[1])
            except MALFORMED as exc:
                self._malformed.drop(str(exc))
                continue
            topic = frames[0]
            key = (env.publisher_id, topic)
            last = self._last_seq.get(key)
            self._last_seq[key] = env.sequence
            if last is not None and env.sequence != last + 1:
                self.gaps += 1
                if self.on_gap is not None:
                    self.on_gap(env.publisher_id, topic, last + 1, env.sequence)
            return topic, env

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self.socket.close(linger=0)
