"""The frontend's side of the request plane: sends requests to a router and hands back streams.

Owns the DEALER sockets to the discovered routers, the map from request id to its stream, and the
set of models that live workers serve (from discovery). Does not own HTTP or tokenization.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import zmq
from prometheus_client import CollectorRegistry

from common.discovery import Discovery
from common.failure_detector import DetectorSettings, PhiAccrualDetector
from common.malformed import MALFORMED, MalformedFrames
from common.messages import (
    FINISH_ERROR,
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_PING,
    KIND_PONG,
    KIND_RESUME_ELSEWHERE,
    KIND_TOKENS,
    ROLE_ROUTER,
    ROLE_WORKER,
    Cancel,
    GenerateRequest,
    Instance,
    TokenChunk,
    encoder,
    placements_decoder,
    resume_elsewhere_decoder,
    token_batch_decoder,
)
from common.monitored_dealer import MonitoredDealer
from common.pause_grace import PauseGrace
from common.transport import destroy_context, trusted_peer
from services.frontend.stream_resume import OpenStream
from services.frontend.upstream_metrics import UpstreamMetrics

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
        while (batch := self.ready_batch(tokens)) is None:
            if self.finished:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return batch

    def ready_batch(self, tokens: int = 0) -> list[TokenChunk] | None:
        """What `next_batch(tokens)` would return without waiting, or None if it would wait."""
        if not self._pending or (tokens and self._tokens < tokens and not self._final):
            return None
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
                                    chunk.num_prompt_tokens, chunk.cached_tokens,
                                    logprobs=chunk.logprobs[:k] if chunk.logprobs else None,
                                    prompt_logprobs=chunk.prompt_logprobs))
            pending[i] = TokenChunk(chunk.request_id, chunk.token_ids[k:], chunk.finish_reason,
                                    error_code=chunk.error_code,
                                    error_message=chunk.error_message,
                                    logprobs=chunk.logprobs[k:] if chunk.logprobs else None)
            count = tokens
        del pending[:i]
        self._tokens -= tokens
        return batch


class RouterClient:
    """The real `Upstream`: routers and workers from discovery, requests over ZeroMQ DEALERs.

    Requests go to the live router with the fewest streams in flight. Each router is pinged
    every `heartbeat_s`; one whose connection drops, or that answered pings before and has been
    silent `missed_heartbeats` periods (hung), or that drains, gives its streams back: each
    resumes through another router from the next token (`stream_resume.py`)."""

    def __init__(self, discovery: Discovery, heartbeat_s: float = 0.1,
                 missed_heartbeats: int = 3, metrics: UpstreamMetrics | None = None,
                 resume_wait_s: float = 5.0) -> None:
        self.discovery = discovery
        self.ctx = zmq.Context()
        self.routers: dict[str, _RouterLink] = {}
        self.workers: dict[str, Instance] = {}
        self.streams: dict[str, OpenStream] = {}
        self.heartbeat_s = heartbeat_s
        self.silence_s = heartbeat_s * missed_heartbeats
        self.detector_settings = DetectorSettings.for_heartbeats(heartbeat_s, missed_heartbeats)
        self.grace = PauseGrace(self.detector_settings.ceiling_s)  # after a pause of our own
        self._tasks: list[asyncio.Task[None]] = []
        # Derived from discovery on every change, not per request.
        self._models: list[str] = []
        self._context: dict[str, int] = {}
        self.metrics = metrics or UpstreamMetrics(CollectorRegistry())
        self.malformed = MalformedFrames("frame from router", self.metrics.malformed.inc, log)
        self._turn = 0
        # Streams of a lost router that found no other to resume through: when each gives up,
        # and when its router was last heard from (the start of the gap its client sees).
        self.resume_wait_s = resume_wait_s
        self._unplaced: dict[str, tuple[float, float]] = {}

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch(ROLE_ROUTER)),
                       asyncio.create_task(self._watch(ROLE_WORKER)),
                       asyncio.create_task(self._ping())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for link in list(self.routers.values()):
            link.close()
        destroy_context(self.ctx)

    # -- Upstream ------------------------------------------------------------------------------

    def served_models(self) -> list[str]:
        return self._models if any(link.up or (link.hung and link.dealer.connected)
                                   for link in self.routers.values()) else []

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
        link = self._pick()
        if link is None:
            raise NoWorkersError("no router is reachable")
        stream = ChunkStream(request.request_id)
        self.streams[request.request_id] = OpenStream(stream, request, link.router_id)
        link.inflight += 1
        link.socket.send_multipart([KIND_GENERATE, encoder.encode(request)])
        return stream

    def cancel(self, request_id: str) -> None:
        entry = self.streams.pop(request_id, None)
        if entry is None:
            return
        link = self.routers.get(entry.router)
        if link is not None:
            link.inflight -= 1
            link.socket.send_multipart([KIND_CANCEL, encoder.encode(Cancel(request_id))])

    def _pick(self, exclude: str = "", hung_ok: bool = True) -> _RouterLink | None:
        """The usable router with the fewest streams in flight (None: there is none); ties
        rotate, so sequential requests do not all go to the first router. With `hung_ok`, a
        connected router declared hung is the last resort (the verdict may be a busy host's)."""
        links = list(self.routers.values())
        self._turn += 1
        best: _RouterLink | None = None
        for i in range(len(links)):
            link = links[(self._turn + i) % len(links)]
            if link.up and not link.draining and link.router_id != exclude and (
                    best is None or link.inflight < best.inflight):
                best = link
        if best is None and hung_ok:
            best = min((link for link in links if link.hung and link.dealer.connected
                        and not link.draining and link.router_id != exclude),
                       key=lambda link: link.inflight, default=None)
        return best

    # -- routers lost: their streams resume elsewhere -------------------------------------------

    def router_lost(self, router_id: str, why: str, only: list[str] | None = None,
                    exclude: str | None = None) -> None:
        """Resume `router_id`'s streams (or just `only`) through another router (through any
        but `exclude`, when given)."""
        ids = [rid for rid, e in self.streams.items() if e.router == router_id] \
            if only is None else [rid for rid in only if rid in self.streams]
        old = self.routers.get(router_id)
        if only is None and old is not None and not old.lost_counted:
            old.lost_counted = True  # once per loss, however many ways it shows
            self.metrics.routers_lost.labels(why).inc()
        if ids:
            log.warning("router lost; resuming its streams elsewhere", extra={"fields": {
                "router": router_id, "why": why, "streams": len(ids)}})
        for rid in ids:
            entry = self.streams[rid]
            if entry.router != router_id:
                continue
            # Off a hung router only to a healthy one: if every other router looks hung too,
            # the host is more likely busy than they all dead; the stream stays and waits.
            link = self._pick(router_id if exclude is None else exclude, hung_ok=why != "hung")
            if link is None and why == "hung":
                continue
            if old is not None:
                old.inflight -= 1
                if why == "hung":  # should it wake up, it must not keep the work going
                    old.socket.send_multipart([KIND_CANCEL, encoder.encode(Cancel(rid))])
            heard = old.heard_at if old is not None else asyncio.get_running_loop().time()
            if link is not None:
                self._resume(entry, link, heard)
            elif self.resume_wait_s > 0:
                # None to resume through now: wait for one (this one reconnecting, a new one
                # registering; `_ping` looks every period).
                entry.router = ""  # nothing more is taken from the lost one
                self._unplaced[rid] = (asyncio.get_running_loop().time() + self.resume_wait_s,
                                       heard)
            else:
                self._fail_resume(entry)

    def _resume(self, entry: OpenStream, link: _RouterLink, heard: float) -> None:
        request = entry.resume_request()
        entry.move_to(link.router_id, heard)
        link.inflight += 1
        self.metrics.resumed.inc()
        link.socket.send_multipart([KIND_GENERATE, encoder.encode(request)])

    def _fail_resume(self, entry: OpenStream) -> None:
        rid = entry.request.request_id
        del self.streams[rid]
        self.metrics.resume_failed.inc()
        entry.stream.push(TokenChunk(  # type: ignore[attr-defined]
            rid, [], FINISH_ERROR, error_code=503,
            error_message="the router serving this request went away and no other router "
                          "became reachable"))

    def _resume_unplaced(self, now: float) -> None:
        """Streams waiting for a router: resumed through one that is usable now, or ended with
        an error once they have waited `resume_wait_s`."""
        for rid, (deadline, heard) in list(self._unplaced.items()):
            entry = self.streams.get(rid)
            if entry is None:
                del self._unplaced[rid]  # cancelled by its client meanwhile
                continue
            link = self._pick(hung_ok=False)
            if link is not None:
                del self._unplaced[rid]
                self._resume(entry, link, heard)
            elif now >= deadline:
                del self._unplaced[rid]
                self._fail_resume(entry)

    def fail_streams(self, router: str) -> None:
        self.router_lost(router, "dropped")

    async def _ping(self) -> None:
        """Ping every router each period; judge silence only on checks that ran on time (a
        frontend whose own loop lagged has not heard anyone, which says nothing of them)."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.heartbeat_s)
            now = loop.time()
            on_time = now - last < 2 * self.heartbeat_s
            if not on_time:
                self._paused(now, now - last)
            last = now
            self.metrics.routers.set(sum(1 for link in self.routers.values()
                                         if link.up and not link.draining))
            hung = []
            for link in list(self.routers.values()):
                if not link.listed and not self._carries(link.router_id):
                    # Gone from discovery and nothing of ours left on it (its streams finished
                    # or were handed back): kept, its connection would retry forever.
                    self._forget(link)
                    continue
                if link.dealer.connected:  # else a ping would only queue until a reconnect
                    link.socket.send_multipart([KIND_PING, b""])
                silent = now - link.heard_at
                if on_time and link.up and link.pongs is not None and silent > self.silence_s \
                        and link.pongs.suspicious(now) and self.grace.judging(now):
                    link.up = False
                    link.hung = True
                    self.metrics.detection.observe(silent)
                    hung.append(link.router_id)
            for router_id in hung:  # all verdicts first: nothing moves to a router judged now
                self.router_lost(router_id, "hung")
            if self._unplaced:
                self._resume_unplaced(now)

    def _paused(self, now: float, paused: float) -> None:
        """This frontend did not run for `paused` s: nobody's silence meanwhile counts, and the
        routers most likely stopped with it and may run again a while after it does (a busy
        host): none is judged hung for as long again as the pause lasted (at most the
        detector's ceiling). A pong read just after the pause may have been sent before it."""
        self.grace.paused(now, paused)
        for link in self.routers.values():
            link.heard_at = now
            if link.pongs is not None:
                link.pongs = PhiAccrualDetector(self.detector_settings, now)

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
                link = self.routers.get(inst.id)
                if link is not None:
                    # No new streams; running ones stay while it answers (`_ping` forgets it
                    # once they are gone).
                    link.draining = True
                    link.listed = False
                    if not link.up or not self._carries(inst.id):
                        self._forget(link)
                self.malformed.forget(inst.id)
            elif (link := self.routers.get(inst.id)) is not None:
                link.listed = True
                if link.draining and not link.drain_announced:
                    # Its record lapsed and is back (its owner stalled, or the wall clock
                    # jumped under every lease at once): it never said it drains, so it
                    # takes new streams again.
                    link.draining = False
                    log.info("router back in discovery", extra={"fields": {
                        "router": inst.id}})
            elif "request" in inst.endpoints and trusted_peer(self.ctx, inst.metadata):
                self.routers[inst.id] = _RouterLink(self, inst)

    def _carries(self, router_id: str) -> bool:
        return any(e.router == router_id for e in self.streams.values())

    def _forget(self, link: _RouterLink) -> None:
        self.router_lost(link.router_id, "left")
        self.routers.pop(link.router_id, None)
        link.close()

    def deliver(self, payload: bytes, router_id: str = "") -> None:
        try:
            batch = token_batch_decoder.decode(payload)
        except MALFORMED as exc:
            self.malformed.drop(str(exc), router_id)
            return
        streams = self.streams
        for chunk in batch.chunks:
            entry = streams.get(chunk.request_id)
            if entry is None or not entry.accept(chunk, router_id):
                continue
            entry.stream.push(chunk)  # type: ignore[attr-defined]
            if entry.gap_from and chunk.token_ids:
                self.metrics.resume_gap.observe(
                    asyncio.get_running_loop().time() - entry.gap_from)
                entry.gap_from = 0.0
            if chunk.finish_reason is not None:
                del streams[chunk.request_id]
                link = self.routers.get(router_id)
                if link is not None:
                    link.inflight -= 1

    def placed(self, payload: bytes, router_id: str) -> None:
        """A pong's `Placements`: where streams that no token has named a worker for wait."""
        try:
            message = placements_decoder.decode(payload)
        except MALFORMED as exc:
            self.malformed.drop(str(exc), router_id)
            return
        for request_id, worker in zip(message.request_ids, message.workers, strict=False):
            stream = self.streams.get(request_id)
            if stream is not None and stream.router == router_id:
                stream.worker = worker

    def resume_elsewhere(self, payload: bytes, router_id: str) -> None:
        """A draining router gave these streams back."""
        try:
            message = resume_elsewhere_decoder.decode(payload)
            ids = message.request_ids
        except MALFORMED as exc:
            self.malformed.drop(str(exc), router_id)
            return
        if not message.draining:  # it took us for gone (we stalled): resume through any
            self.router_lost(router_id, "presumed gone", only=ids, exclude="")
            return
        for request_id, worker in zip(ids, message.workers, strict=False):
            stream = self.streams.get(request_id)
            if worker and stream is not None and stream.router == router_id:
                stream.worker = worker  # fresher than our last chunk, and known before one
        link = self.routers.get(router_id)
        if link is not None:
            link.draining = link.drain_announced = True
            # Counted here, not when it left discovery (which may be seen first): leaving
            # says nothing of its streams until it gives them back.
            if not link.lost_counted:
                link.lost_counted = True
                self.metrics.routers_lost.labels("draining").inc()
        self.router_lost(router_id, "draining", only=ids)


class _RouterLink:
    """One DEALER connection to one router, its replies handed to the client as they are read,
    and a task watching the connection: when it drops, the streams it carried resume through
    another router at once instead of hanging until the router's discovery lease runs out, and
    no new request goes its way until it is back."""

    def __init__(self, client: RouterClient, instance: Instance) -> None:
        self.router_id = instance.id
        self.client = client
        self.dealer = MonitoredDealer(client.ctx, instance.endpoints["request"], self._on_reply)
        self.socket = self.dealer.socket
        self.up = True  # optimistic until a drop: requests queue while it connects
        self.hung = False  # declared hung by silence; any frame from it lifts that
        self.draining = False  # it gave its streams back or left discovery: nothing new
        self.drain_announced = False  # it said it drains (not just a lapsed record)
        self.listed = True  # its discovery record is there
        # The rhythm of its pongs (None: it never answered a ping, and its silence says
        # nothing): phi-accrual, as routers judge workers, so a router on a busy host gets the
        # slack its irregular pongs have shown, while a frozen one on a quiet host is caught in
        # ~0.4 s.
        self.pongs: PhiAccrualDetector | None = None
        self.lost_counted = False  # its loss is in the metrics (until it is back)
        self.heard_at = asyncio.get_running_loop().time()
        self.inflight = 0
        self.task = asyncio.create_task(self.dealer.run())
        self.watcher = asyncio.create_task(self._watch(client))

    async def _watch(self, client: RouterClient) -> None:
        async for connected in self.dealer.changes():
            self.up = connected and not self.hung
            if connected:
                self.heard_at = asyncio.get_running_loop().time()
                self.lost_counted = self.lost_counted and self.draining
            else:
                client.fail_streams(self.router_id)

    def _on_reply(self, frames: list[bytes]) -> None:
        client = self.client
        self.heard_at = now = asyncio.get_running_loop().time()
        if self.hung:
            self.hung = False
            self.up = self.dealer.connected
            self.lost_counted = self.lost_counted and self.draining
        if len(frames) == 2 and frames[0] == KIND_TOKENS:
            client.deliver(frames[1], self.router_id)
        elif len(frames) == 2 and frames[0] == KIND_PONG:
            if self.pongs is None:
                self.pongs = PhiAccrualDetector(client.detector_settings, now)
            else:
                self.pongs.heartbeat(now)
            if frames[1]:
                client.placed(frames[1], self.router_id)
        elif len(frames) == 2 and frames[0] == KIND_RESUME_ELSEWHERE:
            client.resume_elsewhere(frames[1], self.router_id)
        else:
            client.malformed.drop(f"{len(frames)} frames, kind {frames[0][:8]!r}",
                                  self.router_id)

    def close(self) -> None:
        self.task.cancel()
        self.watcher.cancel()
        self.dealer.close()
