"""Image encoding on workers: the encode worker's embedding cache and queue, and the mocker's
in-line encoding (charged in the step that admits the request) when no embedding came."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from common.messages import (
    KIND_ENCODED,
    EncodeRequest,
    GenerateRequest,
    ImageInput,
    SamplingParams,
    encode_reply_decoder,
)
from services.worker.engine import StepOutput
from services.worker.engines.mocker.config import MockerConfig
from services.worker.engines.mocker.engine import MockerEngine, embedding_stand_in
from services.worker.image_encoder import EmbeddingCache, ImageEncoder
from services.worker.metrics import WorkerMetrics


def image(tag: str, offset: int = 0, tokens: int = 4, embedded: bool = False) -> ImageInput:
    digest = hashlib.sha256(tag.encode()).hexdigest()
    return ImageInput(digest, offset, tokens, "image/png", b"png" if not embedded else b"",
                      b"emb" if embedded else b"")


def test_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = EmbeddingCache(10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")  # 12 bytes > 10: b goes
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    assert cache.bytes == 8
    cache.put("huge", b"x" * 11)  # larger than the cache: never kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2


def test_stand_in_is_deterministic_and_sized() -> None:
    a = embedding_stand_in(image("a").hash, 4, 8)
    assert a == embedding_stand_in(image("a").hash, 4, 8) and len(a) == 32
    assert a != embedding_stand_in(image("b").hash, 4, 8)


@pytest.mark.asyncio
async def test_encode_worker_answers_from_its_cache_the_second_time() -> None:
    engine = MockerEngine(MockerConfig(speedup_ratio=0.0, embedding_bytes_per_token=8))
    metrics = WorkerMetrics("e1", "m")
    replies: list[tuple[bytes, bytes, bytes]] = []
    got = asyncio.Event()

    def send(ident: bytes, kind: bytes, payload: bytes) -> None:
        replies.append((ident, kind, payload))
        got.set()

    encoder = ImageEncoder(engine, 1 << 20, metrics, send)

    async def ask(rid: str, *images: ImageInput) -> list[tuple[bytes, bool]]:
        got.clear()
        encoder.on_encode(b"router", EncodeRequest(rid, list(images)))
        async with asyncio.timeout(5):
            await got.wait()
        ident, kind, payload = replies[-1]
        assert (ident, kind) == (b"router", KIND_ENCODED)
        reply = encode_reply_decoder.decode(payload)
        assert reply.request_id == rid and not reply.error_code
        return [(e.embedding, e.cached) for e in reply.embeddings]

    first = await ask("r1", image("a"), image("b"))
    assert [c for _, c in first] == [False, False]
    assert first[0][0] == embedding_stand_in(image("a").hash, 4, 8)
    again = await ask("r2", image("a"))
    assert again == [(first[0][0], True)]
    assert metrics.embedding_cache_hits._value.get() == 1
    assert metrics.embedding_cache_misses._value.get() == 2
    assert metrics.embedding_bytes_sent._value.get() == 3 * 32
    # An image the cache lacks, sent without its data: the request fails, said so.
    got.clear()
    encoder.on_encode(b"router", EncodeRequest("r3", [ImageInput(image("c").hash, 0, 4)]))
    async with asyncio.timeout(5):
        await got.wait()
    assert encode_reply_decoder.decode(replies[-1][2]).error_code == 400


@pytest.mark.asyncio
async def test_mocker_charges_in_line_encoding_once_and_not_for_embedded_images() -> None:
    engine = MockerEngine(MockerConfig(speedup_ratio=0.0, encode_ms_per_image=500.0,
                                       block_size=4))
    steps: list[StepOutput] = []
    done = asyncio.Event()

    def sink(out: StepOutput) -> None:
        steps.append(out)
        if any(c.finish_reason for c in out.chunks):
            done.set()

    await engine.start(sink)

    async def run(rid: str, *images: ImageInput) -> list[tuple[float, int]]:
        done.clear()
        steps.clear()
        engine.add_request(GenerateRequest(rid, "m", list(range(100, 120)),
                                           SamplingParams(max_tokens=2), images=list(images)))
        async with asyncio.timeout(5):
            await done.wait()
        return [(s.forward_pass.duration_ms, s.images_encoded) for s in steps
                if s.forward_pass is not None]

    try:
        inline = await run("r1", image("a", offset=4, tokens=8))
        assert inline[0][0] > 500 > inline[-1][0]  # the admitting step carries the encoder
        assert [n for _, n in inline] == [1] + [0] * (len(inline) - 1)
        embedded = await run("r2", image("b", offset=4, tokens=8, embedded=True))
        assert all(ms < 500 and n == 0 for ms, n in embedded)
        # Same tokens again: the image's placeholders are all in the prefix cache.
        cached = await run("r3", image("a", offset=4, tokens=8))
        assert all(ms < 500 and n == 0 for ms, n in cached)
    finally:
        await engine.shutdown()
