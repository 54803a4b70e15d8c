"""One router among several: what a router does so that no router is a single point of failure.

Wires the pieces of router replication into the router process: the frontends' pings and the
verdict on a gone frontend (`frontend_liveness.py`), the event-plane PUB socket on which this
router shares its placements with the other replicas and the subscription to theirs
(`replica_sync.py`), and the drain that gives every stream back on SIGTERM (`handback.py`).

Owns that wiring and the discovery watch of the other routers. Does not own the router's
sockets, loops or accounting (`main.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import zmq

from common.discovery import Discovery
from common.event_plane import EventPublisher, EventSubscriber
from common.messages import KIND_PING, ROLE_ROUTER, GenerateRequest, Placements, encoder
from common.service import Service
from services.router.args import RouterConfig
from services.router.frontend_liveness import FrontendLiveness, ping_workers
from services.router.handback import HandBack
from services.router.metrics import RouterMetrics
from services.router.replica_sync import ReplicaSync
from services.router.streams import FrameSender, Streams
from services.router.worker_pool import WorkerHandle, WorkerPool

log = logging.getLogger("turnout.router")


class Replicas:
    def __init__(self, router_id: str, config: RouterConfig, frontends: FrameSender,
                 pool: WorkerPool, streams: Streams, metrics: RouterMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.router_id = router_id
        self.config = config
        self.pool = pool
        self.streams = streams
        self.metrics = metrics
        metrics.placements_unannounced.set_function(streams.accounting.awaiting_announcement)
        self.period = config.heartbeat_interval_ms / 1000
        self.frontends = FrontendLiveness(frontends, self.period, config.missed_heartbeats,
                                          config.frontend_timeout_ms / 1000, clock)
        self.handback = HandBack(frontends, streams.accounting, streams.parking,
                                 streams.migration, metrics)
        self.handback.encoding = streams.encoding
        self.sync = ReplicaSync(router_id, pool, None, 3 * self.period, clock)
        self.publisher: EventPublisher | None = None

    def start(self, ctx: zmq.Context, service: Service) -> str:
        """Bind the event-plane PUB socket; its endpoint (for discovery)."""
        cfg = self.config
        self.publisher = EventPublisher(ctx, self.router_id, cfg.host, cfg.router_event_port,
                                        cfg.advertise_host)
        service.on_shutdown("event publisher", self.publisher.close)
        if cfg.replica_sync:
            self.sync.publisher = self.publisher
        return self.publisher.endpoint

    def changed(self, worker: WorkerHandle) -> None:
        self.sync.changed(worker)

    # -- frontends -----------------------------------------------------------------------------

    def on_frame(self, frontend: bytes, kind: bytes) -> bool:
        """Note a frame from `frontend`; True when it was a ping (answered, nothing else to do)."""
        if kind == KIND_PING:
            ids, workers = self.streams.accounting.unannounced(frontend)
            if ids:
                self.metrics.placements_announced.inc(len(ids))
            self.frontends.on_ping(frontend, encoder.encode(Placements(ids, workers))
                                   if ids else b"")
            return True
        self.frontends.on_frame(frontend)
        return False

    def gave_back(self, frontend: bytes, request: GenerateRequest) -> bool:
        """Draining: `request` goes back to its frontend to be sent elsewhere."""
        if self.handback.active:
            self.handback.give_back(frontend, [request.request_id])
        return self.handback.active

    def check(self, paused_s: float, now: float) -> None:
        """Every half heartbeat period: ping the workers; on a check that ran on time
        (`paused_s` 0: else it ran that late), publish our usage snapshot, expire silent peers,
        cancel gone frontends' requests, judging silences as of `now` (the check's start)."""
        ping_workers(w.socket for w in self.pool.workers.values())
        if paused_s:
            self.frontends.pause(paused_s)
            return
        self.sync.publish_snapshot()
        self.sync.expire(now)
        self.metrics.peer_routers.set(len(self.sync.heard))
        for frontend in self.frontends.lost(now):
            orphans = self.frontends.orphans(frontend, self.streams.accounting,
                                             self.streams.parking)
            if self.streams.encoding is not None:  # and those waiting for their embeddings
                orphans += [rid for rid, p in self.streams.encoding.pending.items()
                            if p.frontend == frontend]
            self.streams.accounting.to_announce.pop(frontend, None)
            self.metrics.frontends_lost.inc()
            self.metrics.orphans_cancelled.inc(len(orphans))
            log.warning("frontend gone; cancelling its requests", extra={"fields": {
                "requests": len(orphans)}})
            for request_id in orphans:
                self.streams.on_cancel(request_id)
            if orphans:  # if it was only stalled, it resumes them instead of hanging
                self.handback.give_back(frontend, orphans, draining=False)

    # -- the other routers ---------------------------------------------------------------------

    async def watch_routers(self, discovery: Discovery, subscriber: EventSubscriber) -> None:
        """Subscribe to every other router's event plane (replica sync)."""
        async for event in discovery.watch(role=ROLE_ROUTER):
            events = event.instance.endpoints.get("events", "")
            if event.instance.id == self.router_id or not events:
                continue
            if event.kind == "removed":
                subscriber.disconnect(events)
                self.sync.forget(event.instance.id)
            elif event.kind == "added":
                subscriber.connect(events)

    async def drain(self, discovery: Discovery) -> None:
        """SIGTERM: leave discovery, give every stream back to its frontend (which resumes it
        through another router), and linger a moment for requests already on their way."""
        await discovery.unregister(self.router_id)
        self.handback.start()
        await asyncio.sleep(max(0.2, 2 * self.period))
