"""The frontend's side of the request plane: sends requests to a router and hands back streams.

Owns the DEALER sockets to the discovered routers, the map from request id to its stream, and the
set of models that live workers serve (from discovery). Does not own HTTP or tokenization.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import msgspec
import zmq

from common.discovery import Discovery
from common.malformed import MalformedFrames
from common.messages import (
    FINISH_ERROR,
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_TOKENS,
    ROLE_ROUTER,
    ROLE_WORKER,
    Cancel,
    GenerateRequest,
    Instance,
    TokenChunk,
    encoder,
    token_batch_decoder,
)
from common.monitored_dealer import MonitoredDealer

log = logging.getLogger(__name__)


class NoWorkersError(Exception):
    """No router, or no worker serving the requested model, is reachable."""


class Upstream(Protocol):
    def served_models(self) -> list[str]:
        """Models some live worker serves right now."""
        ...

    def max_model_len(self, model: str) -> int | None:
        """The context length the model's workers accept (None: unknown)."""
        ...

    def open(self, request: GenerateRequest) -> ChunkStream:
        """Send `request`; raise `NoWorkersError` when nothing can serve its model."""
        ...

    def cancel(self, request_id: str) -> None:
        """Abort a request all the way to the engine (client went away, stop string hit)."""
        ...


