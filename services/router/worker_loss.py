"""What the router does with a worker it lost: its requests continue on other workers; and
the periodic liveness check whose verdicts lose them.

A dropped connection closes the worker for good; a suspect (silent or stalled, connection
open) is told to drop the moved requests and is re-admitted if it shows life again. Long
prefills stay on a hung suspect until its silence is convicted. A mixin of `Router`
(`main.py`), whose parts it uses: liveness, migration, accounting and the KV index.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from common.messages import KIND_CANCEL, Cancel, Instance, encoder
from services.router.liveness import CAUSE_HANG
from services.router.worker_pool import WorkerHandle, WorkerPool

if TYPE_CHECKING:
    from services.router.accounting import Accounting
    from services.router.encode_routing import EncodeRouting
    from services.router.events import EventIntake
    from services.router.kv_index import KvIndex
    from services.router.liveness import Liveness
    from services.router.metrics import RouterMetrics
    from services.router.migration import Migration
    from services.router.replicas import Replicas
    from services.router.selection import Selector
    from services.router.streams import Streams

log = logging.getLogger("turnout.router")


class WorkerLoss:
    liveness: Liveness
    metrics: RouterMetrics
    migration: Migration
    accounting: Accounting
    intake: EventIntake
    streams: Streams
    kv_index: KvIndex | None
    selector: Selector
    pool: WorkerPool
    encoding: EncodeRouting
    _listed: dict[str, Instance]
    replicas: Replicas

    def _retire(self, worker: WorkerHandle, dead: bool = False) -> None:
        raise NotImplementedError

    def _forget_kv(self, worker_id: str) -> None:
        if self.kv_index is not None:
            self.kv_index.remove_worker(worker_id)
        if self.selector.approx_index is not None:
            self.selector.approx_index.remove_worker(worker_id)

    def _update_worker_gauges(self) -> None:
        self.metrics.set_worker_gauges(self.pool.workers.values(), self.pool.dead, self._listed)

    def check_liveness(self) -> None:
        """Every half heartbeat period: place waiting requests, judge silent/stalled workers.
        Every verdict is as of the time the check began: a pause that lands mid-check (SIGSTOP
        strikes anywhere) must not age the silences it judges, which only the next check, late,
        can forgive."""
        on_time = self.liveness.check_on_time()
        now = self.liveness.checked_at
        self.selector.note_serving()
        if self.streams.waiting:
            self.streams.retry()
        self.replicas.check(self.liveness.paused_s, now)
        if not on_time:
            self.liveness.forgive_pause(list(self.pool.workers.values()))
            return
        self.metrics.set_routing_state(self.kv_index, self.selector.cost_models)
        workers = list(self.pool.workers.values())
        for worker, cause in self.liveness.verdicts(workers, now):
            self.worker_lost(worker, cause)
        for worker in self.liveness.convictions(workers, now):
            self.worker_convicted(worker)

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
        self.encoding.worker_lost(worker)  # its images go to another encode worker
        self._forget_kv(worker.id)
        moved = self.accounting.on_worker(worker)
        if cause == CAUSE_HANG:
            # Long prefills stay until the silence is convicted (or the worker is back).
            held = [e for e in moved if self.liveness.holds(e)]
            if held:
                moved = [e for e in moved if not self.liveness.holds(e)]
                log.info("holding long prefills on the suspect until conviction",
                         extra={"fields": {"worker": worker.id, "held": len(held)}})
        if loss.crashed:
            self._retire(worker, dead=True)
        else:
            for entry in moved:  # if it wakes up, it must not keep computing these
                worker.socket.send_multipart([KIND_CANCEL,
                                              encoder.encode(Cancel(entry.request_id))])
        for entry in moved:
            self.migration.migrate(entry, cause)
        self._update_worker_gauges()

    def worker_convicted(self, worker: WorkerHandle) -> None:
        """A hang suspect's silence is now certain: the long prefills it held move too."""
        log.warning("suspected worker convicted; moving the long prefills it held",
                    extra={"fields": {"worker": worker.id, "held": worker.inflight}})
        self._move_all(worker, CAUSE_HANG)

    def _move_all(self, worker: WorkerHandle, cause: str) -> None:
        """Every request still on `worker` continues elsewhere; the worker is told to drop
        them, should it wake up."""
        moved = self.accounting.on_worker(worker)
        if not moved:
            return
        self.migration.worker_lost(worker)
        for entry in moved:
            worker.socket.send_multipart([KIND_CANCEL, encoder.encode(Cancel(entry.request_id))])
        for entry in moved:
            self.migration.migrate(entry, cause)

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
