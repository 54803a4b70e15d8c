"""Request streams through the router: a new request placed on a worker (or parked until one
appears), a cancel, and token batches relayed back, regrouped per frontend.

Frames only: the sockets are the router's (`main.py`); decoding and malformed-frame handling
happen there too.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import msgspec

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

if TYPE_CHECKING:
    from services.router.disaggregation import Disaggregation
    from services.router.encode_routing import EncodeRouting


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
        self.disagg: Disaggregation | None = None  # prefill/decode placement and hand-offs
        self.encoding: EncodeRouting | None = None  # images through encode workers first
        self._runs = itertools.count(1)  # run numbers of resumed requests (`GenerateRequest.run`)
        # Timers on the router's loop (None: no loop runs, as in unit tests: no timers).
        self.call_later: Callable[[float, Callable[[], None]], object] | None = None

    def reply_error(self, frontend: bytes, request_id: str, code: int, message: str) -> None:
        send_error(self.frontends, frontend, request_id, code, message)

    def on_generate(self, frontend: bytes, request: GenerateRequest, payload: bytes,
                    deadline: float | None = None) -> None:
        """Place a new request (`deadline`: it was parked, and waits no longer than that)."""
        rid = request.request_id
        if rid in self.accounting:
            if not self._take_over(frontend, request):
                self.reply_error(frontend, rid, 400, "duplicate request id")
            return
        if request.images and self.encoding is not None \
                and self.encoding.takes(frontend, request):
            return  # placed once its embeddings are back
        if request.resumed:
            # This router may have cancelled an earlier run of it there (it took the frontend
            # for gone) whose chunks are still on their way: its runs from now on are told
            # apart. Numbered before placement, so a prefill phase's payload carries it too.
            request = msgspec.structs.replace(request, run=next(self._runs))
            payload = encoder.encode(request)
        try:
            placement = None
            if self.disagg is not None and self.disagg.places(request):
                placement = self.disagg.place(request)
            decision = placement.decision if placement is not None \
                else self.selector.choose(request, hint=self._resume_hint(request),
                                          prefer=request.previous_worker)
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
        entry = RoutedRequest(request, frontend)
        if placement is not None and placement.payload is not None:
            entry.disagg = placement.state
            payload = placement.payload
        self.accounting.place(entry, decision)
        if request.previous_worker or request.resumed:
            self.metrics.resumes.inc()
            if placement is None and request.generated_token_ids \
                    and decision.worker.id != request.previous_worker:
                payload = self._pulling(request, entry, decision.worker, payload)
        if self.disagg is not None:
            entry.budget_gaps = self.disagg.itl_budget.admitted(
                request.sampling.max_tokens - len(request.generated_token_ids))
        self.metrics.inflight.set(len(self.accounting))
        decision.worker.socket.send_multipart([KIND_GENERATE, payload])

    def _take_over(self, frontend: bytes, request: GenerateRequest) -> bool:
        """A frontend whose connection to this router dropped resumes, over a new connection, a
        stream still running here (no other router was reachable, and this one was back
        first): it goes on in place, its replies to the new connection, starting with the
        tokens that went to the old one. False when it is not that (not a resume, the same
        connection, or another token history: a clashing id)."""
        entry = self.accounting.get(request.request_id)
        if entry is None or not request.resumed or entry.frontend == frontend:
            return False
        sent = entry.generated
        if entry.disagg is not None and entry.disagg.held is not None:
            sent = sent[:len(sent) - len(entry.disagg.held.token_ids)]  # not sent yet
        have = request.generated_token_ids
        if len(have) > len(sent) or sent[:len(have)] != have:
            return False
        entry.frontend = frontend
        self.metrics.taken_over.inc()
        if len(sent) > len(have) or (not have and entry.announced):
            chunk = TokenChunk(request.request_id, sent[len(have):], worker_id=entry.announced,
                               offset=len(have))
            if entry.logprobs is not None:
                chunk.logprobs = entry.logprobs.since(len(have), len(sent))
            if not have:  # the first chunk, with the prompt's count, went to the old one
                chunk.num_prompt_tokens = len(entry.request.token_ids)
            self.frontends.send_multipart([frontend, KIND_TOKENS,
                                           encoder.encode(TokenBatch([chunk]))])
        return True

    def _resume_hint(self, request: GenerateRequest) -> dict[str, int] | None:
        """A stream resumed from a lost router: the worker that served it holds its KV. It
        goes back there while that worker serves its model (`prefer`), whatever its load: the
        worker most likely still runs it and then hands it over (no recompute; one still
        waiting keeps its place in the queue). Placed elsewhere, it would run twice until that
        worker noticed the lost router and dropped its copy."""
        if not request.previous_worker:
            return None
        worker = self.pool.workers.get(request.previous_worker)
        if worker is None:
            return None
        tokens = len(request.token_ids) + len(request.generated_token_ids)
        return {worker.id: tokens // worker.block_size}

    def _pulling(self, request: GenerateRequest, entry: RoutedRequest, worker: WorkerHandle,
                 payload: bytes) -> bytes:
        """A resume with tokens placed away from the worker that served it (a prefill worker,
        which holds its prompt's KV for a decode side; or one that no longer serves the model):
        it names the workers that may hold its blocks, as a migration does, so the new worker
        pulls them instead of recomputing the prompt. `payload` unchanged when there are none."""
        holders = self.migration.holders(entry, "")
        previous = self.pool.workers.get(request.previous_worker)
        if previous is not None and previous.alive:
            holders.setdefault(previous.id, entry.blocks)
        sources = self.migration.kv_sources(holders, worker)
        if not sources:
            return payload
        return encoder.encode(msgspec.structs.replace(request, kv_sources=sources))

    def on_cancel(self, request_id: str) -> None:
        if self.parking.cancel(request_id) or (
                self.encoding is not None and self.encoding.cancel(request_id)):
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
        handoffs: list[RoutedRequest] = []
        for chunk in chunks:
            entry = self.accounting.get(chunk.request_id)
            if entry is None or entry.worker is not worker:
                continue  # cancelled, or a late chunk from before a migration
            if chunk.run != entry.request.run and not chunk.error_code and worker.stamps_runs:
                self.metrics.stale_chunks.inc()  # another run of it there, cancelled, late
                self.metrics.stale_tokens.inc(len(chunk.token_ids))
                continue
            if 0 <= chunk.offset < len(entry.generated):
                # Tokens the stream has: an earlier run here that this router cancelled (it
                # took the frontend for gone), still on its way when the stream came back.
                stale = len(entry.generated) - chunk.offset
                self.metrics.stale_tokens.inc(min(stale, len(chunk.token_ids)))
                chunk.token_ids = chunk.token_ids[stale:]
                if chunk.logprobs:
                    chunk.logprobs = chunk.logprobs[stale:]
            if entry.disagg is not None and self.disagg is not None:
                if chunk.finish_reason is not None and self.disagg.continues(entry, chunk):
                    handoffs.append(entry)  # its first token goes out first, then the KV
                elif entry.disagg.handed_off:
                    self.disagg.decode_started(entry, chunk)
            if chunk.finish_reason is not None:
                if chunk.error_code == 503:
                    # A draining worker refused it: place it elsewhere instead of failing.
                    if self.migration.migrate(entry, CAUSE_DRAIN, counts=False):
                        continue
                self.accounting.finish(chunk.request_id, len(chunk.token_ids))
                self.metrics.requests.labels("error" if chunk.error_code else "finished").inc()
            elif chunk.token_ids:
                self.accounting.first_token(entry)
            if entry.migrations or entry.disagg is not None:
                if entry.resume_tokens and chunk.num_prompt_tokens:
                    self.metrics.recomputed_tokens.observe(
                        max(0, entry.resume_tokens - chunk.cached_tokens))
                    entry.resume_tokens = 0
                if entry.generated:
                    # The client already has prompt/cached figures from the first worker.
                    chunk.num_prompt_tokens = 0
                    chunk.cached_tokens = 0
                    chunk.prompt_logprobs = None
            if chunk.token_ids:
                entry.generated.extend(chunk.token_ids)
                if entry.logprobs is not None and chunk.logprobs:
                    entry.logprobs.items.extend(chunk.logprobs)
            if entry.disagg is not None and self.disagg is not None:
                out = self.disagg.relay(entry, chunk)  # a first token may wait for the next
                if out is None:
                    continue
                chunk = out
            if not (chunk.token_ids or chunk.finish_reason or chunk.error_code
                    or chunk.num_prompt_tokens):
                continue  # a decode step begun (`TokenChunk`): nothing for the client
            if entry.announced is not worker.id:
                entry.announced = chunk.worker_id = worker.id  # where a resume should go
            by_frontend.setdefault(entry.frontend, []).append(chunk)
        for frontend, out in by_frontend.items():
            self.frontends.send_multipart([frontend, KIND_TOKENS, encoder.encode(TokenBatch(out))])
        if handoffs:
            assert self.disagg is not None
            for entry in handoffs:
                self.disagg.hand_off(entry)
                delay = self.disagg.hold_deadline_s(entry)
                if delay is not None and self.call_later is not None:
                    self.call_later(delay, lambda e=entry: self.release_held(e))
        self.metrics.inflight.set(len(self.accounting))

    def release_held(self, entry: RoutedRequest) -> None:
        """A held first token's deadline passed (`Disaggregation.hold_deadline_s`): send it
        alone if the ITL miss budget lets it go; else it keeps waiting for the decode worker."""
        if self.disagg is None or self.accounting.get(entry.request_id) is not entry:
            return  # ended, or cancelled
        chunk = self.disagg.release_late(entry)
        if chunk is None:
            return
        if entry.worker is not None and entry.announced != entry.worker.id:
            entry.announced = chunk.worker_id = entry.worker.id  # the decode worker has it now
        self.frontends.send_multipart([entry.frontend, KIND_TOKENS,
                                       encoder.encode(TokenBatch([chunk]))])

    def _reject(self, frontend: bytes, request: GenerateRequest) -> None:
        self.metrics.requests.labels("rejected").inc()
        self.reply_error(frontend, request.request_id, 503,
                         f"no live worker serves model {request.model!r}")
