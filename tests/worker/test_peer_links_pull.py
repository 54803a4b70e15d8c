"""KV pulls between workers over real sockets on loopback: a pull waits a bounded time for its
source's answer, counted in time this process ran, so a pause of the whole process (SIGSTOP,
a paused VM) does not turn blocks on their way into a recompute."""

from __future__ import annotations

import asyncio
import time

import msgspec
import zmq
import zmq.asyncio

from common.messages import (
    KIND_KV_BLOCKS,
    KIND_KV_PULL,
    KvBlockStored,
    KvPullReply,
    KvPullRequest,
    encoder,
)
from common.transport import bind_socket
from services.worker.peer_links import PeerLinks

BLOCK = KvBlockStored([11], None, list(range(4)), 4)


async def answer_one_pull(source: zmq.asyncio.Socket, pause_s: float) -> None:
    """Read one pull; the whole process stops for `pause_s` (this loop is blocked, asker and
    source alike); the source answers a moment after both run again."""
    ident, kind, body = await source.recv_multipart()
    assert kind == KIND_KV_PULL
    request = msgspec.msgpack.decode(body, type=KvPullRequest)
    time.sleep(pause_s)  # noqa: ASYNC251 - the pause under test
    await asyncio.sleep(0.05)
    blocks = [BLOCK] if BLOCK.block_hashes[0] in request.block_hashes else []
    await source.send_multipart([ident, KIND_KV_BLOCKS,
                                 encoder.encode(KvPullReply(request.request_id, blocks))])


def pull(pause_s: float | None, wait_s: float) -> tuple[list[KvBlockStored], float]:
    """One pull of BLOCK from a source that answers after a pause of `pause_s` (None: never
    answers); the blocks it got and how long it took."""
    async def main() -> tuple[list[KvBlockStored], float]:
        actx = zmq.asyncio.Context()
        ctx: zmq.Context = zmq.Context()
        source = actx.socket(zmq.ROUTER)
        endpoint = bind_socket(source, "127.0.0.1", 0)
        links = PeerLinks(ctx, "w-asking")
        answering = asyncio.create_task(
            answer_one_pull(source, pause_s) if pause_s is not None else asyncio.sleep(60))
        try:
            t0 = time.monotonic()
            got = await links.pull("r1", [endpoint], BLOCK.block_hashes, wait_s=wait_s)
            return got, time.monotonic() - t0
        finally:
            answering.cancel()
            links.close()
            source.close(0)
            ctx.destroy(0)
            actx.destroy(0)

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_a_pull_outlasts_a_pause_longer_than_its_wait() -> None:
    got, took = pull(pause_s=0.8, wait_s=0.3)
    assert got == [BLOCK]
    assert took >= 0.8


def test_a_pull_whose_source_never_answers_gives_up_after_its_wait() -> None:
    got, took = pull(pause_s=None, wait_s=0.3)
    assert got == []
    assert 0.3 <= took < 10
