"""Images through the encode pool: a request's images go to encode workers before the request
goes to a prefill, decode or aggregated worker.

When encode workers (`--worker-mode encode`) serve a request's model, every image of it that
has no embedding yet is sent to one of them (`KIND_ENCODE`): to the encode worker this router
last sent the same image (its embedding cache holds it, the same idea as KV-aware routing),
otherwise to the one with the fewest images outstanding. Once every embedding is back
(`KIND_ENCODED`) the request, its images now carrying embeddings instead of file bytes, is
placed as any other (`Streams.on_generate`), so the LLM worker never runs the encoder. An
encode worker lost mid-request: its images are re-sent to another encode worker; with none
left, the request goes on with the images still unencoded and its LLM worker encodes them
in-line, as it does when no encode pool exists. A request is never failed for want of an
encode worker.

The shape is disaggregation's (`disaggregation.py`): a stage before placement, state per
request until the hand-off, re-run on loss. Owns the encode worker's pick, the pending table
and its metrics; not placement (`streams.py`), sockets or the encoder (the workers).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from common.messages import (
    KIND_CANCEL,
    KIND_ENCODE,
    MODE_ENCODE,
    Cancel,
    EncodeReply,
    EncodeRequest,
    GenerateRequest,
    ImageInput,
    encoder,
)
from services.router.worker_pool import WorkerHandle, WorkerPool

Place = Callable[[bytes, GenerateRequest, bytes], None]  # (frontend, request, its payload)
Fail = Callable[[bytes, str, int, str], None]  # (frontend, request id, code, message)

# How many image hashes the affinity table remembers (least recently sent go first).
AFFINITY_ENTRIES = 65536


class EncodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.images = Counter(
            "turnout_router_images",
            "Images of requests this router placed, by path: encode_pool (an encode worker "
            "embedded it) or inline (no encode worker serves the model: the LLM worker encodes)",
            ["path"], registry=r)
        self.routes = Counter(
            "turnout_router_encode_routes",
            "Images sent to an encode worker, by why it was chosen: affinity (it was sent the "
            "same image before) or least_loaded", ["reason"], registry=r)
        self.cache = Counter(
            "turnout_router_embedding_cache",
            "Embeddings received from encode workers, by result: hit (from the worker's "
            "embedding cache) or miss (encoded)", ["result"], registry=r)
        self.bytes = Counter("turnout_router_embedding_bytes",
                             "Embedding bytes received from encode workers (and forwarded with "
                             "the request to its LLM worker)", registry=r)
        self.reencodes = Counter(
            "turnout_router_reencodes",
            "Images re-sent to another encode worker because theirs was lost", registry=r)
        self.seconds = Histogram(
            "turnout_router_encode_seconds",
            "From a request's arrival to its last embedding (the encode stage's share of TTFT)",
            registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


@dataclasses.dataclass(slots=True)
class PendingEncode:
    frontend: bytes
    request: GenerateRequest
    started: float
    embeddings: dict[str, bytes] = dataclasses.field(default_factory=dict)  # hash → embedding
    sent: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # worker → hashes


class EncodeRouting:
    def __init__(self, pool: WorkerPool, registry: CollectorRegistry, place: Place,
                 fail: Fail, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.metrics = EncodeMetrics(registry)
        self.place = place
        self.fail = fail
        self.clock = clock
        self.pending: dict[str, PendingEncode] = {}
        self.outstanding: dict[str, int] = {}  # encode worker id → images sent, not answered
        self.affinity: OrderedDict[str, str] = OrderedDict()  # image hash → encode worker id
        self._turn = 0  # rotates ties among equally loaded encode workers

    def encoders(self, model: str, exclude: str = "") -> list[WorkerHandle]:
        return [w for w in self.pool.encoders(model) if w.id != exclude]

    # -- arrival -------------------------------------------------------------------------------

    def takes(self, frontend: bytes, request: GenerateRequest) -> bool:
        """True when `request` waits for encode workers first (this stage places it later);
        False: place it now (nothing to encode, or no encode pool: its worker encodes)."""
        todo = [im for im in request.images if not im.embedding]
        if not todo:
            return False
        if request.request_id in self.pending:
            self.fail(frontend, request.request_id, 400, "duplicate request id")
            return True
        if not self.encoders(request.model):
            self.metrics.images.labels("inline").inc(len(todo))
            return False
        self.metrics.images.labels("encode_pool").inc(len(todo))
        entry = PendingEncode(frontend, request, self.clock())
        self.pending[request.request_id] = entry
        self._send(entry, todo)
        if not entry.sent:
            self._finish(entry)
        return True

    def _send(self, entry: PendingEncode, images: list[ImageInput], exclude: str = "") -> None:
        """Each distinct image to an encode worker (none left: they stay unencoded, and the
        request's LLM worker encodes them). The caller finishes the entry when nothing is
        outstanding."""
        candidates = self.encoders(entry.request.model, exclude)
        if not candidates:
            return
        by_worker: dict[str, list[ImageInput]] = {}
        handles = {w.id: w for w in candidates}
        seen: set[str] = set()
        for image in images:
            if image.hash in seen or image.hash in entry.embeddings:
                continue
            seen.add(image.hash)
            worker = self._choose(image.hash, candidates, handles)
            by_worker.setdefault(worker.id, []).append(image)
            self.outstanding[worker.id] = self.outstanding.get(worker.id, 0) + 1
        rid = entry.request.request_id
        for worker_id, batch in by_worker.items():
            entry.sent.setdefault(worker_id, []).extend(im.hash for im in batch)
            handles[worker_id].socket.send_multipart(
                [KIND_ENCODE, encoder.encode(EncodeRequest(rid, batch))])

    def _choose(self, image_hash: str, candidates: list[WorkerHandle],
                handles: dict[str, WorkerHandle]) -> WorkerHandle:
        known = self.affinity.get(image_hash)
        if known is not None and known in handles:
            self.affinity.move_to_end(image_hash)
            self.metrics.routes.labels("affinity").inc()
            return handles[known]
        self._turn += 1
        n = len(candidates)
        worker = min(candidates, key=lambda w: (
            self.outstanding.get(w.id, 0), (candidates.index(w) - self._turn) % n))
        self.affinity[image_hash] = worker.id
        self.affinity.move_to_end(image_hash)
        if len(self.affinity) > AFFINITY_ENTRIES:
            self.affinity.popitem(last=False)
        self.metrics.routes.labels("least_loaded").inc()
        return worker

    # -- replies -------------------------------------------------------------------------------

    def on_reply(self, worker: WorkerHandle, reply: EncodeReply) -> None:
        """One EncodeRequest's answer (a worker may hold several of one request: its own
        images and another's re-sent after a loss)."""
        entry = self.pending.get(reply.request_id)
        hashes = entry.sent.get(worker.id) if entry is not None else None
        if entry is None or hashes is None:
            return  # cancelled, or re-sent elsewhere after this worker was declared lost
        if reply.error_code:
            self.cancel(reply.request_id)
            self.fail(entry.frontend, reply.request_id, reply.error_code,
                      reply.error_message or "image encoding failed")
            return
        answered = 0
        for item in reply.embeddings:
            if item.hash not in hashes:
                continue
            hashes.remove(item.hash)
            answered += 1
            entry.embeddings[item.hash] = item.embedding
            self.metrics.cache.labels("hit" if item.cached else "miss").inc()
            self.metrics.bytes.inc(len(item.embedding))
        self._returned(worker.id, answered)
        if not hashes:
            del entry.sent[worker.id]
        if not entry.sent:
            self._finish(entry)

    def _finish(self, entry: PendingEncode) -> None:
        request = entry.request
        del self.pending[request.request_id]
        self.metrics.seconds.observe(self.clock() - entry.started)
        images = [msgspec.structs.replace(im, data=b"", mime="",
                                          embedding=entry.embeddings[im.hash])
                  if im.hash in entry.embeddings else im for im in request.images]
        request = msgspec.structs.replace(request, images=images)
        self.place(entry.frontend, request, encoder.encode(request))

    def _returned(self, worker_id: str, images: int) -> None:
        left = self.outstanding.get(worker_id, 0) - images
        if left > 0:
            self.outstanding[worker_id] = left
        else:
            self.outstanding.pop(worker_id, None)

    # -- cancels and faults --------------------------------------------------------------------

    def cancel(self, request_id: str) -> bool:
        """Drop a request still waiting for embeddings; False when it is not here."""
        entry = self.pending.pop(request_id, None)
        if entry is None:
            return False
        frame = [KIND_CANCEL, encoder.encode(Cancel(request_id))]
        for worker_id, hashes in entry.sent.items():
            self._returned(worker_id, len(hashes))
            worker = self.pool.workers.get(worker_id)
            if worker is not None:
                worker.socket.send_multipart(frame)
        return True

    def worker_lost(self, worker: WorkerHandle) -> None:
        """An encode worker is gone: what it was encoding goes to another one."""
        if worker.mode != MODE_ENCODE:
            return
        self.outstanding.pop(worker.id, None)
        for image_hash in [h for h, w in self.affinity.items() if w == worker.id]:
            del self.affinity[image_hash]
        for entry in list(self.pending.values()):
            hashes = entry.sent.pop(worker.id, None)
            if hashes is None:
                continue
            self.metrics.reencodes.inc(len(hashes))
            self._send(entry, [im for im in entry.request.images if im.hash in hashes],
                       exclude=worker.id)
            if not entry.sent:
                self._finish(entry)
