"""Event plane over real ZeroMQ sockets on loopback: sequences, gaps, malformed frames."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from common.event_plane import EventPublisher, EventSubscriber
from common.messages import TOPIC_HEARTBEAT, TOPIC_LOAD, Heartbeat, LoadReport, heartbeat_decoder


async def _connected(pub: EventPublisher, sub: EventSubscriber, topic: bytes) -> None:
    """PUB/SUB drops messages until the subscription has propagated: publish until one lands."""
    for _ in range(200):
        pub.publish(topic, Heartbeat("warmup", 0, 0))
        try:
            await asyncio.wait_for(sub.recv(), 0.02)
            return
        except TimeoutError:
            continue
    raise TimeoutError("subscriber never connected")


def test_sequences_and_gap_detection() -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        gaps: list[tuple[str, bytes, int, int]] = []
        pub = EventPublisher(ctx, "w1")
        sub = EventSubscriber(ctx, [TOPIC_HEARTBEAT, TOPIC_LOAD],
                              on_gap=lambda *g: gaps.append(g))
        sub.connect(pub.endpoint)
        await _connected(pub, sub, TOPIC_HEARTBEAT)
        while True:  # drain warm-up messages
            try:
                await asyncio.wait_for(sub.recv(), 0.05)
            except TimeoutError:
                break
        gaps.clear()
        pub.publish(TOPIC_HEARTBEAT, Heartbeat("w1", 1, 0))
        pub.publish(TOPIC_LOAD, LoadReport("w1", 0, 0, 0, 10, 0, 0))  # own topic, own sequence
        topic, env = await asyncio.wait_for(sub.recv(), 2)
        assert topic == TOPIC_HEARTBEAT and heartbeat_decoder.decode(env.payload).steps == 1
        topic, env = await asyncio.wait_for(sub.recv(), 2)
        assert topic == TOPIC_LOAD and env.sequence == 1
        assert gaps == []
        # Lose one heartbeat on the way: bump the publisher's counter without sending.
        pub._sequences[TOPIC_HEARTBEAT] += 1
        expected = pub._sequences[TOPIC_HEARTBEAT] + 1
        pub.publish(TOPIC_HEARTBEAT, Heartbeat("w1", 3, 0))
        await asyncio.wait_for(sub.recv(), 2)
        assert gaps == [("w1", TOPIC_HEARTBEAT, expected - 1, expected)]
        assert sub.gaps == 1
        pub.close()
        sub.close()
        ctx.term()

    asyncio.run(run())


def test_malformed_frames_are_counted_and_dropped() -> None:
    async def run() -> None:
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.PUB)
        port = raw.bind_to_random_port("tcp://127.0.0.1")
        sub = EventSubscriber(ctx, [TOPIC_HEARTBEAT])
        sub.connect(f"tcp://127.0.0.1:{port}")
        pub = EventPublisher(ctx, "good")
        sub.connect(pub.endpoint)
        await _connected(pub, sub, TOPIC_HEARTBEAT)
        # Until the raw publisher's subscription propagates, its frames vanish: warm it up.
        for _ in range(200):
            await raw.send_multipart([TOPIC_HEARTBEAT, b"\xc1"])
            pub.publish(TOPIC_HEARTBEAT, Heartbeat("good", 1, 0))
            await asyncio.wait_for(sub.recv(), 2)
            if sub.malformed:
                break
        # Warm-up frames still on their way must not count below: pump good messages until
        # the count has stood still for a while.
        stable = 0
        last = sub.malformed
        while stable < 20:
            pub.publish(TOPIC_HEARTBEAT, Heartbeat("good", 1, 0))
            await asyncio.wait_for(sub.recv(), 2)
            stable = stable + 1 if sub.malformed == last else 0
            last = sub.malformed
        before = sub.malformed
        for frames in ([TOPIC_HEARTBEAT, b"\xc1garbage"], [TOPIC_HEARTBEAT],
                       [TOPIC_HEARTBEAT, b"a", b"b"]):
            await raw.send_multipart(frames)
        # The good publisher keeps recv() returning while the bad frames are read and dropped
        # (fair queuing interleaves the two connections in any order).
        for _ in range(100):
            if sub.malformed - before >= 3:
                break
            pub.publish(TOPIC_HEARTBEAT, Heartbeat("good", 7, 0))
            _, env = await asyncio.wait_for(sub.recv(), 2)
            assert heartbeat_decoder.decode(env.payload).steps in (1, 7)
        assert sub.malformed - before == 3
        raw.close(0)
        pub.close()
        sub.close()
        ctx.term()

    asyncio.run(run())
