"""The router process: picks a worker for every request, relays token streams, survives failures.

Reads top-down: parse config, bind the frontend-facing ROUTER socket, watch discovery for
workers (one DEALER and one event subscription each), then run the relay loops. A worker is
declared dead at once when its connection drops, or after `missed_heartbeats` silent periods;
its in-flight requests continue on another worker from the next token (prompt and every
streamed token are resent, so the client's stream goes on unbroken).

Owns worker selection, the in-flight table and failure handling. Does not own HTTP or
tokenization (frontend) or scheduling (workers).
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
from zmq.utils.monitor import parse_monitor_message

from common.block_hash import block_hashes
from common.config import parse_configs
from common.discovery import open_discovery
from common.event_plane import EventSubscriber
from common.logs import setup_logging
from common.messages import (
    FINISH_ERROR,
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_KV_DUMP,
    KIND_TOKENS,
    ROLE_ROUTER,
    ROLE_WORKER,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    TOPIC_LOAD,
    Cancel,
    GenerateRequest,
    Instance,
    KvDumpRequest,
    SamplingParams,
    TokenBatch,
    TokenChunk,
    cancel_decoder,
    encoder,
    generate_decoder,
    heartbeat_decoder,
    kv_batch_decoder,
    load_decoder,
    token_batch_decoder,
)
from common.status_server import Response, StatusServer, json_response
from common.transport import bind_socket, tune_stream_socket
from services.router.approx_kv_index import ApproxKvIndex
from services.router.args import RouterConfig
from services.router.inflight import InflightRequest, InflightTable
from services.router.kv_index import KvIndex
from services.router.kv_policy import Decision, KvAwarePolicy, request_blocks, sequence_tokens
from services.router.metrics import RouterMetrics
from services.router.policies import (
    NoWorkerError,
    Policy,
    RoundRobin,
    RoutingError,
    make_policy,
    select_target,
)
from services.router.worker_pool import WorkerHandle, WorkerPool

log = logging.getLogger("turnout.router")

CAUSE_CRASH = "crash"
CAUSE_HANG = "hang"
CAUSE_STALL = "stall"
CAUSE_DRAIN = "drain"


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.router_id = config.router_id or f"router-{os.getpid()}-{secrets.token_hex(3)}"
        self.ctx = zmq.asyncio.Context()
        self.pool = WorkerPool(self.ctx)
        self.inflight = InflightTable()
        self.metrics = RouterMetrics(self.router_id)
        topics = [TOPIC_HEARTBEAT, TOPIC_LOAD]
        self.kv_index: KvIndex | None = None
        self.approx_index: ApproxKvIndex | None = None
        self.kv_policy: KvAwarePolicy | None = None
        self.policy: Policy = RoundRobin()
        if config.router_mode == "kv":
            if config.kv_events:
                self.kv_index = KvIndex()
                topics.append(TOPIC_KV)
            else:
                self.approx_index = ApproxKvIndex(ttl_s=config.kv_ttl_s)
            self.kv_policy = KvAwarePolicy(
                self.kv_index or self.approx_index,  # type: ignore[arg-type]
                overlap_weight=config.kv_overlap_weight, temperature=config.router_temperature,
                hotspot_margin=config.hotspot_margin, seed=config.hash_seed)
        else:
            self.policy = make_policy(config.router_mode)
        self.subscriber = EventSubscriber(
            self.ctx, topics, on_gap=self.on_event_gap,
            on_malformed=self.metrics.malformed.labels("event").inc)
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        # Requests waiting for a worker of their model: id → (deadline, frontend, request, frame)
        self.parked: dict[str, tuple[float, bytes, GenerateRequest, bytes]] = {}
        self._replicas_of: dict[str, list[str]] = {}  # dead worker → its replica peers
        # Migrating requests that found no worker: id → (deadline, cause, counts as a move)
        self.stranded: dict[str, tuple[float, str, bool]] = {}
        self._warned_malformed = False
        self._listed: set[str] = set()  # worker ids with a discovery record (liveness gauge)

    # -- frontend side -------------------------------------------------------------------------

    async def serve_frontends(self) -> None:
        while True:
            frames = await self.frontends.recv_multipart()
            if len(frames) != 3:
                self._malformed("request", f"{len(frames)} frames")
                continue
            ident, kind, payload = frames
            try:
                if kind == KIND_GENERATE:
                    self.on_generate(ident, generate_decoder.decode(payload), payload)
                elif kind == KIND_CANCEL:
                    self.on_cancel(cancel_decoder.decode(payload).request_id)
                else:
                    self._malformed("request", f"unknown kind {kind!r}")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._malformed("request", str(exc))

    def on_generate(self, ident: bytes, request: GenerateRequest, payload: bytes) -> None:
        if request.request_id in self.inflight.requests:
            self._reply_error(ident, request.request_id, 400, "duplicate request id")
            return
        try:
            worker = self.select(request)
        except NoWorkerError:
            if self.config.no_worker_wait_ms > 0:
                # A worker may be starting (discovery lags by a poll): hold it briefly.
                deadline = time.monotonic() + self.config.no_worker_wait_ms / 1000
                self.parked[request.request_id] = (deadline, ident, request, payload)
                return
            self.metrics.requests.labels("rejected").inc()
            self._reply_error(ident, request.request_id, 503,
                              f"no live worker serves model {request.model!r}")
            return
        except RoutingError as exc:
            self.metrics.requests.labels("rejected").inc()
            self._reply_error(ident, request.request_id, exc.code, str(exc))
            return
        entry = InflightRequest(request, ident, worker.worker.id)
        self.inflight.add(entry)
        self.assign(entry, worker)
        self.metrics.inflight.set(len(self.inflight))
        worker.worker.socket.send_multipart([KIND_GENERATE, payload])

    def select(self, request: GenerateRequest, exclude: str = "",
               hint: dict[str, int] | None = None, dry_run: bool = False) -> Decision:
        """The worker for `request`. `dry_run`: a preview (POST /v1/route) that records no
        prediction and counts no decision."""
        candidates = self.pool.routable(request.model)
        if exclude:
            candidates = [w for w in candidates if w.id != exclude]
        if not candidates:
            raise NoWorkerError(f"no live worker serves model {request.model!r}", 503)
        t0 = time.perf_counter()
        if request.target_worker:
            worker = select_target(candidates, request)
            decision = Decision(worker, request_blocks(request, worker.block_size))
            policy = "direct"
            if self.approx_index is not None and not dry_run:
                # A gateway chose (maybe after a preview): the prefix gets cached there all
                # the same, and the prediction must say so.
                decision.hashes = block_hashes(sequence_tokens(request), worker.block_size,
                                               self.config.hash_seed)
                self.approx_index.record(worker.id, decision.hashes)
        elif self.kv_policy is not None:
            decision = self.kv_policy.decide(candidates, request, hint)
            policy = self.kv_policy.name
            if dry_run:
                return decision
            if self.approx_index is not None:
                self.approx_index.record(decision.worker.id, decision.hashes)
            if decision.request_blocks:
                self.metrics.overlap.observe(decision.overlap / decision.request_blocks)
        else:
            # A migration goes to a worker holding the request's KV when there is one.
            held = [w for w in candidates if hint and hint.get(w.id)]
            worker = self.policy.select(held or candidates, request)
            decision = Decision(worker, request_blocks(request, worker.block_size),
                                hint.get(worker.id, 0) if hint else 0)
            policy = self.policy.name
        if dry_run:
            return decision
        self.metrics.decision_seconds.observe(time.perf_counter() - t0)
        self.metrics.decisions.labels(policy).inc()
        return decision

    def route_query(self, body: bytes) -> Response:
        """POST /v1/route: which worker this router would pick for `{"model",
        "prompt_token_ids"}`, without sending anything (for a gateway's endpoint picker)."""
        try:
            query = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            return self._route_reply(400, "rejected", {"error": f"body is not JSON: {exc}"})
        model = query.get("model") if isinstance(query, dict) else None
        ids = query.get("prompt_token_ids") if isinstance(query, dict) else None
        if not isinstance(model, str) or not model:
            return self._route_reply(400, "rejected", {"error": "'model' must be a non-empty "
                                                                "string"})
        if not isinstance(ids, list) or not ids or not all(
                type(t) is int and 0 <= t < 1 << 32 for t in ids):
            return self._route_reply(400, "rejected", {
                "error": "'prompt_token_ids' must be a non-empty list of token ids (ints)"})
        request = GenerateRequest("route-query", model, ids, SamplingParams(max_tokens=1))
        try:
            decision = self.select(request, dry_run=True)
        except RoutingError as exc:
            outcome = "no_worker" if isinstance(exc, NoWorkerError) else "rejected"
            return self._route_reply(exc.code, outcome, {"error": str(exc)})
        worker = decision.worker
        request_ep = worker.instance.endpoints.get("request", "")
        return self._route_reply(200, "ok", {
            "worker_id": worker.id,
            "endpoint": request_ep.split("://", 1)[-1],
            "endpoints": worker.instance.endpoints,
            "model": model,
            "policy": self.kv_policy.name if self.kv_policy is not None else self.policy.name,
            "request_blocks": decision.request_blocks,
            "overlap_blocks": decision.overlap,
            "cost": decision.cost,
            "candidates": len(self.pool.routable(model)),
        })

    def _route_reply(self, status: int, outcome: str, body: dict[str, object]) -> Response:
        self.metrics.route_queries.labels(outcome).inc()
        return json_response(status, msgspec.json.encode(body))

    def assign(self, entry: InflightRequest, decision: Decision) -> None:
        """Account `entry` on its new worker (load the kv policy weighs at once)."""
        worker = decision.worker
        entry.blocks = decision.request_blocks
        entry.prefill_blocks = decision.request_blocks - decision.overlap
        entry.hashes = decision.hashes
        worker.inflight += 1
        worker.active_blocks += entry.blocks
        worker.pending_prefill_blocks += entry.prefill_blocks

    def release(self, entry: InflightRequest) -> None:
        """Undo `assign` when the request finishes, is cancelled or leaves its worker."""
        worker = self.pool.workers.get(entry.worker_id)
        if worker is not None:
            worker.inflight -= 1
            worker.active_blocks -= entry.blocks
            worker.pending_prefill_blocks -= entry.prefill_blocks
            worker.released_at = time.monotonic()
        entry.prefill_blocks = 0

    def retry_parked(self, now: float) -> None:
        """Place requests that waited for a worker; fail those whose wait is over."""
        parked, self.parked = self.parked, {}
        for rid, (deadline, ident, request, payload) in parked.items():
            if now < deadline:
                self.on_generate(ident, request, payload)
                if rid in self.parked:  # still no worker: keep the original deadline
                    self.parked[rid] = (deadline, ident, request, payload)
            else:
                self.metrics.requests.labels("rejected").inc()
                self._reply_error(ident, rid, 503, f"no live worker serves model "
                                                   f"{request.model!r}")
        stranded, self.stranded = self.stranded, {}
        for rid, (deadline, cause, count) in stranded.items():
            entry = self.inflight.get(rid)
            if entry is not None:
                self.migrate(entry, cause, count, deadline)

    def on_cancel(self, request_id: str) -> None:
        if self.parked.pop(request_id, None) is not None:
            return
        self.stranded.pop(request_id, None)
        entry = self.inflight.remove(request_id)
        if entry is None:
            return
        self.metrics.requests.labels("cancelled").inc()
        self.metrics.inflight.set(len(self.inflight))
        self.release(entry)
        worker = self.pool.workers.get(entry.worker_id)
        if worker is not None:
            worker.socket.send_multipart([KIND_CANCEL, encoder.encode(Cancel(request_id))])

    def _reply_error(self, ident: bytes, request_id: str, code: int, message: str) -> None:
        chunk = TokenChunk(request_id, [], FINISH_ERROR, error_code=code, error_message=message)
        self.frontends.send_multipart([ident, KIND_TOKENS, encoder.encode(TokenBatch([chunk]))])

    # -- worker side ---------------------------------------------------------------------------

    async def relay(self, worker: WorkerHandle) -> None:
        """Token batches from one worker, regrouped per frontend: one frame per destination."""
        socket = worker.socket
        while True:
            frames = await socket.recv_multipart()
            if len(frames) != 2 or frames[0] != KIND_TOKENS:
                self._malformed("request", "bad frame from worker")
                continue
            try:
                batch = token_batch_decoder.decode(frames[1])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._malformed("request", str(exc))
                continue
            by_frontend: dict[bytes, list[TokenChunk]] = {}
            requests = self.inflight.requests
            for chunk in batch.chunks:
                entry = requests.get(chunk.request_id)
                if entry is None or entry.worker_id != worker.id:
                    continue  # cancelled, or a late chunk from before a migration
                if chunk.finish_reason is not None:
                    if chunk.error_code == 503:
                        # A draining worker refused it: place it elsewhere instead of failing.
                        if self.migrate(entry, CAUSE_DRAIN, count=False):
                            continue
                    self.release(entry)
                    self.inflight.remove(chunk.request_id)
                    self.metrics.requests.labels(
                        "error" if chunk.error_code else "finished").inc()
                elif entry.prefill_blocks and chunk.token_ids:
                    worker.pending_prefill_blocks -= entry.prefill_blocks
                    entry.prefill_blocks = 0
                if entry.migrations:
                    if entry.resume_tokens and chunk.num_prompt_tokens:
                        self.metrics.recomputed_tokens.observe(
                            max(0, entry.resume_tokens - chunk.cached_tokens))
                        entry.resume_tokens = 0
                    # The client already has prompt/cached figures from the first worker.
                    chunk.num_prompt_tokens = 0
                    chunk.cached_tokens = 0
                if chunk.token_ids:
                    entry.generated.extend(chunk.token_ids)
                out = by_frontend.get(entry.frontend)
                if out is None:
                    by_frontend[entry.frontend] = [chunk]
                else:
                    out.append(chunk)
            for ident, chunks in by_frontend.items():
                self.frontends.send_multipart(
                    [ident, KIND_TOKENS, encoder.encode(TokenBatch(chunks))])
            self.metrics.inflight.set(len(self.inflight))

    async def watch_connection(self, worker: WorkerHandle) -> None:
        """A dropped connection is a dead worker, long before any lease or heartbeat says so."""
        connected = False
        while True:
            event = parse_monitor_message(await worker.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_CONNECTED:
                connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED and connected:
                self.worker_lost(worker, CAUSE_DRAIN if worker.draining else CAUSE_CRASH)
                return

    def worker_lost(self, worker: WorkerHandle, cause: str) -> None:
        """Declare `worker` dead and move its requests. A dropped connection closes it for
        good; a silent or stalled worker whose connection is still open only becomes a
        suspect: it may be a false alarm (a starved host), so it is re-admitted after a resync
        if it shows life again, and is told to drop what was moved away meanwhile."""
        crashed = cause in (CAUSE_CRASH, CAUSE_DRAIN)
        if not worker.alive and not (crashed and worker.suspect is not None):
            return
        silent = time.monotonic() - worker.last_heartbeat
        if worker.alive:
            log.warning("worker declared dead", extra={"fields": {
                "worker": worker.id, "cause": cause, "silent_ms": round(silent * 1000),
                "inflight": self.inflight.count(worker.id)}})
            self.metrics.worker_deaths.labels(cause).inc()
            self.metrics.detection_seconds.observe(silent)
        self._replicas_of[worker.id] = list(worker.replica_peers)
        self._forget_kv(worker.id)
        moved = self.inflight.on_worker(worker.id)
        if crashed:
            self.pool.mark_dead(worker)
            self.subscriber.disconnect(worker.instance.endpoints.get("events", ""))
            self.subscriber.forget(worker.id)
            for task in self._tasks.pop(worker.id, []):
                if task is not asyncio.current_task():
                    task.cancel()
        else:
            self.pool.mark_suspect(worker)
            for entry in moved:  # if it wakes up, it must not keep computing these
                worker.socket.send_multipart(
                    [KIND_CANCEL, encoder.encode(Cancel(entry.request.request_id))])
        for entry in moved:
            self.migrate(entry, cause)
        self._update_worker_gauges()

    def worker_recovered(self, worker: WorkerHandle) -> None:
        log.warning("suspected worker is alive again; resyncing and re-admitting",
                    extra={"fields": {"worker": worker.id}})
        self.metrics.worker_recoveries.inc()
        self.pool.recover(worker)
        if self.kv_index is not None:
            worker.synced = True
            self.request_dump(worker)
        self._update_worker_gauges()
        if self.parked or self.stranded:
            self.retry_parked(time.monotonic())

    def migrate(self, entry: InflightRequest, cause: str, count: bool = True,
                deadline: float | None = None) -> bool:
        """Continue `entry` on another worker; past the limit the client gets a clear error.
        With no worker left it waits (up to `no_worker_wait_ms`) for one to come back."""
        rid = entry.request.request_id
        old = entry.worker_id
        if count and entry.migrations >= self.config.migration_limit:
            self._fail(entry, f"worker {old} failed ({cause}) and the migration limit "
                              f"({self.config.migration_limit}) is reached")
            return False
        request = GenerateRequest(rid, entry.request.model, entry.request.token_ids,
                                  entry.request.sampling, None, list(entry.generated))
        # Copies of its KV live on the old worker's replica peers and in prefix caches the
        # index knows: prefer those workers, and name them so the new one pulls what it lacks.
        holders = self._kv_holders(entry, old)
        try:
            decision = self.select(request, exclude=old, hint=holders)
        except NoWorkerError as exc:
            if deadline is None:
                deadline = time.monotonic() + self.config.no_worker_wait_ms / 1000
            if time.monotonic() >= deadline:
                self._fail(entry, f"worker {old} failed ({cause}); {exc}")
                return False
            # Stranded: hold the stream open until a worker is routable again.
            self.release(entry)
            self.inflight.move(entry, "")
            self.stranded[rid] = (deadline, cause, count)
            return True
        except RoutingError as exc:
            self._fail(entry, f"worker {old} failed ({cause}); {exc}")
            return False
        if count:
            entry.migrations += 1
            self.metrics.migrations.labels(cause).inc()
        request.kv_sources = [self.pool.workers[w].instance.endpoints["request"]
                              for w in holders if w != decision.worker.id]
        entry.resume_tokens = len(request.token_ids) + len(request.generated_token_ids)
        self.release(entry)
        self.inflight.move(entry, decision.worker.id)
        self.assign(entry, decision)
        decision.worker.socket.send_multipart([KIND_GENERATE, encoder.encode(request)])
        return True

    def _kv_holders(self, entry: InflightRequest, dead: str) -> dict[str, int]:
        """Live workers that may hold `entry`'s blocks → how many (replicas: all but the last)."""
        holders: dict[str, int] = {}
        old = self.pool.workers.get(dead)
        peers = old.replica_peers if old is not None else self._replicas_of.get(dead, [])
        for peer in peers:
            if peer in self.pool.workers and self.pool.workers[peer].alive:
                holders[peer] = max(0, entry.blocks - 1)
        if self.kv_index is not None and entry.hashes:
            for wid, n in self.kv_index.find_matches(entry.hashes).items():
                if wid != dead and wid in self.pool.workers:
                    holders[wid] = max(n, holders.get(wid, 0))
        return holders

    def _fail(self, entry: InflightRequest, message: str) -> None:
        self.release(entry)
        self.inflight.remove(entry.request.request_id)
        self.metrics.requests.labels("error").inc()
        self._reply_error(entry.frontend, entry.request.request_id, 503, message)

    # -- discovery and events ------------------------------------------------------------------

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
                    if not self.inflight.count(worker.id):
                        self._retire(worker)
            else:
                self._listed.add(instance.id)
                self._admit(instance)
                if self.parked or self.stranded:
                    self.retry_parked(time.monotonic())
            self._update_worker_gauges()

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
        events = instance.endpoints.get("events")
        if events:
            self.subscriber.connect(events)
        self._tasks[worker.id] = [asyncio.create_task(self.relay(worker)),
                                  asyncio.create_task(self.watch_connection(worker))]
        log.info("worker admitted", extra={"fields": {"worker": worker.id,
                                                      "model": worker.model}})

    def _retire(self, worker: WorkerHandle) -> None:
        for task in self._tasks.pop(worker.id, []):
            task.cancel()
        self.subscriber.disconnect(worker.instance.endpoints.get("events", ""))
        self.subscriber.forget(worker.id)
        self._forget_kv(worker.id)
        self.pool.close(worker)

    def _forget_kv(self, worker_id: str) -> None:
        if self.kv_index is not None:
            self.kv_index.remove_worker(worker_id)
        if self.approx_index is not None:
            self.approx_index.remove_worker(worker_id)

    async def consume_events(self) -> None:
        workers = self.pool.workers
        while True:
            topic, env = await self.subscriber.recv()
            worker = workers.get(env.publisher_id)
            if worker is None:
                continue
            try:
                if topic == TOPIC_HEARTBEAT:
                    hb = heartbeat_decoder.decode(env.payload)
                    now = worker.last_heartbeat = time.monotonic()
                    if hb.steps != worker.last_steps or not worker.inflight:
                        worker.last_progress = now
                    worker.last_steps = hb.steps
                    worker.replica_peers = hb.replica_peers
                    if worker.suspect is not None and (
                            hb.steps != worker.suspect or not hb.active_requests):
                        self.worker_recovered(worker)
                    if hb.draining:
                        worker.routable = False
                        worker.draining = True
                    if not worker.synced and self.kv_index is not None:
                        # Its events flow now: ask for the full state once, then follow events.
                        worker.synced = True
                        self.request_dump(worker)
                elif topic == TOPIC_LOAD:
                    worker.load = load_decoder.decode(env.payload)
                    worker.load_at = time.monotonic()
                elif topic == TOPIC_KV and self.kv_index is not None:
                    batch = kv_batch_decoder.decode(env.payload)
                    self.kv_index.apply(worker.id, batch)
                    self.metrics.kv_events.inc(len(batch.events))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._malformed("event", str(exc))

    def on_event_gap(self, publisher_id: str, topic: bytes, expected: int, got: int) -> None:
        self.metrics.event_gaps.labels(topic.decode(errors="replace")).inc()
        if topic == TOPIC_KV:
            worker = self.pool.workers.get(publisher_id)
            if worker is not None:
                log.info("kv event gap; resyncing", extra={"fields": {
                    "worker": publisher_id, "expected": expected, "got": got}})
                self.request_dump(worker)

    def request_dump(self, worker: WorkerHandle) -> None:
        self.metrics.resyncs.inc()
        worker.socket.send_multipart([KIND_KV_DUMP, encoder.encode(KvDumpRequest("resync"))])

    async def watch_heartbeats(self) -> None:
        period = self.config.heartbeat_interval_ms / 1000
        limit = period * self.config.missed_heartbeats
        stall = self.config.stall_timeout_ms / 1000
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(period / 2)
            now = time.monotonic()
            # If this loop itself ran late, heartbeats may be sitting unread: judge next round.
            late = now - last_tick > period
            last_tick = now
            if self.parked or self.stranded:
                self.retry_parked(now)
            if late:
                continue
            if self.kv_index is not None:
                self.metrics.index_blocks.set(self.kv_index.num_blocks())
                self.metrics.index_entries.set(self.kv_index.num_entries())
            for worker in list(self.pool.workers.values()):
                if not worker.alive:
                    continue
                if now - worker.last_heartbeat > limit:
                    self.worker_lost(worker, CAUSE_HANG)
                elif stall and worker.inflight and now - worker.last_progress > stall:
                    self.worker_lost(worker, CAUSE_STALL)

    def _update_worker_gauges(self) -> None:
        routable = sum(1 for w in self.pool.workers.values() if w.routable)
        self.metrics.workers.labels("routable").set(routable)
        self.metrics.workers.labels("draining").set(len(self.pool.workers) - routable)
        self.metrics.workers.labels("dead").set(len(self.pool.dead))
        up = {w.id: w.alive for w in self.pool.workers.values()}
        up.update({w: False for w in self.pool.dead if w in self._listed and w not in up})
        self.metrics.set_workers_up(up)

    def _malformed(self, plane: str, why: str) -> None:
        self.metrics.malformed.labels(plane).inc()
        if not self._warned_malformed:
            self._warned_malformed = True
            log.warning("dropped malformed frame", extra={"fields": {"plane": plane, "why": why}})

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self, install_signals: bool = True) -> None:
        cfg = self.config
        self.frontends = self.ctx.socket(zmq.ROUTER)
        tune_stream_socket(self.frontends)
        endpoint = bind_socket(self.frontends, cfg.host, cfg.router_port, cfg.advertise_host)
        status = StatusServer(self.metrics.registry, cfg.host, cfg.router_metrics_port)
        status.post_routes["/v1/route"] = self.route_query
        metrics_port = await status.start()
        self.discovery = open_discovery(cfg.discovery, lease_ttl=cfg.lease_ttl_s)
        self.stop = stop = asyncio.Event()
        self.loop = loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(c) for c in (
            self.serve_frontends(), self.watch_workers(), self.consume_events(),
            self.watch_heartbeats())]
        host = cfg.advertise_host or cfg.host
        await self.discovery.register(Instance(
            id=self.router_id, role=ROLE_ROUTER,
            endpoints={"request": endpoint, "metrics": f"http://{host}:{metrics_port}/metrics",
                       "http": f"http://{host}:{metrics_port}"},  # + /v1/route, /health
            metadata={"mode": cfg.router_mode, "pid": os.getpid(), "started": time.time()}))
        log.info("router ready", extra={"fields": {"id": self.router_id, "request": endpoint}})
        done, _ = await asyncio.wait([*tasks, asyncio.create_task(stop.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("router loop failed", exc_info=task.exception())
        await self.discovery.unregister(self.router_id)
        for task in tasks:
            task.cancel()
        await self.discovery.close()
        await status.close()
        self.ctx.destroy(linger=0)


def main(argv: Sequence[str] | None = None) -> None:
    (config,) = parse_configs([RouterConfig], list(sys.argv[1:] if argv is None else argv),
                              prog="turnout router")
    setup_logging("router", config.log_level)
    import uvloop

    uvloop.run(Router(config).run())

