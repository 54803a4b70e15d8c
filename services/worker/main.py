"""The worker process: one engine behind the request plane, its events, heartbeats and metrics.

Reads top-down: parse config, build the engine, bind the request (ROUTER) and event (PUB)
sockets, start the engine, register in discovery, then serve until SIGTERM/SIGINT, when it
drains: it leaves discovery, refuses new work, lets running streams finish within the grace
period and exits (the router migrates whatever is still running).

Owns routing replies to the right upstream peer and the heartbeat/load cadence. Does not own
scheduling (the engine) or routing decisions (the router).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence

import msgspec
import zmq
import zmq.asyncio

from common.config import parse_configs
from common.discovery import Discovery, open_discovery
from common.event_plane import EventPublisher
from common.logs import setup_logging
from common.messages import (
    FINISH_ERROR,
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_KV_DUMP,
    KIND_TOKENS,
    MODE_AGGREGATED,
    ROLE_WORKER,
    TOPIC_FPM,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    TOPIC_LOAD,
    ForwardPass,
    ForwardPassBatch,
    Heartbeat,
    Instance,
    KvEventBatch,
    LoadReport,
    TokenBatch,
    TokenChunk,
    cancel_decoder,
    encoder,
    generate_decoder,
)
from common.status_server import StatusServer
from common.transport import bind_socket, tune_stream_socket
from services.worker.args import WorkerConfig
from services.worker.engine import Engine, EngineError, StepOutput
from services.worker.engines import create_engine, engine_config_classes
from services.worker.metrics import WorkerMetrics

log = logging.getLogger("turnout.worker")


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.worker_id = config.worker_id or f"worker-{os.getpid()}-{secrets.token_hex(3)}"
        self.model = config.model_name()
        self.ctx = zmq.asyncio.Context()
        self.metrics = WorkerMetrics(self.worker_id, self.model)
        # request id → ROUTER identity of the upstream peer that sent it
        self.destinations: dict[str, bytes] = {}
        self.draining = False
        self._fpm: list[ForwardPass] = []
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()  # set when draining and no stream is left
        self._warned_malformed = False
        self.started = time.time()  # incarnation stamp: a re-registration changes it
        self.metrics_port = 0

    # -- engine output -------------------------------------------------------------------------

    def on_step(self, out: StepOutput) -> None:
        """Called by the engine once per step: one frame per destination, events, metrics."""
        if out.chunks:
            by_dest: dict[bytes, list[TokenChunk]] = {}
            destinations = self.destinations
            for chunk in out.chunks:
                if chunk.finish_reason is None:
                    ident = destinations.get(chunk.request_id)
                else:
                    ident = destinations.pop(chunk.request_id, None)
                    self.metrics.on_finish(chunk.finish_reason)
                    if self.draining and not destinations:
                        self._idle.set()
                if ident is None:
                    continue
                if chunk.num_prompt_tokens:
                    self.metrics.prompt_tokens.inc(chunk.num_prompt_tokens)
                    if chunk.cached_tokens:
                        self.metrics.cached_tokens.inc(chunk.cached_tokens)
                batch = by_dest.get(ident)
                if batch is None:
                    by_dest[ident] = [chunk]
                else:
                    batch.append(chunk)
            for ident, chunks in by_dest.items():
                self._send(ident, TokenBatch(chunks))
        if out.kv_events:
            self.publisher.publish(TOPIC_KV, KvEventBatch(self.worker_id, out.kv_events))
        if out.forward_pass is not None:
            self._fpm.append(out.forward_pass)
        self.metrics.on_step(out)

    def _send(self, ident: bytes, batch: TokenBatch) -> None:
        try:
            self.requests.send_multipart([ident, KIND_TOKENS, encoder.encode(batch)],
                                         flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone: its requests get cancelled by the router
            log.warning("reply dropped", extra={"fields": {"error": str(exc)}})

    def _error(self, ident: bytes, request_id: str, code: int, message: str) -> None:
        self._send(ident, TokenBatch([TokenChunk(request_id, [], FINISH_ERROR, error_code=code,
                                                 error_message=message)]))

    # -- request plane -------------------------------------------------------------------------

    async def serve_requests(self) -> None:
        while True:
            frames = await self.requests.recv_multipart()
            if len(frames) != 3:
                self._malformed(f"{len(frames)} frames")
                continue
            ident, kind, payload = frames
            try:
                if kind == KIND_GENERATE:
                    self._on_generate(ident, payload)
                elif kind == KIND_CANCEL:
                    request_id = cancel_decoder.decode(payload).request_id
                    if self.destinations.pop(request_id, None) is not None:
                        self.engine.abort(request_id)
                        self.metrics.on_finish("cancelled")
                        if self.draining and not self.destinations:
                            self._idle.set()
                elif kind == KIND_KV_DUMP:
                    self.publisher.publish(
                        TOPIC_KV, KvEventBatch(self.worker_id, list(self.engine.kv_dump()), True))
                else:
                    self._malformed(f"unknown kind {kind!r}")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._malformed(str(exc))

    def _on_generate(self, ident: bytes, payload: bytes) -> None:
        request = generate_decoder.decode(payload)
        if self.draining:
            self._error(ident, request.request_id, 503, "worker is draining")
            return
        if request.request_id in self.destinations:
            self._error(ident, request.request_id, 400, "duplicate request id")
            return
        self.destinations[request.request_id] = ident
        try:
            self.engine.add_request(request)
        except EngineError as exc:
            del self.destinations[request.request_id]
            self.metrics.on_finish("rejected")
            self._error(ident, request.request_id, exc.code, str(exc))

    def _malformed(self, why: str) -> None:
        self.metrics.malformed.inc()
        if not self._warned_malformed:
            self._warned_malformed = True
            log.warning("dropped malformed request frame", extra={"fields": {"why": why}})

    # -- event plane ---------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        period = self.config.heartbeat_interval_ms / 1000
        # Silent this long, the router has declared us dead and moved our streams elsewhere.
        presumed_dead = max(1.0, 10 * period)
        last = time.monotonic()
        while True:
            self.publish_status()
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - last > presumed_dead and not self.draining:
                await self.rejoin(now - last)
            last = now

    async def rejoin(self, silent_s: float) -> None:
        """Back from a freeze (SIGSTOP, a wedged host): our requests were migrated, so drop
        them, and re-register as a new incarnation; routers re-admit us and resync."""
        log.warning("resumed after a freeze; dropping stale requests and re-registering",
                    extra={"fields": {"silent_s": round(silent_s, 2),
                                      "requests": len(self.destinations)}})
        for request_id in list(self.destinations):
            self.engine.abort(request_id)
            self.metrics.on_finish("abandoned")
        self.destinations.clear()
        self.started = time.time()
        await self.discovery.update(self.instance())

    def publish_status(self) -> None:
        load = self.engine.load()
        self.metrics.on_load(load)
        self.publisher.publish(TOPIC_HEARTBEAT, Heartbeat(
            self.worker_id, self.engine.steps_done(), len(self.destinations), self.draining))
        self.publisher.publish(TOPIC_LOAD, LoadReport(
            self.worker_id, load.active_decode_blocks, load.active_prefill_tokens,
            load.kv_used_blocks, load.kv_total_blocks, load.waiting, load.running))
        if self._fpm:
            records, self._fpm = self._fpm, []
            self.publisher.publish(TOPIC_FPM, ForwardPassBatch(self.worker_id, records))

    # -- lifecycle -----------------------------------------------------------------------------

    def instance(self) -> Instance:
        host = self.config.advertise_host or self.config.host
        return Instance(
            id=self.worker_id, role=ROLE_WORKER, model=self.model,
            endpoints={"request": self.request_endpoint, "events": self.publisher.endpoint,
                       "metrics": f"http://{host}:{self.metrics_port}/metrics"},
            metadata={"mode": self.config.worker_mode or MODE_AGGREGATED,
                      "engine": self.config.engine, "block_size": self.engine.block_size,
                      "max_model_len": self.engine.max_model_len, "pid": os.getpid(),
                      "started": self.started},
        )

    async def run(self) -> None:
        cfg = self.config
        self.requests = self.ctx.socket(zmq.ROUTER)
        tune_stream_socket(self.requests)
        self.request_endpoint = bind_socket(self.requests, cfg.host, cfg.worker_port,
                                            cfg.advertise_host)
        self.publisher = EventPublisher(self.ctx, self.worker_id, cfg.host, cfg.worker_event_port,
                                        cfg.advertise_host)
        status = StatusServer(self.metrics.registry, cfg.host, cfg.worker_metrics_port,
                              health=lambda: not self.draining)
        self.metrics_port = await status.start()
        await self.engine.start(self.on_step)
        self.discovery = discovery = open_discovery(cfg.discovery, lease_ttl=cfg.lease_ttl_s)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        tasks = [asyncio.create_task(self.serve_requests()),
                 asyncio.create_task(self.heartbeat())]
        await discovery.register(self.instance())
        log.info("worker ready", extra={"fields": {"id": self.worker_id,
                                                   "request": self.request_endpoint}})
        await self._stop.wait()
        await self.drain(discovery)
        for task in tasks:
            task.cancel()
        await discovery.close()
        await status.close()
        await self.engine.shutdown()
        self.publisher.close()
        self.requests.close(linger=0)
        self.ctx.term()

    async def drain(self, discovery: Discovery) -> None:
        """Leave discovery, refuse new work, give running streams the grace period."""
        self.draining = True
        await discovery.unregister(self.worker_id)
        self.publish_status()
        if self.destinations:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.drain_grace_s)
            except TimeoutError:
                pass
        if self.destinations:
            log.warning("drain grace period over; exiting with streams still running",
                        extra={"fields": {"streams": len(self.destinations)}})


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    classes = [WorkerConfig, *engine_config_classes()]
    config, *engine_configs = parse_configs(classes, argv, prog="turnout worker")
    setup_logging("worker", config.log_level)
    engine = create_engine(config, engine_configs)
    import uvloop

    uvloop.run(Worker(config, engine).run())
