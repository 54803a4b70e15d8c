"""Request streams through the router: a new request placed on a worker (or parked until one
appears), a cancel, and token batches relayed back, regrouped per frontend.

Frames only: the sockets are the router's (`main.py`); decoding and malformed-frame handling
happen there too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from common.messages import (
    FINISH_ERROR,
    KIND_CANCEL,
    KIND_GENERATE,
    KIND_TOKENS,
    Cancel,
    GenerateRequest,
    TokenBatch,
    TokenChunk,
    encoder,
)
from services.router.accounting import Accounting, RoutedRequest
from services.router.liveness import CAUSE_DRAIN
from services.router.metrics import RouterMetrics
from services.router.migration import Migration
from services.router.parking import ParkedRequest, ParkingLot
from services.router.policies import NoWorkerError, RoutingError
from services.router.selection import Selector
from services.router.worker_pool import WorkerHandle, WorkerPool


class FrameSender(Protocol):
    def send_multipart(self, frames: list[bytes]) -> object: ...


def send_error(frontends: FrameSender, frontend: bytes, request_id: str, code: int,
               message: str) -> None:
    """End `request_id`'s stream with an error the frontend turns into an HTTP status."""
    chunk = TokenChunk(request_id, [], FINISH_ERROR, error_code=code, error_message=message)
    frontends.send_multipart([frontend, KIND_TOKENS, encoder.encode(TokenBatch([chunk]))])


class Streams:
    def __init__(self, frontends: FrameSender, pool: WorkerPool, selector: Selector,
                 accounting: Accounting, migration: Migration, metrics: RouterMetrics,
                 park_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.frontends = frontends  # the ROUTER socket frontends connect to
        self.pool = pool
        self.selector = selector
        self.accounting = accounting
        self.migration = migration
        self.metrics = metrics
        self.parking = ParkingLot()
        self.park_s = park_s  # how long a request waits for a worker of its model (0: never)
        self.clock = clock

    def reply_error(self, frontend: bytes, request_id: str, code: int, message: str) -> None:
        send_error(self.frontends, frontend, request_id, code, message)

    def on_generate(self, frontend: bytes, request: GenerateRequest, payload: bytes,
                    deadline: float | None = None) -> None:
        """Place a new request (`deadline`: it was parked, and waits no longer than that)."""
        rid = request.request_id
        if rid in self.accounting:
            self.reply_error(frontend, rid, 400, "duplicate request id")
            return
        try:
            decision = self.selector.choose(request)
        except NoWorkerError:
            if self.park_s > 0:
                # A worker may be starting (discovery lags by a poll): hold it briefly.
                self.parking.park(ParkedRequest(
                    deadline if deadline is not None else self.clock() + self.park_s,
                    frontend, request, payload))
                return
            self._reject(frontend, request)
            return
        except RoutingError as exc:
            self.metrics.requests.labels("rejected").inc()
            self.reply_error(frontend, rid, exc.code, str(exc))
            return
        self.accounting.place(RoutedRequest(request, frontend), decision)
        self.metrics.inflight.set(len(self.accounting))
        decision.worker.socket.send_multipart([KIND_GENERATE, payload])

    def on_cancel(self, request_id: str) -> None:
        if self.parking.cancel(request_id):
            return
        self.migration.cancel(request_id)
        entry = self.accounting.get(request_id)
        if entry is None:
            return
        worker = self.pool.workers.get(entry.worker.id) if entry.worker is not None else None
        self.accounting.finish(request_id)
        self.metrics.requests.labels("cancelled").inc()
        self.metrics.inflight.set(len(self.accounting))
        if worker is not None:
            worker.socket.send_multipart([KIND_CANCEL, encoder.encode(Cancel(request_id))])

    def retry(self) -> None:
        """A worker may have come (or time passed): place parked and stranded requests; fail
        those whose wait is over."""
        now = self.clock()
        for parked in self.parking.take_all():
            if now < parked.deadline:
                self.on_generate(parked.frontend, parked.request, parked.payload,
                                 parked.deadline)
            else:
                self._reject(parked.frontend, parked.request)
        self.migration.retry_stranded()

    @property
    def waiting(self) -> bool:
        """Requests are parked or stranded (a retry may place them)."""
        return bool(self.parking) or bool(self.migration.stranded)

    def on_batch(self, worker: WorkerHandle, chunks: list[TokenChunk]) -> None:
        """Relay one worker's token batch: one frame per frontend."""
        by_frontend: dict[bytes, list[TokenChunk]] = {}
        for chunk in chunks:
            entry = self.accounting.get(chunk.request_id)
            if entry is None or entry.worker is not worker:
                continue  # cancelled, or a late chunk from before a migration
            if chunk.finish_reason is not None:
                if chunk.error_code == 503:
                    # A draining worker refused it: place it elsewhere instead of failing.
                    if self.migration.migrate(entry, CAUSE_DRAIN, counts=False):
                        continue
                self.accounting.finish(chunk.request_id)
                self.metrics.requests.labels("error" if chunk.error_code else "finished").inc()
            elif chunk.token_ids:
                self.accounting.first_token(entry)
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
            by_frontend.setdefault(entry.frontend, []).append(chunk)
        for frontend, out in by_frontend.items():
            self.frontends.send_multipart([frontend, KIND_TOKENS, encoder.encode(TokenBatch(out))])
        self.metrics.inflight.set(len(self.accounting))

    def _reject(self, frontend: bytes, request: GenerateRequest) -> None:
        self.metrics.requests.labels("rejected").inc()
        self.reply_error(frontend, request.request_id, 503,
                         f"no live worker serves model {request.model!r}")
