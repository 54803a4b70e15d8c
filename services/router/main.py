"""The router process: picks a worker for every request, relays token streams, survives failures.

Reads top-down: the config builds the parts (selection, accounting, migration, liveness, event
intake, the /v1/route preview); `run()` binds the frontend-facing ROUTER socket, registers, runs
the loops until SIGTERM/SIGINT and shuts down; then the loops; then what happens to a worker
that comes (one DEALER and one event subscription each), goes, or is lost (its requests continue
on another worker from the next token). Does not own HTTP or tokenization (frontend) or
scheduling (workers).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Sequence

import msgspec
import zmq

from common.config import parse_configs
from common.discovery import open_discovery
from common.event_plane import EventSubscriber
from common.logs import setup_logging
from common.loop_socket import LoopSocket
from common.messages import (
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_TOKENS,
    ROLE_ROUTER,
    ROLE_WORKER,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    TOPIC_LOAD,
    Cancel,
    Instance,
    cancel_decoder,
    encoder,
    generate_decoder,
    token_batch_decoder,
)
from common.status_server import StatusServer
from common.transport import bind_socket, tune_stream_socket
from services.router.accounting import Accounting
from services.router.args import RouterConfig
from services.router.events import EventIntake
from services.router.liveness import Liveness
from services.router.metrics import RouterMetrics
from services.router.migration import Migration
from services.router.route_api import RouteApi
from services.router.selection import build_selection
from services.router.streams import Streams, send_error
from services.router.worker_pool import WorkerHandle, WorkerPool

log = logging.getLogger("turnout.router")

MALFORMED = (msgspec.DecodeError, msgspec.ValidationError)


class Router:
    def __init__(self, config: RouterConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.router_id = config.router_id or f"router-{os.getpid()}-{secrets.token_hex(3)}"
        self.ctx = zmq.Context()
        self.metrics = RouterMetrics(self.router_id)
        self.pool = WorkerPool(self.ctx, self.on_worker_message)
        self.accounting = Accounting(clock)
        self.selector, self.kv_index = build_selection(config, self.pool, self.metrics)
        # Read on the loop from run() on; sends go out from here.
        self.frontends = LoopSocket(self.ctx.socket(zmq.ROUTER), self.on_frontend_message)
        self.migration = Migration(
            self.pool, self.accounting, self.selector, self.metrics,
            functools.partial(send_error, self.frontends), self.kv_index,
            config.migration_limit, config.no_worker_wait_ms / 1000, clock)
        self.streams = Streams(self.frontends, self.pool, self.selector, self.accounting,
                               self.migration, self.metrics, config.no_worker_wait_ms / 1000,
                               clock)
        self.liveness = Liveness(config.heartbeat_interval_ms / 1000, config.missed_heartbeats,
                                 config.stall_timeout_ms / 1000, clock)
        self.intake = EventIntake(self.pool, self.liveness, self.metrics, self.kv_index,
                                  self.worker_recovered, clock)
        self.route_api = RouteApi(self.selector, self.metrics)
        topics = [TOPIC_HEARTBEAT, TOPIC_LOAD] + ([TOPIC_KV] if self.kv_index is not None else [])
        self.subscriber = EventSubscriber(
            self.ctx, topics, on_gap=self.intake.on_gap,
            on_malformed=self.metrics.malformed.labels("event").inc)
        self.status = StatusServer(self.metrics.registry, config.host,
                                   config.router_metrics_port)
        self.status.post_routes["/v1/route"] = self.route_api.handle
        self.discovery = open_discovery(config.discovery, lease_ttl=config.lease_ttl_s)
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}  # per worker: its connection
        self._listed: set[str] = set()  # worker ids with a discovery record (liveness gauge)
        self._warned_malformed = False
        self.stop = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle (to be replaced by common's service lifecycle) -------------------------------

    async def run(self, install_signals: bool = True) -> None:
        cfg = self.config
        tune_stream_socket(self.frontends.socket)
        endpoint = bind_socket(self.frontends.socket, cfg.host, cfg.router_port,
                               cfg.advertise_host)
        metrics_port = await self.status.start()
        self.loop = loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
        tasks = [asyncio.create_task(c) for c in (
            self.frontends.run(), self.watch_workers(), self.consume_events(),
            self.watch_liveness())]
        host = cfg.advertise_host or cfg.host
        await self.discovery.register(Instance(
            id=self.router_id, role=ROLE_ROUTER,
            endpoints={"request": endpoint, "metrics": f"http://{host}:{metrics_port}/metrics",
                       "http": f"http://{host}:{metrics_port}"},  # + /v1/route, /health
            metadata={"mode": cfg.router_mode, "pid": os.getpid(), "started": time.time()}))
        log.info("router ready", extra={"fields": {"id": self.router_id, "request": endpoint}})
        done, _ = await asyncio.wait([*tasks, asyncio.create_task(self.stop.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("router loop failed", exc_info=task.exception())
        await self.discovery.unregister(self.router_id)
        for task in tasks:
            task.cancel()
        for worker_tasks in self._tasks.values():
            for task in worker_tasks:
                task.cancel()
        await self.discovery.close()
        await self.status.close()
        # Every loop-read socket before the context: its FD leaves the loop before it closes.
        self.pool.close_all()
        self.subscriber.close()
        self.frontends.close()
        self.ctx.destroy(linger=0)

    # -- loops ---------------------------------------------------------------------------------

    def on_frontend_message(self, frames: list[bytes]) -> None:
        """A request or a cancel from a frontend (read on the loop, every ready one per wake)."""
        if len(frames) != 3:
            self._malformed("request", f"{len(frames)} frames")
            return
        ident, kind, payload = frames
        try:
            if kind == KIND_GENERATE:
                self.streams.on_generate(ident, generate_decoder.decode(payload), payload)
            elif kind == KIND_CANCEL:
                self.streams.on_cancel(cancel_decoder.decode(payload).request_id)
            else:
                self._malformed("request", f"unknown kind {kind!r}")
        except MALFORMED as exc:
            self._malformed("request", str(exc))

    def on_worker_message(self, worker: WorkerHandle, frames: list[bytes]) -> None:
        """A token batch from a worker, relayed back to the frontends."""
        if len(frames) != 2 or frames[0] != KIND_TOKENS:
            self._malformed("request", "bad frame from worker")
            return
        try:
            batch = token_batch_decoder.decode(frames[1])
        except MALFORMED as exc:
            self._malformed("request", str(exc))
            return
        self.streams.on_batch(worker, batch.chunks)

    async def watch_connection(self, worker: WorkerHandle) -> None:
        """A dropped connection is a dead worker, long before any lease or heartbeat says so."""
        await worker.socket.wait_lost()
        self.worker_lost(worker, self.liveness.on_disconnect(worker))

    async def watch_workers(self) -> None:
        async for event in self.discovery.watch(role=ROLE_WORKER):
            instance = event.instance
            if event.kind == "removed":
                self._listed.discard(instance.id)
                worker = self.pool.workers.get(instance.id)
                if worker is not None:
                    # Left discovery: draining or gone. Stop routing to it; running streams
                    # finish over the open connection, or migrate when it drops.
                    worker.routable = False
                    if not worker.inflight:
                        self._retire(worker)
            else:
                self._listed.add(instance.id)
                self._admit(instance)
                if self.streams.waiting:
                    self.streams.retry()
            self._update_worker_gauges()

    async def consume_events(self) -> None:
        while True:
            topic, env = await self.subscriber.recv()
            worker = self.pool.workers.get(env.publisher_id)
            if worker is None:
                continue
            try:
                self.intake.on_event(worker, topic, env.payload)
            except MALFORMED as exc:
                self._malformed("event", str(exc))

    async def watch_liveness(self) -> None:
        while True:
            await asyncio.sleep(self.liveness.period / 2)
            self.check_liveness()

    def check_liveness(self) -> None:
        """Every half heartbeat period: place waiting requests, judge silent/stalled workers."""
        on_time = self.liveness.check_on_time()
        if self.streams.waiting:
            self.streams.retry()
        if not on_time:
            return
        if self.kv_index is not None:
            self.metrics.index_blocks.set(self.kv_index.num_blocks())
            self.metrics.index_entries.set(self.kv_index.num_entries())
        for worker, cause in self.liveness.verdicts(list(self.pool.workers.values())):
            self.worker_lost(worker, cause)

    # -- workers coming, going, lost -----------------------------------------------------------

    def _admit(self, instance: Instance) -> None:
        if "request" not in instance.endpoints:
            return
        old = self.pool.workers.get(instance.id)
        if old is not None and old.started != float(instance.metadata.get("started", 0.0)):
            # A new incarnation (restart, or a rejoin after a freeze) replaces the old handle.
            self._retire(old)
        worker = self.pool.admit(instance)
        if worker is None:
            return
        self.liveness.watch(worker)
        events = instance.endpoints.get("events")
        if events:
            self.subscriber.connect(events)
        self._tasks[worker.id] = [asyncio.create_task(self.watch_connection(worker))]
        log.info("worker admitted", extra={"fields": {"worker": worker.id,
                                                      "model": worker.model}})

    def _retire(self, worker: WorkerHandle, dead: bool = False) -> None:
        """Close `worker`'s connections (`dead`: and never re-admit this incarnation)."""
        for task in self._tasks.pop(worker.id, []):
            if task is not asyncio.current_task():  # its connection watcher may be retiring it
                task.cancel()
        self.subscriber.disconnect(worker.instance.endpoints.get("events", ""))
        self.subscriber.forget(worker.id)
        self._forget_kv(worker.id)
        if dead:
            self.pool.mark_dead(worker)
        else:
            self.pool.close(worker)

    def worker_lost(self, worker: WorkerHandle, cause: str) -> None:
        """Take `worker` out of routing and move its requests. A dropped connection closes it
        for good; a suspect (silent or stalled, connection open) is told to drop the moved
        requests, and re-admitted if it shows life again (`worker_recovered`)."""
        loss = self.liveness.declare_lost(worker, cause)
        if loss is None:
            return
        if loss.first:
            log.warning("worker declared dead", extra={"fields": {
                "worker": worker.id, "cause": cause, "silent_ms": round(loss.silent_s * 1000),
                "inflight": worker.inflight}})
            self.metrics.worker_deaths.labels(cause).inc()
            self.metrics.detection_seconds.observe(loss.silent_s)
        self.migration.worker_lost(worker)
        self._forget_kv(worker.id)
        moved = self.accounting.on_worker(worker)
        if loss.crashed:
            self._retire(worker, dead=True)
        else:
            for entry in moved:  # if it wakes up, it must not keep computing these
                worker.socket.send_multipart([KIND_CANCEL,
                                              encoder.encode(Cancel(entry.request_id))])
        for entry in moved:
            self.migration.migrate(entry, cause)
        self._update_worker_gauges()

    def worker_recovered(self, worker: WorkerHandle) -> None:
        log.warning("suspected worker is alive again; resyncing and re-admitting",
                    extra={"fields": {"worker": worker.id}})
        self.metrics.worker_recoveries.inc()
        if self.kv_index is not None:
            worker.synced = True
            self.intake.resync(worker)
        self._update_worker_gauges()
        if self.streams.waiting:
            self.streams.retry()

    def _forget_kv(self, worker_id: str) -> None:
        if self.kv_index is not None:
            self.kv_index.remove_worker(worker_id)
        if self.selector.approx_index is not None:
            self.selector.approx_index.remove_worker(worker_id)

    def _update_worker_gauges(self) -> None:
        self.metrics.set_worker_gauges(self.pool.workers.values(), self.pool.dead, self._listed)

    def _malformed(self, plane: str, why: str) -> None:
        self.metrics.malformed.labels(plane).inc()
        if not self._warned_malformed:
            self._warned_malformed = True
            log.warning("dropped malformed frame", extra={"fields": {"plane": plane, "why": why}})


def main(argv: Sequence[str] | None = None) -> None:
    (config,) = parse_configs([RouterConfig], list(sys.argv[1:] if argv is None else argv),
                              prog="turnout router")
    setup_logging("router", config.log_level)
    import uvloop

    uvloop.run(Router(config).run())
