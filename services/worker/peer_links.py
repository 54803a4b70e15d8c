"""Worker-to-worker links on the request plane: KV replication out, KV pulls in both ways.

One DEALER per peer endpoint, opened on first use. Replication is fire-and-forget through a
bounded queue (when peers fall behind the oldest blocks are dropped and counted: decode never
waits for a copy). A pull asks sources in turn for the blocks still missing and waits a bounded
time for each answer (time this process ran: a pause does not time a pull out).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import zmq

from common.loop_socket import LoopSocket
from common.malformed import MALFORMED
from common.messages import (
    KIND_KV_BLOCKS,
    KIND_KV_PULL,
    KIND_KV_RELEASE,
    KIND_KV_REPLICATE,
    KvBlockStored,
    KvEventBatch,
    KvPullReply,
    KvPullRequest,
    KvRelease,
    encoder,
    kv_pull_reply_decoder,
)
from common.running_wait import wait_running
from common.transport import connect_socket, tune_stream_socket

log = logging.getLogger(__name__)

PEER_SNDHWM = 1000  # frames queued towards one peer before replication starts dropping


class PeerLinks:
    def __init__(self, ctx: zmq.Context, worker_id: str, queue_blocks: int = 4096) -> None:
        self.ctx = ctx
        self.worker_id = worker_id
        self.sockets: dict[str, LoopSocket] = {}
        self._pending: dict[str, asyncio.Future[KvPullReply]] = {}
        self.replica_endpoints: list[str] = []
        self._queue: deque[KvBlockStored] = deque()
        self._queue_blocks = queue_blocks
        self._queued = 0
        self._wake = asyncio.Event()
        self.replicated_blocks = 0
        self.dropped_blocks = 0

    # -- sockets -------------------------------------------------------------------------------

    def _socket(self, endpoint: str) -> LoopSocket:
        link = self.sockets.get(endpoint)
        if link is None:
            sock = self.ctx.socket(zmq.DEALER)
            tune_stream_socket(sock)
            sock.setsockopt(zmq.SNDHWM, PEER_SNDHWM)
            connect_socket(sock, endpoint)
            link = self.sockets[endpoint] = LoopSocket(sock, self._on_reply)
            link.start()
        return link

    def _on_reply(self, frames: list[bytes]) -> None:
        if len(frames) != 2 or frames[0] != KIND_KV_BLOCKS:
            return
        try:
            reply = kv_pull_reply_decoder.decode(frames[1])
        except MALFORMED:
            return
        future = self._pending.get(reply.request_id)
        if future is not None and not future.done():
            future.set_result(reply)

    def close(self) -> None:
        for link in self.sockets.values():
            link.close()

    # -- replication ---------------------------------------------------------------------------

    def set_replicas(self, endpoints: list[str]) -> None:
        self.replica_endpoints = endpoints

    def replicate(self, events: list[KvBlockStored]) -> None:
        """Queue newly stored blocks for the replica peers; drop the oldest when behind."""
        if not self.replica_endpoints:
            return
        for event in events:
            self._queue.append(event)
            self._queued += len(event.block_hashes)
        while self._queued > self._queue_blocks and len(self._queue) > 1:
            old = self._queue.popleft()
            self._queued -= len(old.block_hashes)
            self.dropped_blocks += len(old.block_hashes)
        self._wake.set()

    @property
    def lag_blocks(self) -> int:
        return self._queued

    async def run_replication(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue or not self.replica_endpoints:
                continue
            events = list(self._queue)
            batch = KvEventBatch(self.worker_id, events)  # type: ignore[arg-type]
            frame = [KIND_KV_REPLICATE, encoder.encode(batch)]
            sent = False
            for endpoint in self.replica_endpoints:
                if self._socket(endpoint).try_send(frame):
                    sent = True
            if sent:
                self._queue.clear()
                self.replicated_blocks += self._queued
                self._queued = 0
            else:  # every peer is behind: retry shortly, dropping the oldest if it grows
                await asyncio.sleep(0.01)
                self._wake.set()

    # -- pulls ---------------------------------------------------------------------------------

    def release(self, endpoints: list[str], request_id: str) -> None:
        """Tell the workers holding `request_id`'s prefill KV that it may go."""
        frame = [KIND_KV_RELEASE, encoder.encode(KvRelease(request_id))]
        for endpoint in endpoints:
            try:
                self._socket(endpoint).try_send(frame)
            except zmq.ZMQError:
                pass  # it is gone or behind: its lease frees the blocks

    async def pull(self, request_id: str, sources: list[str], hashes: list[int],
                   wait_s: float = 0.5, answered: set[str] | None = None,
                   ) -> list[KvBlockStored]:
        """The leading run of `hashes` that the sources hold, asking each in turn. With
        `answered`, the first source is asked even when nothing is missing (a decode phase
        learns that its prefill worker still holds the request), and every source that
        answered is added to it."""
        got: list[KvBlockStored] = []
        for i, endpoint in enumerate(sources):
            missing = hashes[len(got):]
            if not missing and (answered is None or i > 0):
                break
            future: asyncio.Future[KvPullReply] = asyncio.get_running_loop().create_future()
            key = f"{request_id}:{endpoint}"
            self._pending[key] = future
            try:
                self._socket(endpoint).send_multipart(
                    [KIND_KV_PULL, encoder.encode(KvPullRequest(key, missing))])
                reply = await wait_running(future, wait_s)
            except (TimeoutError, zmq.ZMQError):
                continue
            finally:
                self._pending.pop(key, None)
            if answered is not None:
                answered.add(endpoint)
            by_hash = {b.block_hashes[0]: b for b in reply.blocks}
            for h in missing:
                block = by_hash.get(h)
                if block is None:
                    break
                got.append(block)
        return got
