"""Queued requests leave for a worker that has just joined.

A request placed while its worker was the best choice may still wait there for its prefill when
a new worker comes (the planner answering a burst, a restarted worker, a scale-up by hand).
Until its first token nothing of it is computed that cannot be redone, so it can leave: on a
worker's admission the router re-decides each such request of that worker's pool, oldest
first, with the policy that placed it, and moves those the policy now places elsewhere: cancel
where it waited, send where it goes. The oldest queued request on each worker stays (its engine
is most likely prefilling it now). Requests with tokens streamed (their KV moves with
migration), resumes, hand-offs and requests a gateway pinned to a worker stay too. Whole
requests the prefill pool took while no decode worker was left go to the first that joins.

Owns that choice and its metric; not the policies, the accounting or the sockets.
"""

from __future__ import annotations

from collections.abc import Iterator

from common.messages import KIND_CANCEL, KIND_GENERATE, MODE_PREFILL, Cancel, encoder
from services.router.accounting import Accounting, RoutedRequest
from services.router.disaggregation import Disaggregation
from services.router.metrics import RouterMetrics
from services.router.policies import Decision, RoutingError
from services.router.request_needs import prefer_able
from services.router.selection import Selector
from services.router.worker_pool import WorkerHandle

POOL_PREFILL = "prefill"
POOL_SERVING = "serving"  # aggregated and decode workers: whole requests and local prefills


class QueueRebalance:
    def __init__(self, accounting: Accounting, selector: Selector, disagg: Disaggregation,
                 metrics: RouterMetrics) -> None:
        self.accounting = accounting
        self.selector = selector
        self.disagg = disagg
        self.metrics = metrics

    def worker_joined(self, joined: WorkerHandle) -> int:
        """Re-decide the requests queued in `joined`'s pool; how many moved."""
        kind = POOL_PREFILL if joined.mode == MODE_PREFILL else POOL_SERVING
        moved = 0
        for entry in list(self._queued(joined, kind)):
            if self._reconsider(entry, kind):
                moved += 1
        if moved:
            self.metrics.queued_moves.labels(kind).inc(moved)
        return moved

    def _queued(self, joined: WorkerHandle, kind: str) -> Iterator[RoutedRequest]:
        """Requests of `joined`'s model and pool waiting for their first token on another
        routable worker, oldest first, each worker's oldest left out."""
        heads: set[str] = set()
        for entry in self.accounting.requests.values():  # in arrival order
            worker = entry.worker
            if worker is None or worker is joined or worker.model != joined.model \
                    or not worker.routable or entry.generated or entry.resume_tokens \
                    or entry.prefill_blocks <= 0 or entry.request.target_worker:
                continue
            if kind == POOL_PREFILL:
                if entry.disagg is None or entry.disagg.handed_off \
                        or worker.mode != MODE_PREFILL:
                    continue
            elif entry.disagg is not None:
                continue  # a prefill phase (its own pool) or a hand-off
            # else a whole request: on a serving worker, or on a prefill worker that took it
            # while no serving worker was left
            if worker.id not in heads:
                heads.add(worker.id)
                continue
            yield entry

    def _reconsider(self, entry: RoutedRequest, kind: str) -> bool:
        """Decide `entry` again as if it were new (its own weight off its worker); True when it
        moved."""
        old = entry.worker
        assert old is not None
        released_at = old.usage.released_at
        kept = Decision(old, entry.blocks, entry.blocks - entry.prefill_blocks, entry.hashes)
        self.accounting.strand(entry)
        try:
            decision = self._decide(entry, kind)
        except RoutingError:
            decision = None
        if decision is None or decision.worker is old:
            self.accounting.move(entry, kept)
            old.usage.released_at = released_at  # it never left: its reports still count
            return False
        old.socket.send_multipart([KIND_CANCEL, encoder.encode(Cancel(entry.request_id))])
        if kind == POOL_PREFILL:
            assert entry.disagg is not None
            self.disagg.move_prefill(entry, decision, entry.disagg.hold_first)
        else:
            self.selector.commit(decision)
            self.accounting.move(entry, decision)
            decision.worker.socket.send_multipart([KIND_GENERATE, encoder.encode(entry.request)])
        return True

    def _decide(self, entry: RoutedRequest, kind: str) -> Decision:
        if kind == POOL_PREFILL:
            workers = self.disagg.prefill_workers(entry.request.model)
            # Stays where what it asks is honoured (as it was placed).
            workers = prefer_able(workers, entry.request)
            return self.disagg.prefill_policy.decide(entry.request, workers)
        return self.selector.decide(entry.request)
