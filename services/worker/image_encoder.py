"""An encode worker's service (`--worker-mode encode`): images in, embeddings out, each image's
embedding cached by its content hash.

A router sends `EncodeRequest`s (`KIND_ENCODE`); the answer is one `EncodeReply`
(`KIND_ENCODED`) per request, with every image's embedding in order. An image in the cache is
answered at once (a hit); the others go through the engine's encoder one at a time, as through
one accelerator, and are cached. The cache is an LRU capped in bytes (`--embedding-cache-mb`).
A `KIND_CANCEL` for the request id stops what is still queued.

Owns the cache, the queueing and the replies; not the encoder (the engine's `encode_image`) or
which encode worker gets an image (the router's `encode_routing.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from common.messages import (
    KIND_ENCODED,
    EncodeReply,
    EncodeRequest,
    ImageEmbedding,
    ImageInput,
    encoder,
)
from services.worker.engine import Engine, EngineError
from services.worker.metrics import WorkerMetrics

log = logging.getLogger("turnout.worker")

Send = Callable[[bytes, bytes, bytes], None]  # (upstream identity, kind, payload)


class EmbeddingCache:
    """Image hash → embedding, least recently used out first, at most `capacity` bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, image_hash: str) -> bytes | None:
        found = self._entries.get(image_hash)
        if found is not None:
            self._entries.move_to_end(image_hash)
        return found

    def put(self, image_hash: str, embedding: bytes) -> None:
        if len(embedding) > self.capacity:
            return  # larger than the whole cache: never kept
        old = self._entries.pop(image_hash, None)
        if old is not None:
            self.bytes -= len(old)
        self._entries[image_hash] = embedding
        self.bytes += len(embedding)
        while self.bytes > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted)


class ImageEncoder:
    def __init__(self, engine: Engine, cache_bytes: int, metrics: WorkerMetrics,
                 send: Send) -> None:
        self.engine = engine
        self.cache = EmbeddingCache(cache_bytes)
        self.metrics = metrics
        self.send = send
        self._encoder = asyncio.Lock()  # one image through the encoder at a time
        self._tasks: dict[str, set[asyncio.Task[None]]] = {}

    @property
    def busy(self) -> int:
        return len(self._tasks)

    def on_encode(self, ident: bytes, request: EncodeRequest) -> None:
        task = asyncio.create_task(self._serve(ident, request))
        # Several requests may share an id: a router re-sends a lost encode worker's images
        # to one that already encodes others of the same request.
        self._tasks.setdefault(request.request_id, set()).add(task)
        task.add_done_callback(lambda t, rid=request.request_id: self._done(rid, t))

    def cancel(self, request_id: str) -> None:
        for task in self._tasks.pop(request_id, ()):
            task.cancel()

    def _done(self, request_id: str, task: asyncio.Task[None]) -> None:
        tasks = self._tasks.get(request_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._tasks[request_id]

    async def _serve(self, ident: bytes, request: EncodeRequest) -> None:
        try:
            out = [await self._embedding(image) for image in request.images]
            reply = EncodeReply(request.request_id, out)
        except EngineError as exc:
            reply = EncodeReply(request.request_id, error_code=exc.code,
                                error_message=str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("encoding failed")
            reply = EncodeReply(request.request_id, error_code=500,
                                error_message=f"encoding failed: {type(exc).__name__}")
        payload = encoder.encode(reply)
        self.metrics.embedding_bytes_sent.inc(sum(len(e.embedding) for e in reply.embeddings))
        self.send(ident, KIND_ENCODED, payload)

    async def _embedding(self, image: ImageInput) -> ImageEmbedding:
        metrics = self.metrics
        found = self.cache.get(image.hash)
        if found is None:
            async with self._encoder:
                # Another request may have encoded the same image while this one queued.
                found = self.cache.get(image.hash)
                if found is None:
                    if not image.data:
                        raise EngineError(f"image {image.hash[:12]} came without its data", 400)
                    t0 = time.perf_counter()
                    embedding = await self.engine.encode_image(image)
                    metrics.encode_seconds.observe(time.perf_counter() - t0)
                    metrics.embedding_cache_misses.inc()
                    metrics.images.labels(**metrics.labels, source="encoded").inc()
                    self.cache.put(image.hash, embedding)
                    metrics.embedding_cache_bytes.set(self.cache.bytes)
                    return ImageEmbedding(image.hash, embedding, False)
        metrics.embedding_cache_hits.inc()
        metrics.images.labels(**metrics.labels, source="cache").inc()
        return ImageEmbedding(image.hash, found, True)
