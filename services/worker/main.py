"""The worker process: one engine behind the request plane, its events, heartbeats and metrics.

Reads top-down: parse config, build the engine, bind the request (ROUTER) and event (PUB)
sockets, start the engine, register in discovery, then serve until SIGTERM/SIGINT, when it
drains: it leaves discovery, refuses new work, lets running streams finish (and decode
workers pull the prompt KV it holds for them) within the grace period and exits (the router
migrates whatever is still running).

Owns routing replies to the right upstream peer and the heartbeat/load cadence, and the worker's
side of disaggregated serving: a prefill phase's KV is held under a lease (`kv_leases.py`) until
the decode worker releases it or the lease expires; a decode phase pulls the prompt blocks it
lacks from the prefill worker and is admitted without recomputing them (or, when no source
delivers them, recomputes). Does not own scheduling (the engine) or routing decisions (the
router).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import msgspec
import zmq

from common.block_hash import block_hashes
from common.discovery import Discovery, open_discovery
from common.event_plane import EventPublisher
from common.malformed import MALFORMED, MalformedFrames
from common.messages import (
    FINISH_ERROR,
    FINISH_LENGTH,
    KIND_CANCEL,
    KIND_ENCODE,
    KIND_GENERATE,
    KIND_KV_BLOCKS,
    KIND_KV_DUMP,
    KIND_KV_PULL,
    KIND_KV_RELEASE,
    KIND_KV_REPLICATE,
    KIND_PING,
    KIND_TOKENS,
    MODE_AGGREGATED,
    MODE_ENCODE,
    PHASE_DECODE,
    PHASE_PREFILL,
    ROLE_WORKER,
    SCHEDULING_PRIORITY,
    TOPIC_FPM,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    TOPIC_LOAD,
    ForwardPass,
    ForwardPassBatch,
    GenerateRequest,
    Heartbeat,
    Instance,
    KvBlockStored,
    KvEventBatch,
    KvPullReply,
    LoadReport,
    TokenBatch,
    TokenChunk,
    cancel_decoder,
    encode_request_decoder,
    encoder,
    generate_decoder,
    kv_batch_decoder,
    kv_pull_decoder,
    kv_release_decoder,
)
from common.router_socket import RouterSocket
from common.service import Service, run_service
from common.status_server import StatusServer
from common.transport import (
    destroy_context,
    identity_metadata,
    secure_context,
)
from services.worker.args import DEFAULT_EMBEDDING_CACHE_MB, WorkerConfig
from services.worker.engine import Engine, EngineError, StepOutput
from services.worker.engines import create_engine, engine_config_classes
from services.worker.host_kv_tier import HostKvTier
from services.worker.image_encoder import ImageEncoder
from services.worker.kv_leases import KvLeases
from services.worker.metrics import WorkerMetrics
from services.worker.peer_links import PeerLinks
from services.worker.router_watch import RouterWatch

log = logging.getLogger("turnout.worker")


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.service = Service(ROLE_WORKER, config.worker_id)
        self.worker_id = self.service.id
        self.model = config.model_name()
        self.ctx = zmq.Context()
        # Bound in run(); read once the engine runs (earlier messages wait).
        self.requests = RouterSocket(self.ctx, self.on_request)
        self.metrics = WorkerMetrics(self.worker_id, self.model)
        engine.metrics = self.metrics.engine_metrics  # it declares its own series in `start`
        # request id → ROUTER identity of the upstream peer that sent it
        self.destinations: dict[str, bytes] = {}
        self.draining = False
        self.ready = False  # engine started and registered: what readiness probes ask
        self._fpm: list[ForwardPass] = []
        self._idle = asyncio.Event()  # set when draining and no stream or held KV is left
        self.malformed = MalformedFrames("request frame", self.metrics.malformed.inc, log)
        self.started = time.time()  # incarnation stamp: a restarted process has a new one
        self.metrics_port = 0
        self.host_tier = HostKvTier(config.host_kv_blocks)
        self.peers = PeerLinks(self.ctx, self.worker_id)
        self.replica_peers: list[str] = []
        self._resuming: set[asyncio.Task[None]] = set()
        self.leases = KvLeases()
        self._lease_s: dict[str, float] = {}  # prefill phases running here → their lease
        # Prefill phases whose KV is held → the router handing them off, and their last chunk.
        self._prefilled: dict[str, tuple[bytes, TokenChunk]] = {}
        # Decode phases running here → the workers holding their prefill KV, told to free it
        # once the engine has it (the first chunk) or the request ends.
        self._release_to: dict[str, list[str]] = {}
        period = config.heartbeat_interval_ms / 1000
        self.routers = RouterWatch(max(1.0, 10 * period))
        self.image_encoder = ImageEncoder(
            engine, int(config.embedding_cache_mb * 1024 * 1024), self.metrics,
            lambda ident, kind, payload: self.requests.send_multipart([ident, kind, payload]),
        ) if config.worker_mode == MODE_ENCODE else None

    # -- engine output -------------------------------------------------------------------------

    def on_step(self, out: StepOutput) -> None:
        """Called by the engine once per step: events, one frame per destination, metrics."""
        if out.kv_events:
            # Before the tokens: a client that got its answer and sends the next turn at once
            # must find the routers knowing the blocks this step stored (the two travel on
            # different connections; sent after, the next turn could be routed without them).
            self.publisher.publish(TOPIC_KV, KvEventBatch(self.worker_id, out.kv_events))
        if out.chunks:
            by_dest: dict[bytes, list[TokenChunk]] = {}
            destinations = self.destinations
            on_chunk = self.routers.on_chunk
            for chunk in out.chunks:
                if self._release_to:
                    self._release(chunk.request_id)
                if chunk.finish_reason is None:
                    on_chunk(chunk)
                    ident = destinations.get(chunk.request_id)
                else:
                    ident = destinations.pop(chunk.request_id, None)
                    prefill = chunk.request_id in self._lease_s
                    if prefill:
                        self._prefill_done(chunk, ident)
                    self.routers.finished(chunk, ident, replayable=not prefill)
                    self.metrics.on_finish(chunk.finish_reason)
                    if self.draining and not destinations:
                        self._settle()
                if ident is None:
                    continue
                if chunk.num_prompt_tokens:
                    self.metrics.on_prompt(chunk.num_prompt_tokens, chunk.cached_tokens)
                batch = by_dest.get(ident)
                if batch is None:
                    by_dest[ident] = [chunk]
                else:
                    batch.append(chunk)
            for ident, chunks in by_dest.items():
                self._send(ident, TokenBatch(chunks))
        if out.kv_events and self.config.kv_replicas:
            self.peers.replicate([e for e in out.kv_events if type(e) is KvBlockStored])
        if out.forward_pass is not None:
            self._fpm.append(out.forward_pass)
        self.metrics.on_step(out)

    def _prefill_done(self, chunk: TokenChunk, router: bytes | None) -> None:
        """A prefill phase ended: hold its KV for the decode side, or free it at once when
        the request ended here (its first token stopped it, or it failed)."""
        seconds = self._lease_s.pop(chunk.request_id, None)
        if seconds is None:
            return
        if chunk.finish_reason == FINISH_LENGTH and not chunk.error_code:
            self.leases.hold(chunk.request_id, seconds)
            self.metrics.kv_leases.set(len(self.leases))
            if router is not None:
                self._prefilled[chunk.request_id] = (router, chunk)
        else:
            self.engine.release_held(chunk.request_id)

    def _replay(self, ident: bytes, request: GenerateRequest) -> TokenChunk | None:
        """The chunk that ends `request`, a resume of a stream whose router was lost, when it
        ended here already: a prefill phase whose KV is still held (its first token again, and
        the hold is the new router's to hand off), or a stream that ended while its router was
        not listening (`RouterWatch.replay`). None: it runs."""
        if request.phase != PHASE_PREFILL:
            return self.routers.replay(request)
        rid = request.request_id
        prefilled = self._prefilled.get(rid)
        # Not with an engine's own transfer handle (vLLM's NIXL): its side may time it out.
        if prefilled is None or rid not in self.leases or request.generated_token_ids \
                or prefilled[1].kv_transfer_params:
            return None
        self._prefilled[rid] = (ident, prefilled[1])
        self.leases.hold(rid, (request.lease_ms or self.config.kv_lease_ms) / 1000)
        return msgspec.structs.replace(prefilled[1], run=request.run)

    def _release(self, request_id: str) -> None:
        """A decode phase has its KV (or is over): the prefill side may free it."""
        sources = self._release_to.pop(request_id, None)
        if sources:
            self.peers.release(sources, request_id)

    def expire_leases(self, now: float | None = None) -> None:
        for request_id in self.leases.expired(now):
            self._prefilled.pop(request_id, None)
            self.engine.release_held(request_id)
            self.metrics.lease_ends.labels(**self.metrics.labels, end="expired").inc()
        self.metrics.kv_leases.set(len(self.leases))
        self._settle()

    def _end_lease(self, request_id: str, end: str) -> None:
        self._prefilled.pop(request_id, None)
        if self.leases.release(request_id):
            self.engine.release_held(request_id)
            self.metrics.lease_ends.labels(**self.metrics.labels, end=end).inc()
            self.metrics.kv_leases.set(len(self.leases))
            self._settle()

    def _settle(self) -> None:
        """A drain is over once no stream runs here and no decode worker still needs KV a
        finished prefill holds for it (exiting earlier makes it recompute the prompt)."""
        if self.draining and not self.destinations and not len(self.leases):
            self._idle.set()

    def _send(self, ident: bytes, batch: TokenBatch) -> None:
        try:
            self.requests.send_multipart([ident, KIND_TOKENS, encoder.encode(batch)])
        except zmq.ZMQError as exc:  # peer gone: its requests get cancelled by the router
            log.warning("reply dropped", extra={"fields": {"error": str(exc)}})

    def _error(self, ident: bytes, request_id: str, code: int, message: str) -> None:
        self._send(ident, TokenBatch([TokenChunk(request_id, [], FINISH_ERROR, error_code=code,
                                                 error_message=message)]))

    # -- request plane -------------------------------------------------------------------------

    def on_request(self, frames: list[bytes]) -> None:
        """One message from an upstream peer (router, or a peer worker's KV traffic)."""
        if len(frames) != 3:
            self.malformed.drop(f"{len(frames)} frames")
            return
        ident, kind, payload = frames
        if kind == KIND_PING:
            self.routers.on_ping(ident)
            return
        self.routers.on_frame(ident)
        try:
            if kind == KIND_GENERATE:
                self._on_generate(ident, payload)
            elif kind == KIND_ENCODE:
                self._on_encode(ident, payload)
            elif kind == KIND_CANCEL:
                request_id = cancel_decoder.decode(payload).request_id
                if self.image_encoder is not None:
                    self.image_encoder.cancel(request_id)
                prefilled = self._prefilled.get(request_id)
                if prefilled is None or prefilled[0] == ident:  # not a lost router's, late
                    self._end_lease(request_id, "cancelled")  # the router gave up the hand-off
                if self.destinations.get(request_id) == ident:  # not another router's
                    self._abort(request_id)
            elif kind == KIND_KV_RELEASE:
                self._end_lease(kv_release_decoder.decode(payload).request_id, "released")
            elif kind == KIND_KV_DUMP:
                self.publisher.publish(
                    TOPIC_KV, KvEventBatch(self.worker_id, list(self.engine.kv_dump()), True))
            elif kind == KIND_KV_REPLICATE:
                batch = kv_batch_decoder.decode(payload)
                self.host_tier.put([e for e in batch.events if type(e) is KvBlockStored])
            elif kind == KIND_KV_PULL:
                pull = kv_pull_decoder.decode(payload)
                blocks = self.engine.export_blocks(pull.block_hashes)
                if len(blocks) < len(pull.block_hashes):
                    have = {b.block_hashes[0] for b in blocks}
                    blocks += self.host_tier.get(
                        [h for h in pull.block_hashes if h not in have])
                self.requests.send_multipart([ident, KIND_KV_BLOCKS, encoder.encode(
                    KvPullReply(pull.request_id, blocks))])
            else:
                self.malformed.drop(f"unknown kind {kind!r}")
        except MALFORMED as exc:
            self.malformed.drop(str(exc))

    def _on_encode(self, ident: bytes, payload: bytes) -> None:
        request = encode_request_decoder.decode(payload)
        if self.image_encoder is None:
            self._error(ident, request.request_id, 400, "this worker is not an encode worker")
        else:
            self.image_encoder.on_encode(ident, request)

    def _on_generate(self, ident: bytes, payload: bytes) -> None:
        request = generate_decoder.decode(payload)
        if self.image_encoder is not None:
            self._error(ident, request.request_id, 400, "an encode worker does not generate")
            return
        if request.resumed and request.request_id not in self.destinations:
            # It may have ended here already: no rerun then (even draining: nothing runs).
            replay = self._replay(ident, request)
            if replay is not None:
                self.metrics.replays.inc()
                self._send(ident, TokenBatch([replay]))
                return
        if self.draining:
            self._error(ident, request.request_id, 503, "worker is draining")
            return
        owner = self.destinations.get(request.request_id)
        if owner == ident:
            self._error(ident, request.request_id, 400, "duplicate request id")
            return
        if owner is not None:
            # Resumed through another router while still running here: hand it over.
            handed = self.routers.handover(request)
            if handed is not None:
                self.destinations[request.request_id] = ident
                self.metrics.handovers.inc()
                if handed.token_ids:
                    self._send(ident, TokenBatch([handed]))
                return
            self.engine.abort(request.request_id)
        self.destinations[request.request_id] = ident
        if request.phase == PHASE_PREFILL:
            lease_ms = request.lease_ms or self.config.kv_lease_ms
            self._lease_s[request.request_id] = lease_ms / 1000
        elif request.phase == PHASE_DECODE:
            self._release_to[request.request_id] = list(request.kv_sources)
        self.routers.admitted(request)
        if request.generated_token_ids or request.kv_sources:
            task = asyncio.create_task(self._resume(ident, request))
            self._resuming.add(task)
            task.add_done_callback(self._resuming.discard)
            return
        self._admit(ident, request)

    def _abort(self, request_id: str, outcome: str = "cancelled") -> None:
        self.destinations.pop(request_id, None)
        self.routers.forget(request_id)
        self._lease_s.pop(request_id, None)
        self._release(request_id)
        self.engine.abort(request_id)
        self.metrics.on_finish(outcome)
        self._settle()

    def cancel_lost_routers(self, on_time: bool, since_s: float = 0.0,
                            now: float | None = None) -> None:
        """Requests of a router that stopped pinging stop here (it may only have been slow: it
        gets an error frame for each, and migrates them), its silence judged as of `now` (when
        the check woke: a pause since must not age it). Not on time: this worker did not run
        for `since_s`, and judges nobody."""
        if not on_time:
            self.routers.pause(since_s)
            return
        for ident in self.routers.lost(now):
            ids = [r for r, i in self.destinations.items() if i == ident]
            self.metrics.routers_lost.inc()
            log.warning("router stopped pinging; cancelling its requests",
                        extra={"fields": {"requests": len(ids)}})
            for request_id in ids:
                self._abort(request_id, "orphaned")
                self._error(ident, request_id, 503, "the worker lost this router")

    def _admit(self, ident: bytes, request: GenerateRequest) -> None:
        try:
            if (request.priority and request.target_worker
                    and self.engine.scheduling_policy != SCHEDULING_PRIORITY):
                # Sent here by name: it would run first come, first served, its priority
                # ignored. (The router places others only where priority counts, but lets a
                # migrating stream go on anywhere.)
                raise EngineError(f"priority {request.priority}: worker {self.worker_id} "
                                  f"schedules first come, first served (start it with "
                                  f"--scheduling-policy priority)")
            if (request.sampling.structured is not None
                    and not self.engine.applies_structured_outputs):
                # Never run unconstrained: this refusal covers every engine that cannot apply
                # them, whichever way the request came (named, migrated, handed off).
                raise EngineError(f"structured outputs (response_format, structured_outputs): "
                                  f"worker {self.worker_id}'s engine does not apply them (the "
                                  f"vllm engine does)")
            self.engine.add_request(request)
        except EngineError as exc:
            self.destinations.pop(request.request_id, None)
            self._lease_s.pop(request.request_id, None)
            self._release(request.request_id)
            self.routers.forget(request.request_id)
            self.metrics.on_finish("rejected")
            self._error(ident, request.request_id, exc.code, str(exc))

    async def _resume(self, ident: bytes, request: GenerateRequest) -> None:
        """A request migrated here: bring in the KV that survived (our host tier first, then
        the named sources), wait the transfer time, then admit it; only the rest is
        recomputed."""
        if request.phase == PHASE_DECODE:
            await self._receive_prefill(ident, request)
            return
        engine = self.engine
        tokens = request.token_ids + request.generated_token_ids
        hashes = block_hashes(tokens, engine.block_size, engine.hash_seed,
                              salt=request.cache_salt)
        local = engine.cached_prefix(hashes)
        missing = hashes[local:]
        blocks = self.host_tier.chain(missing)
        promoted = len(blocks)
        if len(blocks) < len(missing) and request.kv_sources:
            blocks += await self.peers.pull(request.request_id, request.kv_sources,
                                            missing[len(blocks):])
        self.metrics.resumes.inc()
        if promoted:
            self.metrics.blocks_promoted.inc(promoted)
        if len(blocks) > promoted:
            self.metrics.blocks_pulled.inc(len(blocks) - promoted)
        if request.request_id not in self.destinations:
            return  # cancelled meanwhile
        seconds = engine.import_blocks(blocks, local) if blocks else 0.0
        if seconds > 0:
            await asyncio.sleep(seconds)
            if request.request_id not in self.destinations:
                return
        self._admit(ident, request)

    async def _receive_prefill(self, ident: bytes, request: GenerateRequest) -> None:
        """A decode phase: bring over the prompt blocks this engine lacks from the prefill
        worker (`kv_sources[0]`, then any other holder), wait the transfer time, admit it as a
        decode. An engine moving KV itself (`kv_transfer_params` set) gets it as it is. When
        the prompt's KV cannot be had (its prefill worker died, a pull timed out) the phase is
        dropped and the engine recomputes what it lacks: the stream goes on all the same."""
        rid = request.request_id
        engine = self.engine
        m = self.metrics
        t0 = time.monotonic()
        if request.kv_transfer_params:
            self._admit(ident, request)
            m.transfers.labels(**m.labels, outcome="engine").inc()
            return
        bs = engine.block_size
        prompt = request.token_ids
        hashes = block_hashes(prompt, bs, engine.hash_seed, salt=request.cache_salt)
        local = engine.cached_prefix(hashes)
        missing = hashes[local:]
        blocks = self.host_tier.chain(missing)
        answered: set[str] = set()
        if request.kv_sources:
            blocks += await self.peers.pull(rid, request.kv_sources, missing[len(blocks):],
                                            self.config.kv_pull_timeout_ms / 1000, answered)
        tail = len(prompt) % bs  # the partial last block only its prefill worker holds
        complete = local + len(blocks) == len(hashes) and (
            not tail or (bool(request.kv_sources) and request.kv_sources[0] in answered))
        m.disagg_blocks_cached.inc(local)
        if blocks:
            m.blocks_pulled.inc(len(blocks))
        if rid not in self.destinations:
            self._release(rid)
            return  # cancelled meanwhile
        seconds = engine.import_blocks(blocks, local) if blocks else 0.0
        if complete:
            seconds += engine.kv_transfer_seconds(tail)
        else:
            request.phase = ""  # recompute what no copy delivered
        if seconds > 0:
            await asyncio.sleep(seconds)
            if rid not in self.destinations:
                self._release(rid)
                return
        m.transfer_seconds.observe(time.monotonic() - t0)
        m.transfers.labels(**m.labels, outcome="pulled" if complete else "recomputed").inc()
        self._admit(ident, request)

    # -- event plane ---------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        period = self.config.heartbeat_interval_ms / 1000
        last = time.monotonic()
        lag = 0.0
        while True:
            self.publish_status(lag)
            await asyncio.sleep(period)
            # Judged as of when it woke, after any pause is forgiven: a SIGSTOP that lands
            # later in this tick must not age a lease or a silence.
            now = time.monotonic()
            lag = max(0.0, now - last - period)
            if lag >= period:
                self.resumed(lag)
            self.cancel_lost_routers(lag < period, now - last, now)
            if len(self.leases):
                self.expire_leases(now)
            last = now

    def resumed(self, paused_s: float) -> None:
        """This process did not run for `paused_s` (starved, SIGSTOP, a paused machine). Its
        requests stay: a router that judged it hung meanwhile moved them and sent a cancel for
        each, which arrives now; one that did not run either (a whole machine paused) still
        counts them here, and moving them would cost a recompute for nothing. Nor does the
        pause count against the KV leases of finished prefills: their decode workers most
        likely did not run either."""
        self.leases.extend(paused_s)
        if paused_s > 1.0:
            log.warning("resumed after a pause; requests a router moved meanwhile get cancelled",
                        extra={"fields": {"paused_s": round(paused_s, 2),
                                          "requests": len(self.destinations),
                                          "kv_leases": len(self.leases)}})

    def publish_status(self, loop_lag_s: float = 0.0) -> None:
        load = self.engine.load()
        self.metrics.on_load(load)
        self.publisher.publish(TOPIC_HEARTBEAT, Heartbeat(
            self.worker_id, self.engine.steps_done(), len(self.destinations), self.draining,
            self.replica_peers, loop_lag_s))
        m = self.metrics
        m.on_heartbeat(loop_lag_s, self.engine.time_debt_s(), self.engine.time_dropped_s())
        m.replicated_blocks.set(self.peers.replicated_blocks)
        m.replication_dropped.set(self.peers.dropped_blocks)
        m.replication_lag.set(self.peers.lag_blocks)
        m.host_tier_blocks.set(len(self.host_tier))
        self.publisher.publish(TOPIC_LOAD, LoadReport(
            self.worker_id, load.active_decode_blocks, load.active_prefill_tokens,
            load.kv_used_blocks, load.kv_total_blocks, load.waiting, load.running))
        if self._fpm:
            records, self._fpm = self._fpm, []
            self.publisher.publish(TOPIC_FPM, ForwardPassBatch(self.worker_id, records))

    async def watch_peers(self) -> None:
        """Pick replica peers: the next `kv_replicas` workers of our model on a ring of ids."""
        peers: dict[str, Instance] = {}
        async for event in self.discovery.watch(role=ROLE_WORKER):
            inst = event.instance
            if event.kind == "removed" or inst.model != self.model:
                peers.pop(inst.id, None)
            elif inst.id != self.worker_id and "request" in inst.endpoints:
                peers[inst.id] = inst
            ring = sorted(peers)
            after = [p for p in ring if p > self.worker_id] + [p for p in ring
                                                              if p < self.worker_id]
            chosen = after[: self.config.kv_replicas]
            if chosen != self.replica_peers:
                self.replica_peers = chosen
                self.peers.set_replicas([peers[p].endpoints["request"] for p in chosen])
                log.info("replica peers", extra={"fields": {"peers": ",".join(chosen)}})

    # -- lifecycle -----------------------------------------------------------------------------

    def instance(self) -> Instance:
        host = self.config.advertise_host or self.config.host
        return Instance(
            id=self.worker_id, role=ROLE_WORKER, model=self.model,
            endpoints={"request": self.request_endpoint, "events": self.publisher.endpoint,
                       "metrics": f"http://{host}:{self.metrics_port}/metrics"},
            metadata={"mode": self.config.worker_mode or MODE_AGGREGATED, "chunk_runs": True,
                      "engine": self.config.engine, "block_size": self.engine.block_size,
                      "max_model_len": self.engine.max_model_len, "pid": os.getpid(),
                      "scheduling": self.engine.scheduling_policy,
                      "structured_outputs": self.engine.applies_structured_outputs,
                      "started": self.started, **self.engine.discovery_metadata(),
                      **identity_metadata(self.ctx)},
        )

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or a loop fails), then drain and shut down: each
        step's undoing is registered as it is done, and runs in reverse order."""
        cfg = self.config
        async with self.service as service:
            # Handlers first: a SIGTERM during a long engine load (vLLM: tens of seconds) must
            # still shut the engine down cleanly rather than kill the process outright.
            service.install_signal_handlers()
            service.on_shutdown("zmq context", lambda: destroy_context(self.ctx))
            secure_context(self.ctx, cfg.keys_dir)
            # Reading stops earlier, when the "requests" loop is cancelled; replies the engine
            # makes while it shuts down still go out until here.
            service.on_shutdown("request socket", self.requests.close)
            self.request_endpoint = await self.requests.bind(cfg.host, cfg.worker_port,
                                                             cfg.advertise_host)
            service.on_shutdown("peer links", self.peers.close)
            self.publisher = EventPublisher(self.ctx, self.worker_id, cfg.host,
                                            cfg.worker_event_port, cfg.advertise_host)
            service.on_shutdown("event publisher", self.publisher.close)
            service.on_shutdown("engine", self.engine.shutdown)
            status = StatusServer(self.metrics.registry, cfg.host, cfg.worker_metrics_port,
                                  health=lambda: self.ready and not self.draining)
            self.metrics_port = await status.start()
            service.on_shutdown("status server", status.close)
            await self.engine.start(self.on_step)
            if service.stopping:
                return  # stopped while the engine loaded: nothing was announced yet
            self.discovery: Discovery = open_discovery(cfg.discovery, lease_ttl=cfg.lease_ttl_s)
            service.on_shutdown("discovery", self.discovery.close)
            # Read from here on: the engine runs and the planes are up (messages that came
            # earlier wait in the socket).
            service.spawn("requests", self.requests.run())
            service.spawn("heartbeat", self.heartbeat())
            if cfg.kv_replicas > 0:
                service.spawn("replica peers", self.watch_peers())
                service.spawn("replication", self.peers.run_replication())
            service.on_shutdown("drain", self.drain)
            await self.discovery.register(self.instance())
            self.ready = True
            log.info("worker ready", extra={"fields": {"id": self.worker_id,
                                                       "request": self.request_endpoint}})
            await service.run()

    async def drain(self) -> None:
        """Leave discovery, refuse new work, give running streams and the KV held for decode
        workers (answering their pulls) the grace period."""
        self.draining = True
        await self.discovery.unregister(self.worker_id)
        self.publish_status()
        self._settle()
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_grace_s)
        except TimeoutError:
            log.warning("drain grace period over; exiting with work left",
                        extra={"fields": {"streams": len(self.destinations),
                                          "kv_leases": len(self.leases)}})


def main(argv: Sequence[str] | None = None) -> None:
    run_service(ROLE_WORKER, [WorkerConfig, *engine_config_classes()], _start, argv)


def _start(config: WorkerConfig, *engine_configs: Any) -> Coroutine[Any, Any, None]:
    if config.worker_mode != MODE_ENCODE \
            and config.embedding_cache_mb != DEFAULT_EMBEDDING_CACHE_MB:
        print("turnout worker: --embedding-cache-mb needs --worker-mode encode", file=sys.stderr)
        raise SystemExit(2)
    return Worker(config, create_engine(config, list(engine_configs))).run()
