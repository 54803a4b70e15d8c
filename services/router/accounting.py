"""The router's load accounting: which requests are in flight, on which worker, and what they
weigh there.

One source of truth per worker (`WorkerUsage`, `worker_usage.py`, on its handle): the ids of
the requests this router has placed there, the KV blocks they hold and the blocks still to
prefill until their first token. Policies read it (fresher than any load report); only
`Accounting` writes it, on every transition a request makes: placed, first token, moved
(migration), stranded, finished or cancelled. A request is counted on at most one worker, so no
count can go negative.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from common.logprob_history import LogprobHistory
from common.messages import GenerateRequest

if TYPE_CHECKING:
    from services.router.disagg_state import DisaggState
    from services.router.policies import Decision
    from services.router.worker_pool import WorkerHandle


class RoutedRequest:
    """A request in flight: who asked, which worker serves it, and everything streamed so far
    (exactly what a migration needs to continue the stream elsewhere)."""

    __slots__ = ("announced", "blocks", "budget_gaps", "disagg", "frontend", "generated",
                 "hashes", "logprobs", "migrations", "prefill_blocks", "request", "resume_tokens",
                 "worker")

    def __init__(self, request: GenerateRequest, frontend: bytes) -> None:
        self.request = request
        self.frontend = frontend  # ROUTER identity of the frontend connection
        self.worker: WorkerHandle | None = None  # None: waiting for a worker (stranded)
        self.generated: list[int] = list(request.generated_token_ids)
        # Those of `generated`, when asked for (a takeover sends them again with the tokens).
        self.logprobs = LogprobHistory(len(self.generated)) if request.sampling.logprobs >= 0 \
            else None
        self.migrations = 0
        self.blocks = 0  # KV blocks it holds on its worker
        self.prefill_blocks = 0  # blocks still to prefill until its first token arrives
        self.hashes: list[int] = []
        self.resume_tokens = 0  # sequence length at the last migration (0: none pending)
        # Placed on a prefill worker (`disagg_state.DisaggState`); None: aggregated.
        self.disagg: DisaggState | None = None
        self.announced = ""  # the worker last named to the frontend (`TokenChunk.worker_id`)
        self.budget_gaps = 0  # gaps the ITL miss budget counted for it at admission

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def continuation(self, phase: str = "", kv_transfer_params: bytes = b"") -> GenerateRequest:
        """The request that continues this stream on another worker: the same id, prompt,
        images (an engine recomputing the prompt needs them, and a prefix cache keyed by them
        hits only with them) and sampling, after every token generated so far; its run number
        too (every run of a resumed request carries the one this router gave it)."""
        r = self.request
        return GenerateRequest(r.request_id, r.model, r.token_ids, r.sampling, None,
                               list(self.generated), [], phase, kv_transfer_params,
                               images=r.images, run=r.run, cache_salt=r.cache_salt,
                               priority=r.priority)


class Accounting:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[WorkerHandle], None] | None = None,
                 report_period_s: float = 0.0) -> None:
        """`report_period_s`: how often workers send load reports (see `released_at`)."""
        self.requests: dict[str, RoutedRequest] = {}
        self._clock = clock
        self._report_period_s = report_period_s
        self._on_change = on_change  # a worker's usage changed (router replica sync)
        # A request ended, on any path, with the tokens of its last chunk not yet in
        # `generated` (the ITL miss budget counts its real gaps).
        self.on_finish: Callable[[RoutedRequest, int], None] | None = None
        # Frontends that ping (and so get `Placements` on their pongs) → ids of their requests
        # placed or moved since the last pong.
        self.to_announce: dict[bytes, list[str]] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def get(self, request_id: str) -> RoutedRequest | None:
        return self.requests.get(request_id)

    def on_worker(self, worker: WorkerHandle) -> list[RoutedRequest]:
        return [self.requests[r] for r in worker.usage.requests if r in self.requests]

    def place(self, entry: RoutedRequest, decision: Decision) -> None:
        """A new request goes to `decision.worker`."""
        self.requests[entry.request_id] = entry
        self._assign(entry, decision)

    def first_token(self, entry: RoutedRequest) -> None:
        """Its prefill is done: the blocks no longer wait in the worker's prefill queue."""
        if entry.worker is not None and entry.prefill_blocks:
            usage = entry.worker.usage
            usage.pending_prefill_blocks -= entry.prefill_blocks
            # Its step ended: what waited behind it is the next one, begun now.
            usage.batch_started_at = self._clock()
            usage.batch_blocks = usage.pending_prefill_blocks
            usage.queued_since = 0.0
            self._changed(entry.worker)
        entry.prefill_blocks = 0

    def move(self, entry: RoutedRequest, decision: Decision) -> None:
        """A migration: off its worker, onto `decision.worker`."""
        self._release(entry)
        self._assign(entry, decision)

    def strand(self, entry: RoutedRequest) -> None:
        """Off its worker, with none to go to yet (its stream stays open)."""
        self._release(entry)

    def finish(self, request_id: str, final_tokens: int = 0) -> RoutedRequest | None:
        """The request is over (finished, failed or cancelled): forget it. `final_tokens`: the
        tokens of the chunk that ended it, not yet in its `generated`."""
        entry = self.requests.pop(request_id, None)
        if entry is not None:
            self._release(entry)
            if self.on_finish is not None:
                self.on_finish(entry, final_tokens)
        return entry

    def unannounced(self, frontend: bytes) -> tuple[list[str], list[str]]:
        """`frontend`'s requests placed or moved since the last call whose worker no chunk has
        named yet (`RoutedRequest.announced`, left as it is: a frontend that ignores pongs
        learns the worker from the next chunk all the same), and those workers."""
        ids: list[str] = []
        workers: list[str] = []
        pending = self.to_announce.get(frontend, ())
        self.to_announce[frontend] = []  # its first call: from now on it is told
        for request_id, worker in self._unnamed(pending):
            ids.append(request_id)
            workers.append(worker.id)
        return ids, workers

    def awaiting_announcement(self) -> int:
        """Requests whose frontend learns their worker from its next pong (no chunk has named
        it): were this router lost now, their resumes would be placed afresh."""
        return sum(1 for pending in self.to_announce.values() for _ in self._unnamed(pending))

    def _unnamed(self, request_ids: Iterable[str]) -> Iterator[tuple[str, WorkerHandle]]:
        """The requests of `request_ids` still here on a worker no chunk has named, and it."""
        for request_id in request_ids:
            entry = self.requests.get(request_id)
            if entry is not None and entry.worker is not None \
                    and entry.announced is not entry.worker.id:
                yield request_id, entry.worker

    def _assign(self, entry: RoutedRequest, decision: Decision) -> None:
        worker = decision.worker
        entry.worker = worker
        pending = self.to_announce.get(entry.frontend)
        if pending is not None:
            pending.append(entry.request_id)
        entry.blocks = decision.request_blocks
        entry.prefill_blocks = decision.request_blocks - decision.overlap
        entry.hashes = decision.hashes
        usage = worker.usage
        usage.requests.add(entry.request_id)
        usage.active_blocks += entry.blocks
        if entry.prefill_blocks:
            if usage.pending_prefill_blocks <= 0:
                usage.batch_started_at = self._clock()  # an idle worker starts on it at once
                usage.batch_blocks = entry.prefill_blocks
            elif not usage.queued_since:
                usage.queued_since = self._clock()  # it waits for the running step
        usage.pending_prefill_blocks += entry.prefill_blocks
        self._changed(worker)

    def _release(self, entry: RoutedRequest) -> None:
        worker, entry.worker = entry.worker, None
        if worker is not None:
            usage = worker.usage
            usage.requests.discard(entry.request_id)
            usage.active_blocks -= entry.blocks
            usage.pending_prefill_blocks -= entry.prefill_blocks
            usage.batch_blocks = min(usage.batch_blocks, usage.pending_prefill_blocks)
            if usage.pending_prefill_blocks <= usage.batch_blocks:
                usage.queued_since = 0.0  # nothing waits behind the running step any more
            usage.released_at = self._clock() + self._report_period_s
            self._changed(worker)
        entry.prefill_blocks = 0

    def _changed(self, worker: WorkerHandle) -> None:
        if self._on_change is not None:
            self._on_change(worker)
