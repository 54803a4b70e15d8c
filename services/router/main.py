"""The router process: picks a worker for every request, relays token streams, survives failures.

Reads top-down: the config builds the parts (selection, accounting, migration, liveness, event
intake, the /v1/route preview); `run()` binds the frontend-facing ROUTER socket, registers and
runs the loops until SIGTERM/SIGINT; then the loops; then a worker that comes (one DEALER and
one event subscription each) or goes. A lost worker's requests are `worker_loss.py`'s; being one
router among several (pings, replica sync, the drain) is `replicas.py`'s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence

import zmq

from common.discovery import open_discovery
from common.event_plane import EventSubscriber
from common.malformed import MALFORMED, MalformedFrames
from common.messages import (
    KIND_CANCEL,
    KIND_ENCODED,
    KIND_GENERATE,
    KIND_TOKENS,
    ROLE_ROUTER,
    ROLE_WORKER,
    TOPIC_FPM,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    TOPIC_LOAD,
    TOPIC_ROUTER_USAGE,
    Instance,
    cancel_decoder,
    encode_reply_decoder,
    generate_decoder,
    token_batch_decoder,
)
from common.router_socket import RouterSocket
from common.service import Service, run_service
from common.status_server import StatusServer
from common.transport import (
    destroy_context,
    identity_metadata,
    secure_context,
    trusted_peer,
)
from services.router.accounting import Accounting
from services.router.args import RouterConfig
from services.router.disaggregation import Disaggregation
from services.router.encode_routing import EncodeRouting
from services.router.events import EventIntake
from services.router.liveness import CAUSE_CRASH, CAUSE_HANG, Liveness
from services.router.metrics import RouterMetrics
from services.router.migration import Migration
from services.router.queue_rebalance import QueueRebalance
from services.router.replicas import Replicas
from services.router.route_api import RouteApi
from services.router.selection import build_selection
from services.router.streams import Streams, send_error
from services.router.worker_loss import WorkerLoss
from services.router.worker_pool import WorkerHandle, WorkerPool
from services.router.worker_revival import WorkerRevival

log = logging.getLogger("turnout.router")


class Router(WorkerLoss):
    def __init__(self, config: RouterConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.service = Service(ROLE_ROUTER, config.router_id)
        self.router_id = self.service.id
        self.ctx = zmq.Context()
        self.metrics = RouterMetrics(self.router_id)
        self.pool = WorkerPool(self.ctx, self.on_worker_message)
        self.accounting = Accounting(clock, lambda w: self.replicas.changed(w),
                                     config.heartbeat_interval_ms / 1000)
        self.selector, self.kv_index = build_selection(config, self.pool, self.metrics)
        # Read on the loop from run() on; sends go out from here.
        self.frontends = RouterSocket(self.ctx, self.on_frontend_message)
        self.migration = Migration(
            self.pool, self.accounting, self.selector, self.metrics,
            functools.partial(send_error, self.frontends), self.kv_index,
            config.migration_limit, config.no_worker_wait_ms / 1000, clock)
        self.streams = Streams(self.frontends, self.pool, self.selector, self.accounting,
                               self.migration, self.metrics, config.no_worker_wait_ms / 1000,
                               clock)
        self.streams.disagg = self.disagg = Disaggregation(
            config, self.pool, self.selector, self.kv_index, self.accounting, self.migration,
            self.metrics, clock)
        self.streams.encoding = self.encoding = EncodeRouting(
            self.pool, self.metrics.registry, self.streams.on_generate, self.streams.reply_error,
            clock)
        self.liveness = Liveness(config.heartbeat_interval_ms / 1000, config.missed_heartbeats,
                                 config.stall_timeout_ms / 1000, clock,
                                 suspect_phi=config.suspect_phi, convict_phi=config.convict_phi,
                                 long_prefill_tokens=config.long_prefill_tokens)
        self.intake = EventIntake(self.pool, self.liveness, self.metrics, self.kv_index,
                                  self.worker_recovered, clock, self.selector.cost_models)
        self.route_api = RouteApi(self.selector, self.metrics)
        self.rebalance = QueueRebalance(self.accounting, self.selector, self.disagg,
                                        self.metrics)
        self.replicas = Replicas(self.router_id, config, self.frontends, self.pool,
                                 self.streams, self.metrics, clock)
        self.topics = topics = [TOPIC_HEARTBEAT, TOPIC_LOAD, TOPIC_ROUTER_USAGE] + (
            [TOPIC_KV] if self.kv_index is not None else [])
        if self.selector.cost_models is not None:
            topics.append(TOPIC_FPM)
        self.subscriber = EventSubscriber(self.ctx, topics, on_gap=self.intake.on_gap,
                                          on_malformed=self.metrics.malformed.labels("event").inc)
        self.status = StatusServer(self.metrics.registry, config.host, config.router_metrics_port)
        self.status.post_routes["/v1/route"] = self.route_api.handle
        self.discovery = open_discovery(config.discovery, lease_ttl=config.lease_ttl_s)
        self._watchers: dict[str, asyncio.Task[None]] = {}  # per worker: its connection
        self.revival = WorkerRevival(self.ctx, self._revived)
        # Workers with a discovery record, their latest (liveness gauge, revival).
        self._listed: dict[str, Instance] = {}
        self._untrusted: set[str] = set()  # worker ids refused for their key (warned once)
        self.malformed = {plane: MalformedFrames(f"{plane} frame",
                                                 self.metrics.malformed.labels(plane).inc, log)
                          for plane in ("request", "event")}
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, install_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT or a loop fails; undo each start-up step in reverse."""
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        self.streams.call_later = self.loop.call_later
        async with self.service as service:
            if install_signals:
                service.install_signal_handlers()
            service.on_shutdown("zmq context", lambda: destroy_context(self.ctx))
            service.on_shutdown("sockets", self._close_sockets)
            secure_context(self.ctx, cfg.keys_dir)
            endpoint = await self.frontends.bind(cfg.host, cfg.router_port, cfg.advertise_host)
            metrics_port = await self.status.start()
            events = self.replicas.start(self.ctx, service)
            service.on_shutdown("status server", self.status.close)
            service.on_shutdown("discovery", self.discovery.close)
            service.spawn("frontends", self.frontends.run())
            service.spawn("discovery watch", self.watch_workers())
            service.spawn("events", self.consume_events())
            service.spawn("liveness", self.watch_liveness())
            service.spawn("router replicas",
                          self.replicas.watch_routers(self.discovery, self.subscriber))
            service.on_shutdown("unregister", lambda: self.discovery.unregister(self.router_id))
            host = cfg.advertise_host or cfg.host
            await self.discovery.register(Instance(
                id=self.router_id, role=ROLE_ROUTER,
                endpoints={"request": endpoint, "events": events,
                           "metrics": f"http://{host}:{metrics_port}/metrics",
                           "http": f"http://{host}:{metrics_port}"},  # + /v1/route, /health
                metadata={"mode": cfg.router_mode, "pid": os.getpid(), "started": time.time(),
                          **identity_metadata(self.ctx)}))
            # First thing on SIGTERM: hand every stream back, to resume on another router.
            service.on_shutdown("drain", lambda: self.replicas.drain(self.discovery))
            log.info("router ready", extra={"fields": {"id": self.router_id, "request": endpoint}})
            await service.run()

    def _close_sockets(self) -> None:
        """Every loop-read socket, before the context: an FD leaves the loop before it closes."""
        for task in self._watchers.values():
            task.cancel()
        self.revival.close()
        self.pool.close_all()
        self.subscriber.close()
        self.frontends.close()

    # -- the request plane (read on the loop, every ready message per wake) ---------------------

    def on_frontend_message(self, frames: list[bytes]) -> None:
        """A request, a cancel or a ping from a frontend."""
        if len(frames) != 3:
            self.malformed["request"].drop(f"{len(frames)} frames")
            return
        ident, kind, payload = frames
        if self.replicas.on_frame(ident, kind):
            return
        try:
            if kind == KIND_GENERATE:
                request = generate_decoder.decode(payload)
                if not self.replicas.gave_back(ident, request):
                    self.streams.on_generate(ident, request, payload)
            elif kind == KIND_CANCEL:
                self.streams.on_cancel(cancel_decoder.decode(payload).request_id)
            else:
                self.malformed["request"].drop(f"unknown kind {kind!r}")
        except MALFORMED as exc:
            self.malformed["request"].drop(str(exc))

    def on_worker_message(self, worker: WorkerHandle, frames: list[bytes]) -> None:
        """A token batch from a worker, relayed back to the frontends (or embeddings from an
        encode worker, for the request they belong to)."""
        if len(frames) != 2 or frames[0] not in (KIND_TOKENS, KIND_ENCODED):
            self.malformed["request"].drop("bad frame from worker", worker.id)
            return
        try:
            if frames[0] == KIND_ENCODED:
                self.encoding.on_reply(worker, encode_reply_decoder.decode(frames[1]))
            else:
                self.streams.on_batch(worker, token_batch_decoder.decode(frames[1]).chunks)
        except MALFORMED as exc:
            self.malformed["request"].drop(str(exc), worker.id)

    # -- loops ---------------------------------------------------------------------------------

    async def watch_connection(self, worker: WorkerHandle) -> None:
        """A dropped connection is a dead worker, long before any lease or heartbeat says so."""
        await worker.dealer.wait_lost()
        self.worker_lost(worker, self.liveness.on_disconnect(worker))

    async def watch_workers(self) -> None:
        async for event in self.discovery.watch(role=ROLE_WORKER):
            instance = event.instance
            if event.kind == "removed":
                self._listed.pop(instance.id, None)
                if instance.id in self.revival:  # dead, and now its record is gone too
                    self.revival.forget(instance.id)
                    self.subscriber.disconnect(instance.endpoints.get("events", ""))
                worker = self.pool.workers.get(instance.id)
                if worker is not None:
                    # Left discovery: draining or gone. Stop routing to it; running streams
                    # finish over the open connection, or migrate when it drops.
                    worker.routable = False
                    if not worker.inflight:
                        self._retire(worker)
            else:
                self._listed[instance.id] = instance
                self._admit(instance)
                if self.streams.waiting:
                    self.streams.retry()
            self._update_worker_gauges()

    async def consume_events(self) -> None:
        while True:
            topic, env = await self.subscriber.recv()
            worker = self.pool.workers.get(env.publisher_id)
            try:
                if topic == TOPIC_ROUTER_USAGE:
                    self.replicas.sync.on_event(env.payload)
                elif worker is not None:
                    self.intake.on_event(worker, topic, env.payload)
                elif topic == TOPIC_HEARTBEAT:
                    self.revival.heard(env.publisher_id)
            except MALFORMED as exc:
                self.malformed["event"].drop(str(exc), env.publisher_id)

    async def watch_liveness(self) -> None:
        while True:
            await asyncio.sleep(self.liveness.period / 2)
            self.check_liveness()

    # -- workers coming, going, lost -----------------------------------------------------------

    def _admit(self, instance: Instance) -> None:
        if "request" not in instance.endpoints:
            return
        if not trusted_peer(self.ctx, instance.metadata):
            if instance.id not in self._untrusted:
                self._untrusted.add(instance.id)
                log.warning("worker not admitted: its record has no fleet CURVE key",
                            extra={"fields": {"worker": instance.id}})
            return
        old = self.pool.workers.get(instance.id)
        if old is not None and old.started != float(instance.metadata.get("started", 0.0)):
            # A new incarnation (a restarted process) replaces the old handle; the old process
            # took whatever it still ran with it (long prefills held on a suspect).
            self._move_all(old, CAUSE_HANG if old.suspect is not None else CAUSE_CRASH)
            self._retire(old)
        worker = self.pool.admit(instance)
        if worker is None:
            return
        self.revival.forget(worker.id)  # a new incarnation of one declared dead
        self.liveness.watch(worker)
        events = instance.endpoints.get("events")
        if events:
            self.subscriber.connect(events)
        self._watchers[worker.id] = asyncio.create_task(self.watch_connection(worker))
        moved = self.rebalance.worker_joined(worker) if self.config.rebalance_on_join else 0
        log.info("worker admitted", extra={"fields": {"worker": worker.id,
                                                      "model": worker.model,
                                                      "queued_moved_here": moved}})

    def _retire(self, worker: WorkerHandle, dead: bool = False) -> None:
        """Close `worker`'s connections (`dead`: and never re-admit this incarnation)."""
        task = self._watchers.pop(worker.id, None)
        if task is not None and task is not asyncio.current_task():  # it may be retiring it
            task.cancel()
        if dead and worker.id in self._listed:
            # Still listed: the connection may only have been cut (its events stay subscribed
            # to hear it, should it live).
            self.revival.watch(worker.instance)
        else:
            self.subscriber.disconnect(worker.instance.endpoints.get("events", ""))
        self.subscriber.forget(worker.id)
        self._forget_kv(worker.id)
        for malformed in self.malformed.values():
            malformed.forget(worker.id)
        if dead:
            self.pool.mark_dead(worker)
        else:
            self.pool.close(worker)

    def _revived(self, worker_id: str) -> None:
        """A worker declared dead for a dropped connection is reachable and heartbeating."""
        instance = self._listed.get(worker_id)
        if instance is None or self.pool.dead.get(worker_id) != float(
                instance.metadata.get("started", 0.0)):
            return  # gone meanwhile, or replaced by a new incarnation
        del self.pool.dead[worker_id]
        self.metrics.worker_recoveries.inc()
        self._admit(instance)
        self._update_worker_gauges()



def main(argv: Sequence[str] | None = None) -> None:
    run_service(ROLE_ROUTER, [RouterConfig], _start, argv)


def _start(config: RouterConfig) -> Coroutine[object, object, None]:
    return Router(config).run()
