"""Router replica sync: routers tell each other what they placed on each worker.

Every router holds the full KV index (it subscribes to every worker's events itself), but its
own accounting only knows the requests it placed; another router's placements show up in the
worker's next load report, up to a heartbeat period later. Two routers deciding in that window
pile onto the same worker. So each router publishes, on its own PUB socket (advertised in
discovery as `events`, topic `rusage`), its share of every worker it changed — requests, KV
blocks, blocks still to prefill — coalesced once per event-loop turn, and a full snapshot every
heartbeat period; the others add those shares to the load they see for the worker
(`WorkerHandle.peer_*`). A router that stops publishing (gone, hung) stops counting after
`stale_s`; the worker's own load report still covers whatever it really runs.

Owns the publishing, the peers' shares and their expiry. Does not own the accounting it
publishes (`accounting.py`) or how loads weigh in a decision (`kv_policy.py`, `policies.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from common.event_plane import EventPublisher
from common.messages import TOPIC_ROUTER_USAGE, RouterUsage, WorkerShare, router_usage_decoder
from services.router.worker_pool import WorkerHandle, WorkerPool


class ReplicaSync:
    def __init__(self, router_id: str, pool: WorkerPool, publisher: EventPublisher | None,
                 stale_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.router_id = router_id
        self.pool = pool
        self.publisher = publisher  # None: sync is off (--no-replica-sync)
        self.stale_s = stale_s
        self.clock = clock
        # peer router → worker → its share there; and when the peer last published
        self.peers: dict[str, dict[str, WorkerShare]] = {}
        self.heard: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._flush_scheduled = False

    @property
    def enabled(self) -> bool:
        return self.publisher is not None

    # -- publishing ----------------------------------------------------------------------------

    def changed(self, worker: WorkerHandle) -> None:
        """This router's usage of `worker` changed: publish it this event-loop turn."""
        if self.publisher is None:
            return
        self._dirty.add(worker.id)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        shares = [self._share(self.pool.workers[w]) for w in dirty if w in self.pool.workers]
        if shares and self.publisher is not None:
            self.publisher.publish(TOPIC_ROUTER_USAGE, RouterUsage(self.router_id, shares))

    def publish_snapshot(self) -> None:
        """Every heartbeat period: all of this router's shares (what a late joiner needs, and
        what keeps this router's shares from going stale at the others)."""
        if self.publisher is None:
            return
        shares = [self._share(w) for w in self.pool.workers.values() if w.usage.requests]
        self.publisher.publish(TOPIC_ROUTER_USAGE, RouterUsage(self.router_id, shares, True))

    @staticmethod
    def _share(worker: WorkerHandle) -> WorkerShare:
        u = worker.usage
        return WorkerShare(worker.id, len(u.requests), u.active_blocks, u.pending_prefill_blocks)

    # -- what the others placed ----------------------------------------------------------------

    def on_event(self, payload: bytes) -> None:
        """A peer's usage (msgspec's DecodeError/ValidationError when malformed)."""
        usage = router_usage_decoder.decode(payload)
        if usage.router_id == self.router_id or self.publisher is None:
            return
        self.heard[usage.router_id] = self.clock()
        shares = self.peers.setdefault(usage.router_id, {})
        touched = {s.worker_id for s in usage.workers}
        if usage.full:
            touched |= set(shares)
            shares.clear()
        for share in usage.workers:
            shares[share.worker_id] = share
        for worker_id in touched:
            self._total(worker_id)

    def expire(self, now: float | None = None) -> None:
        """Forget peers that stopped publishing (as of `now`: the clock, unless given)."""
        now = self.clock() if now is None else now
        for router_id in [r for r, t in self.heard.items() if now - t > self.stale_s]:
            self.forget(router_id)

    def forget(self, router_id: str) -> None:
        self.heard.pop(router_id, None)
        for worker_id in self.peers.pop(router_id, {}):
            self._total(worker_id)

    def _total(self, worker_id: str) -> None:
        worker = self.pool.workers.get(worker_id)
        if worker is None:
            return
        requests = active = prefill = 0
        for shares in self.peers.values():
            share = shares.get(worker_id)
            if share is not None:
                requests += share.requests
                active += share.active_blocks
                prefill += share.pending_prefill_blocks
        worker.peer_requests = requests
        worker.peer_active_blocks = active
        worker.peer_prefill_blocks = prefill