class ChunkStream:
    """Chunks of one request as they arrive; merges what piled up while the reader was busy,
    or hands them out a fixed number of tokens at a time."""

    __slots__ = ("_final", "_pending", "_tokens", "_waiter", "finished", "request_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._pending: list[TokenChunk] = []
        self._tokens = 0  # tokens in _pending
        self._final = False  # _pending holds the chunk with the finish reason
        # A bare future, not an asyncio.Event: this wakes once per token on the hot path.
        self._waiter: asyncio.Future[None] | None = None
        self.finished = False

    def push(self, chunk: TokenChunk) -> None:
        self._pending.append(chunk)
        self._tokens += len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self._final = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def next_batch(self, tokens: int = 0) -> list[TokenChunk]:
        """Every chunk that arrived since the last call (at least one); [] once finished.

        With `tokens` > 0, exactly that many tokens instead (fewer only at the end of the
        stream), waiting for them, a chunk split where the count falls."""
        while not self._pending or (tokens and self._tokens < tokens and not self._final):
            if self.finished:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if tokens and self._tokens > tokens:
            batch = self._take(tokens)
        else:
            batch, self._pending, self._tokens = self._pending, [], 0
        if batch[-1].finish_reason is not None:
            self.finished = True
        return batch

    def _take(self, tokens: int) -> list[TokenChunk]:
        """The leading chunks that hold `tokens` tokens, splitting the one where they end (its
        prompt figures go with the head, its finish with the rest)."""
        pending = self._pending
        batch: list[TokenChunk] = []
        count = 0
        i = 0
        while count < tokens:
            chunk = pending[i]
            n = len(chunk.token_ids)
            if count + n <= tokens:
                batch.append(chunk)
                count += n
                i += 1
                continue
            k = tokens - count
            batch.append(TokenChunk(chunk.request_id, chunk.token_ids[:k], None,
                                    chunk.num_prompt_tokens, chunk.cached_tokens))
            pending[i] = TokenChunk(chunk.request_id, chunk.token_ids[k:], chunk.finish_reason,
                                    error_code=chunk.error_code,
                                    error_message=chunk.error_message)
            count = tokens
        del pending[:i]
        self._tokens -= tokens
        return batch


class RouterClient:
    """The real `Upstream`: routers and workers from discovery, requests over ZeroMQ DEALERs."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery
        self.ctx = zmq.Context()
        self.routers: dict[str, _RouterLink] = {}
        self.workers: dict[str, Instance] = {}
        self.streams: dict[str, tuple[ChunkStream, str]] = {}
        self._turn = 0
        self._tasks: list[asyncio.Task[None]] = []
        # Derived from discovery on every change, not per request.
        self._models: list[str] = []
        self._context: dict[str, int] = {}
        self.malformed = MalformedFrames("frame from router", logger=log)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch(ROLE_ROUTER)),
                       asyncio.create_task(self._watch(ROLE_WORKER))]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for link in list(self.routers.values()):
            link.close()
        self.ctx.destroy(linger=0)

    # -- Upstream ------------------------------------------------------------------------------

    def served_models(self) -> list[str]:
        return self._models if any(link.up for link in self.routers.values()) else []

    def max_model_len(self, model: str) -> int | None:
        """The smallest context any worker of `model` accepts (None: no worker says)."""
        return self._context.get(model)

    def _refresh_models(self) -> None:
        self._models = sorted({w.model for w in self.workers.values() if w.model})
        context: dict[str, int] = {}
        for w in self.workers.values():
            n = w.metadata.get("max_model_len")
            if isinstance(n, int) and n > 0:
                context[w.model] = min(n, context.get(w.model, n))
        self._context = context

    def open(self, request: GenerateRequest) -> ChunkStream:
        if not self.routers:
            raise NoWorkersError("no router is available")
        if request.model not in self._models:
            raise NoWorkersError(f"no worker serves model {request.model!r}")
        links = [link for link in self.routers.values() if link.up]
        if not links:
            raise NoWorkersError("no router is reachable")
        self._turn += 1
        link = links[self._turn % len(links)]
        stream = ChunkStream(request.request_id)
        self.streams[request.request_id] = (stream, link.router_id)
        link.dealer.socket.send_multipart([KIND_GENERATE, encoder.encode(request)])
        return stream

    def cancel(self, request_id: str) -> None:
        entry = self.streams.pop(request_id, None)
        if entry is None:
            return
        link = self.routers.get(entry[1])
        if link is not None:
            link.dealer.socket.send_multipart([KIND_CANCEL, encoder.encode(Cancel(request_id))])

    # -- plumbing ------------------------------------------------------------------------------

    async def _watch(self, role: str) -> None:
        async for event in self.discovery.watch(role=role):
            inst = event.instance
            if role == ROLE_WORKER:
                if event.kind == "removed":
                    self.workers.pop(inst.id, None)
                else:
                    self.workers[inst.id] = inst
                self._refresh_models()
            elif event.kind == "removed":
                link = self.routers.pop(inst.id, None)
                if link is not None:
                    self._router_lost(link)
                self.malformed.forget(inst.id)
            elif inst.id not in self.routers and "request" in inst.endpoints:
                self.routers[inst.id] = _RouterLink(self, inst)

    def _router_lost(self, link: _RouterLink) -> None:
        link.close()
        self.fail_streams(link.router_id)

    def fail_streams(self, router: str) -> None:
        for rid, (stream, router_id) in list(self.streams.items()):
            if router_id == router:
                del self.streams[rid]
                stream.push(TokenChunk(rid, [], FINISH_ERROR, error_code=503,
                                       error_message="the router serving this request went away"))

    def deliver(self, payload: bytes, router_id: str = "") -> None:
        try:
            batch = token_batch_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.malformed.drop(str(exc), router_id)
            return
        streams = self.streams
        for chunk in batch.chunks:
            entry = streams.get(chunk.request_id)
            if entry is None:
                continue
            entry[0].push(chunk)
            if chunk.finish_reason is not None:
                del streams[chunk.request_id]


class _RouterLink:
    """One DEALER connection to one router, its replies handed to the client as they are read,
    and a task watching the connection: when it drops, the streams it carried fail at once
    (503) instead of hanging until the router's discovery lease runs out, and no new request
    goes its way until it is back."""

    def __init__(self, client: RouterClient, instance: Instance) -> None:
        self.router_id = instance.id
        self.client = client
        self.dealer = MonitoredDealer(client.ctx, instance.endpoints["request"], self._on_reply)
        self.up = True  # optimistic until a drop: requests queue while it connects
        self.task = asyncio.create_task(self.dealer.run())
        self.watcher = asyncio.create_task(self._watch(client))

    async def _watch(self, client: RouterClient) -> None:
        async for connected in self.dealer.changes():
            self.up = connected
            if not connected:
                client.fail_streams(self.router_id)

    def _on_reply(self, frames: list[bytes]) -> None:
        if len(frames) == 2 and frames[0] == KIND_TOKENS:
            self.client.deliver(frames[1], self.router_id)
        else:
            self.client.malformed.drop(f"{len(frames)} frames, kind {frames[0][:8]!r}",
                                       self.router_id)

    def close(self) -> None:
        self.task.cancel()
        self.watcher.cancel()
        self.dealer.close()
