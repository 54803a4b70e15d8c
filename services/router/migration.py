"""Migration: what moves where when a worker is lost (or a draining worker refuses a request).

The request continues on another worker from its next token: prompt and every streamed token
are resent. Copies of its KV live on the lost worker's replica peers and in prefix caches the
KV index knows of; those workers are preferred, and named (`kv_sources`) so the new worker
pulls what it lacks. Past `migration_limit` moves the client gets a clear error. With no
worker left the request is stranded, its stream held open, until one comes back or
`no_worker_wait_ms` passes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from common.messages import KIND_GENERATE, encoder
from services.router.accounting import Accounting, RoutedRequest
from services.router.kv_index import KvIndex
from services.router.metrics import RouterMetrics
from services.router.policies import NoWorkerError, RoutingError
from services.router.selection import Selector
from services.router.worker_pool import WorkerHandle, WorkerPool

# (frontend identity, request id, HTTP-like code, message): an error frame to the frontend.
ErrorReply = Callable[[bytes, str, int, str], None]


@dataclasses.dataclass(slots=True)
class StrandedRequest:
    """A migrating request that found no worker: retried whenever one may have come."""

    entry: RoutedRequest
    deadline: float  # monotonic time after which it fails
    cause: str  # why its worker was lost
    counts: bool  # counts against the migration limit (a drain refusal does not)


class Migration:
    def __init__(self, pool: WorkerPool, accounting: Accounting, selector: Selector,
                 metrics: RouterMetrics, reply_error: ErrorReply, kv_index: KvIndex | None,
                 limit: int, wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.accounting = accounting
        self.selector = selector
        self.metrics = metrics
        self.reply_error = reply_error
        self.kv_index = kv_index
        self.limit = limit
        self.wait_s = wait_s
        self.clock = clock
        self.stranded: dict[str, StrandedRequest] = {}
        self.replicas_of: dict[str, list[str]] = {}  # lost worker → its replica peers
        # Set by disaggregation, (entry, cause, counts): re-runs a lost prefill phase on another
        # prefill worker, or re-sends a decode phase not yet begun to another decode worker
        # (False: neither, the request continues here like any other).
        self.replan: Callable[[RoutedRequest, str, bool], bool] | None = None

    def worker_lost(self, worker: WorkerHandle) -> None:
        """Remember where copies of a lost worker's KV live (its handle may be gone later)."""
        self.replicas_of[worker.id] = list(worker.replica_peers)

    def migrate(self, entry: RoutedRequest, cause: str, counts: bool = True,
                deadline: float | None = None) -> bool:
        """Continue `entry` elsewhere; False when it failed instead (the client was told)."""
        old = entry.worker.id if entry.worker is not None else ""  # "": it was stranded
        if counts and entry.migrations >= self.limit:
            self.fail(entry, f"worker {old} failed ({cause}) and the migration limit "
                             f"({self.limit}) is reached")
            return False
        if self.replan is not None and self.replan(entry, cause, counts):
            return True
        rid = entry.request_id
        request = entry.continuation()
        holders = self.holders(entry, old)
        try:
            decision = self.selector.choose(request, exclude=old, hint=holders)
        except NoWorkerError as exc:
            if deadline is None:
                deadline = self.clock() + self.wait_s
            if self.clock() >= deadline:
                why = f"worker {old} failed ({cause})" if old else \
                    f"it waited {self.wait_s:g} s for a worker ({cause})"
                self.fail(entry, f"{why}; {exc}")
                return False
            self.accounting.strand(entry)
            self.stranded[rid] = StrandedRequest(entry, deadline, cause, counts)
            return True
        except RoutingError as exc:
            self.fail(entry, f"worker {old} failed ({cause}); {exc}")
            return False
        if counts:
            entry.migrations += 1
            self.metrics.migrations.labels(cause).inc()
        request.kv_sources = self.kv_sources(holders, decision.worker)
        entry.resume_tokens = len(request.token_ids) + len(request.generated_token_ids)
        self.accounting.move(entry, decision)
        decision.worker.socket.send_multipart([KIND_GENERATE, encoder.encode(request)])
        return True

    def holders(self, entry: RoutedRequest, lost: str) -> dict[str, int]:
        """Live workers that may hold `entry`'s blocks → how many (replicas: all but the last)."""
        holders: dict[str, int] = {}
        old = self.pool.workers.get(lost)
        peers = old.replica_peers if old is not None else self.replicas_of.get(lost, [])
        for peer in peers:
            if peer in self.pool.workers and self.pool.workers[peer].alive:
                holders[peer] = max(0, entry.blocks - 1)
        if self.kv_index is not None and entry.hashes:
            for wid, n in self.kv_index.find_matches(entry.hashes).items():
                if wid != lost and wid in self.pool.workers:
                    holders[wid] = max(n, holders.get(wid, 0))
        return holders

    def kv_sources(self, holders: dict[str, int], new: WorkerHandle) -> list[str]:
        """Request endpoints of the holders the new worker can pull from (not itself)."""
        return [self.pool.workers[w].instance.endpoints["request"]
                for w in holders if w != new.id]

    def retry_stranded(self) -> None:
        """A worker may have come: try every stranded request again (deadlines kept)."""
        stranded, self.stranded = self.stranded, {}
        for s in stranded.values():
            if s.entry.request_id in self.accounting:
                self.migrate(s.entry, s.cause, s.counts, s.deadline)

    def cancel(self, request_id: str) -> None:
        self.stranded.pop(request_id, None)

    def fail(self, entry: RoutedRequest, message: str) -> None:
        self.accounting.finish(entry.request_id)
        self.metrics.requests.labels("error").inc()
        self.reply_error(entry.frontend, entry.request_id, 503, message)
