"""The router's view of the worker fleet: one handle per worker, its socket and its liveness.

A worker enters when discovery shows it and leaves the routing set at once when the router
declares it dead (connection dropped, heartbeats missed) or when it leaves discovery (draining:
its running streams still finish over the open connection). Owns the handle and its connection
(a `MonitoredDealer`: the socket, and the monitor that says when the connection drops);
the handle's liveness fields are `liveness.py`'s to change, its `usage` is `accounting.py`'s, and
what happens to a dead worker's requests is `migration.py`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from common.failure_detector import PhiAccrualDetector
from common.loop_socket import MessageHandler
from common.messages import (
    MODE_AGGREGATED,
    MODE_ENCODE,
    SCHEDULING_PRIORITY,
    Instance,
    LoadReport,
)
from common.monitored_dealer import MonitoredDealer
from services.router.worker_usage import WorkerUsage


class WorkerHandle:
    __slots__ = (
        "alive",
        "block_size",
        "dealer",
        "detector",
        "draining",
        "id",
        "instance",
        "last_chosen",
        "last_heartbeat",
        "last_progress",
        "last_steps",
        "load",
        "load_at",
        "peer_active_blocks",
        "peer_prefill_blocks",
        "peer_requests",
        "replica_peers",
        "routable",
        "socket",
        "suspect",
        "synced",
        "usage",
    )

    def __init__(self, instance: Instance, dealer: MonitoredDealer) -> None:
        self.id = instance.id
        self.instance = instance
        self.dealer = dealer
        self.socket = dealer.socket  # requests out; token batches in go to the pool's handler
        self.block_size = int(instance.metadata.get("block_size") or 64)
        # What this router has in flight there (written by `Accounting` only).
        self.usage = WorkerUsage()
        self.last_chosen = 0  # decision counter when last picked (tie-break: longest ago wins)
        self.synced = False  # its full KV state was asked for once its events flowed
        self.load: LoadReport | None = None
        # When the last load report arrived (stale once older than `usage.released_at`).
        self.load_at = 0.0
        self.last_heartbeat = time.monotonic()
        self.last_steps = -1
        self.last_progress = self.last_heartbeat  # when `steps` last moved
        self.detector: PhiAccrualDetector | None = None  # judges its silence (liveness)
        self.alive = True
        self.routable = True  # False once it left discovery (draining) or died
        self.draining = False  # it said so in a heartbeat
        # Declared dead while its connection stays open (silent or stalled): its requests went
        # elsewhere; if it shows signs of life again it is resynced and re-admitted. The
        # value is the engine-step count at the verdict (a stalled one must make progress).
        self.suspect: int | None = None
        self.replica_peers: list[str] = []  # workers holding copies of its KV blocks
        # What the other router replicas placed there (`replica_sync.py`).
        self.peer_requests = 0
        self.peer_active_blocks = 0
        self.peer_prefill_blocks = 0

    @property
    def inflight(self) -> int:
        """Requests this router has in flight on the worker."""
        return len(self.usage.requests)

    @property
    def model(self) -> str:
        return self.instance.model

    @property
    def mode(self) -> str:
        """Its disaggregation role: aggregated, prefill or decode."""
        return str(self.instance.metadata.get("mode") or MODE_AGGREGATED)

    @property
    def schedules_by_priority(self) -> bool:
        """Whether its engine orders requests by their `priority` (--scheduling-policy)."""
        return self.instance.metadata.get("scheduling") == SCHEDULING_PRIORITY

    @property
    def applies_structured_outputs(self) -> bool:
        """Whether its engine constrains output to `SamplingParams.structured` (a worker too
        old to say would ignore the constraint)."""
        return self.instance.metadata.get("structured_outputs") is True

    @property
    def stamps_runs(self) -> bool:
        """Whether it puts a request's `run` on its chunks (a release before that does not)."""
        return bool(self.instance.metadata.get("chunk_runs"))

    @property
    def started(self) -> float:
        return float(self.instance.metadata.get("started", 0.0))


class WorkerPool:
    """`on_message(worker, frames)` gets every message a worker sends (read on the loop)."""

    def __init__(self, ctx: zmq.Context,
                 on_message: Callable[[WorkerHandle, list[bytes]], None]) -> None:
        self.on_message = on_message
        # The connection to a worker's request endpoint, its messages to the handler.
        self.open_dealer: Callable[[str, MessageHandler], MonitoredDealer] = (
            lambda endpoint, handler: MonitoredDealer(ctx, endpoint, handler))
        self.workers: dict[str, WorkerHandle] = {}
        # Ids declared dead, with the `started` stamp of the process that died: the same record
        # is not re-admitted, a restarted process (new stamp) is.
        self.dead: dict[str, float] = {}

    def admit(self, instance: Instance) -> WorkerHandle | None:
        started = float(instance.metadata.get("started", 0.0))
        if self.dead.get(instance.id) == started:
            return None
        self.dead.pop(instance.id, None)
        old = self.workers.get(instance.id)
        if old is not None:
            if old.started == started:
                old.instance = instance
                old.routable = True
                return None
            self.close(old)
        on_message = self.on_message

        def deliver(frames: list[bytes]) -> None:  # read on the loop: `handle` is set by then
            on_message(handle, frames)

        handle = WorkerHandle(instance, self.open_dealer(instance.endpoints["request"], deliver))
        self.workers[instance.id] = handle
        return handle

    def routable(self, model: str) -> list[WorkerHandle]:
        """Workers that generate for `model` (encode workers never do: `encoders`)."""
        return [w for w in self.workers.values() if w.routable and w.alive and w.model == model
                and w.mode != MODE_ENCODE]

    def encoders(self, model: str) -> list[WorkerHandle]:
        """Encode workers of `model` that may get images."""
        return [w for w in self.workers.values() if w.routable and w.alive and w.model == model
                and w.mode == MODE_ENCODE]

    def models(self) -> set[str]:
        return {w.model for w in self.workers.values() if w.routable and w.alive}

    def mark_dead(self, handle: WorkerHandle) -> None:
        handle.alive = False
        handle.routable = False
        self.dead[handle.id] = handle.started
        self.close(handle)

    def close(self, handle: WorkerHandle) -> None:
        if self.workers.get(handle.id) is handle:
            del self.workers[handle.id]
        handle.dealer.close()

    def close_all(self) -> None:
        for handle in list(self.workers.values()):
            self.close(handle)
