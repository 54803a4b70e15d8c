"""Event-plane intake: workers' heartbeats (to liveness), load reports and KV events (into the
KV index), and the resync that a new worker or a gap in the KV events calls for.

A resync asks the worker for a full dump of its KV state (`KIND_KV_DUMP` on its request
socket); the dump arrives as ordinary KV events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from common.messages import (
    KIND_KV_DUMP,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    TOPIC_LOAD,
    KvDumpRequest,
    encoder,
    heartbeat_decoder,
    kv_batch_decoder,
    load_decoder,
)
from services.router.kv_index import KvIndex
from services.router.liveness import Liveness
from services.router.metrics import RouterMetrics
from services.router.worker_pool import WorkerHandle, WorkerPool

log = logging.getLogger("turnout.router")


class EventIntake:
    def __init__(self, pool: WorkerPool, liveness: Liveness, metrics: RouterMetrics,
                 kv_index: KvIndex | None, on_recovered: Callable[[WorkerHandle], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.liveness = liveness
        self.metrics = metrics
        self.kv_index = kv_index
        self.on_recovered = on_recovered  # a suspect showed progress: re-admit it
        self.clock = clock

    def on_event(self, worker: WorkerHandle, topic: bytes, payload: bytes) -> None:
        """One event from `worker`; msgspec's DecodeError/ValidationError when malformed."""
        if topic == TOPIC_HEARTBEAT:
            if self.liveness.on_heartbeat(worker, heartbeat_decoder.decode(payload)):
                self.on_recovered(worker)
            if not worker.synced and self.kv_index is not None:
                # Its events flow now: ask for the full state once, then follow events.
                worker.synced = True
                self.resync(worker)
        elif topic == TOPIC_LOAD:
            worker.load = load_decoder.decode(payload)
            worker.load_at = self.clock()
        elif topic == TOPIC_KV and self.kv_index is not None:
            batch = kv_batch_decoder.decode(payload)
            self.kv_index.apply(worker.id, batch)
            self.metrics.kv_events.inc(len(batch.events))

    def on_gap(self, publisher_id: str, topic: bytes, expected: int, got: int) -> None:
        """Events were lost: a KV gap means the index may be wrong about that worker."""
        self.metrics.event_gaps.labels(topic.decode(errors="replace")).inc()
        if topic == TOPIC_KV:
            worker = self.pool.workers.get(publisher_id)
            if worker is not None:
                log.info("kv event gap; resyncing", extra={"fields": {
                    "worker": publisher_id, "expected": expected, "got": got}})
                self.resync(worker)

    def resync(self, worker: WorkerHandle) -> None:
        self.metrics.resyncs.inc()
        worker.socket.send_multipart([KIND_KV_DUMP, encoder.encode(KvDumpRequest("resync"))])
