"""Images in chat requests with real processes: frontend → router → encode workers → mocker
workers (aggregated, or a prefill and a decode worker), through the openai SDK; a stream with
an image migrated off a SIGKILLed worker.

The mocker's output depends only on the token sequence, and an image's placeholder tokens
derive from its content hash, so the same image gives the same text and a different image a
different prompt. What the tests watch is what an operator sees: the answer, its usage (cached
tokens), and the services' /metrics (encoder work, cache hits, in-line encodes).
"""

from __future__ import annotations

import asyncio
import io
import signal
from typing import Any

import openai
import pytest
from PIL import Image

from tests.images import data_uri, png
from turnout.testing.deployment import Deployment, Service, free_port, wait_for

pytestmark = pytest.mark.e2e

TOKENS = 16
BLOCK = ("--block-size", "16")


def image_message(uri: str, text: str = "what is in this picture?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": uri}}]}]


async def chat(url: str, messages: list[dict[str, Any]], stream: bool = False,
               max_tokens: int = TOKENS, target: str = "") -> tuple[str, Any]:
    """(text, usage) of one chat completion (`target`: the worker a gateway picked)."""
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    headers = {"x-worker-instance-id": target} if target else None
    if not stream:
        done = await oai.chat.completions.create(model="mock", messages=messages,  # type: ignore[arg-type]
                                                 max_tokens=max_tokens, extra_headers=headers,
                                                 extra_body={"ignore_eos": True})
        return done.choices[0].message.content or "", done.usage
    chunks = await oai.chat.completions.create(
        model="mock", messages=messages, max_tokens=max_tokens, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        extra_headers=headers)
    text, usage = "", None
    async for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


def total(services: list[Service], name: str, **labels: str) -> float:
    return sum(s.metrics().value(name, **labels) for s in services)


def cached(usage: Any) -> int:
    details = usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def test_image_chat_through_the_encode_pool(deployment: Deployment) -> None:
    deployment.start_router()
    encoders = [deployment.start_worker("--worker-mode", "encode", "--encode-ms-per-image", "20",
                                        *BLOCK, worker_id=f"e{i}") for i in (1, 2)]
    llm = deployment.start_worker(*BLOCK, worker_id="w1")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(3)
    red, blue = data_uri(png((200, 10, 10))), data_uri(png((10, 10, 200)))

    first, usage1 = asyncio.run(chat(deployment.url, image_message(red), stream=True))
    assert len(first) == TOKENS
    # 112x112 pixels: 16 placeholder tokens, on top of the text.
    assert usage1.prompt_tokens > 16
    assert total(encoders, "turnout_worker_embedding_cache_misses_total") == 1
    assert total(encoders, "turnout_worker_embedding_cache_hits_total") == 0
    router = deployment.router.metrics()
    assert router.value("turnout_router_images_total", path="encode_pool") == 1
    assert router.value("turnout_router_embedding_bytes_total") == 16 * 1024
    # The LLM worker got the embedding: it never encoded.
    assert llm.metrics().value("turnout_worker_images_total", source="inline") == 0

    again, usage2 = asyncio.run(chat(deployment.url, image_message(red)))
    assert again == first
    assert total(encoders, "turnout_worker_embedding_cache_misses_total") == 1  # not re-encoded
    assert total(encoders, "turnout_worker_embedding_cache_hits_total") == 1
    assert deployment.router.metrics().value("turnout_router_encode_routes_total",
                                             reason="affinity") == 1
    # The image's blocks are a prefix hit on the LLM worker.
    assert cached(usage2) >= (usage2.prompt_tokens - 1) // 16 * 16 - 16
    assert cached(usage2) > 16

    other, usage3 = asyncio.run(chat(deployment.url, image_message(blue)))
    assert len(other) == TOKENS
    assert total(encoders, "turnout_worker_embedding_cache_misses_total") == 2
    # Same text, different image: only the blocks before the image can be cached.
    assert cached(usage3) < cached(usage2)
    assert usage3.prompt_tokens == usage2.prompt_tokens


def test_bad_images_are_400s_naming_the_part(deployment: Deployment) -> None:
    closed = free_port()  # nothing listens there
    deployment.start(workers=1, frontend_args=(
        "--max-images-per-request", "2", "--image-url-hosts", "127.0.0.1",
        "--image-fetch-timeout-s", "2"))
    good = png((1, 2, 3))
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(jpeg, "JPEG")
    huge = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(huge, "PNG")
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=30)
    cases = {
        "truncated": (image_message(data_uri(good[: len(good) // 2])), "messages[0].content[1]"),
        "huge": (image_message(data_uri(huge.getvalue())), "messages[0].content[1]"),
        "mime mismatch": (image_message(data_uri(jpeg.getvalue(), "image/png")),
                          "messages[0].content[1]"),
        "gif": (image_message(data_uri(good, "image/gif")), "messages[0].content[1]"),
        "unreachable": (image_message(f"http://127.0.0.1:{closed}/cat.png"),
                        "messages[0].content[1]"),
        "host not allowed": (image_message("http://example.invalid/cat.png"),
                             "messages[0].content[1]"),
        "too many": ([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(good)}} for _ in range(3)]}],
            "messages[0].content[2]"),
    }
    for name, (messages, param) in cases.items():
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(model="mock", messages=messages, max_tokens=4)  # type: ignore[arg-type]
        body = info.value.body
        assert isinstance(body, dict), name
        assert body["param"] == param, (name, body)
        assert param in body["message"], (name, body)
    # The services are unaffected: a good image still works (in-line: no encode pool).
    text, _ = asyncio.run(chat(deployment.url, image_message(data_uri(good))))
    assert len(text) == TOKENS
    assert deployment.router.metrics().value("turnout_router_images_total", path="inline") == 1
    assert deployment.workers()[0].metrics().value(
        "turnout_worker_images_total", source="inline") == 1
    deployment.check_alive()


def test_encode_worker_killed_mid_request(deployment: Deployment) -> None:
    """SIGKILL an encode worker while it encodes: its images are encoded by the other one and
    every request completes."""
    deployment.start_router()
    victim = deployment.start_worker("--worker-mode", "encode", "--encode-ms-per-image", "1000",
                                     *BLOCK, worker_id="e1")
    survivor = deployment.start_worker("--worker-mode", "encode", "--encode-ms-per-image", "20",
                                       *BLOCK, worker_id="e2")
    deployment.start_worker(*BLOCK, worker_id="w1")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(3)
    images = [data_uri(png((i * 20, 255 - i * 20, 7))) for i in range(8)]

    async def run() -> list[tuple[str, Any]]:
        streams = asyncio.gather(*(chat(deployment.url, image_message(uri)) for uri in images))
        # e1 is encoding its first image (1 s each), with more queued behind it.
        await asyncio.to_thread(
            wait_for, lambda: deployment.router.metrics().value(
                "turnout_router_encode_routes_total", reason="least_loaded") >= 8
            , 20, "the images to be sent to the encode workers", interval=0.01)
        victim.signal(signal.SIGKILL)
        return await streams

    results = asyncio.run(run())
    assert all(len(text) == TOKENS for text, _ in results)
    router = deployment.router.metrics()
    assert router.value("turnout_router_reencodes_total") >= 1
    assert router.value("turnout_router_requests_total", outcome="finished") == 8
    # Its own images, and at least one that was e1's.
    assert survivor.metrics().value("turnout_worker_embedding_cache_misses_total") >= 5


def test_an_image_stream_migrated_mid_decode_keeps_its_images(deployment: Deployment) -> None:
    """SIGKILL the worker decoding an image chat (no encode pool): the stream goes on on the
    other worker, which gets the images with the prompt and tokens so far. It recomputes the
    prompt, so it encodes the image in-line (without it, an engine would compute the image's
    placeholders as text), and the text is the clean run's."""
    deployment.start_router()
    workers = [deployment.start_worker(*BLOCK, "--speedup-ratio", "1", worker_id=f"w{i}")
               for i in (1, 2)]
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(2)
    messages = image_message(data_uri(png((30, 140, 60))))

    async def run() -> tuple[tuple[str, Any], Service]:
        stream = asyncio.create_task(chat(deployment.url, messages, stream=True, max_tokens=300))
        victim = await asyncio.to_thread(
            wait_for, lambda: next((w for w in workers if w.metrics().value(
                "turnout_worker_decode_tokens_total") > 0), None), 30,
            "a worker to decode the image chat", interval=0.01)
        victim.signal(signal.SIGKILL)
        return await stream, victim

    (text, usage), victim = asyncio.run(run())
    survivor = next(w for w in workers if w is not victim)
    assert deployment.router.metrics().value("turnout_router_migrations_total",
                                             cause="crash") == 1
    assert survivor.metrics().value("turnout_worker_images_total", source="inline") == 1
    assert usage.completion_tokens == 300
    reference, _ = asyncio.run(chat(deployment.url, messages, stream=True, max_tokens=300,
                                    target=survivor.instance_id))
    assert text == reference


@pytest.mark.parametrize("encode_pool", [True, False], ids=["encode_pool", "inline"])
def test_image_chat_disaggregated(deployment: Deployment, encode_pool: bool) -> None:
    """A prefill worker computes an image chat's prompt (with the encode pool's embedding, or
    encoding the image in-line) and a decode worker pulls its KV: the decode worker computes
    no prompt token and encodes nothing, the cached image blocks serve the next request, and
    the text is the aggregated run's."""
    deployment.start_router("--disagg-mode", "always")
    if encode_pool:
        deployment.start_worker("--worker-mode", "encode", *BLOCK, worker_id="e1")
    prefill = deployment.start_worker("--worker-mode", "prefill", *BLOCK, worker_id="p1")
    decode = deployment.start_worker("--worker-mode", "decode", *BLOCK, worker_id="d1")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(3 if encode_pool else 2)
    messages = image_message(data_uri(png((200, 120, 10))))

    text, usage = asyncio.run(chat(deployment.url, messages, stream=True))
    assert len(text) == TOKENS and usage.completion_tokens == TOKENS
    assert decode.metrics().value("turnout_worker_prefill_tokens_total") == 0
    assert decode.metrics().value("turnout_worker_disagg_transfers_total",
                                  outcome="pulled") == 1
    assert decode.metrics().value("turnout_worker_images_total", source="inline") == 0
    assert prefill.metrics().value("turnout_worker_images_total",
                                   source="inline") == (0 if encode_pool else 1)
    path = "encode_pool" if encode_pool else "inline"
    assert deployment.router.metrics().value("turnout_router_images_total", path=path) == 1

    reference, again = asyncio.run(chat(deployment.url, messages, stream=True,
                                        target=decode.instance_id))
    assert text == reference
    # The decode worker holds the pulled prompt: the image's blocks are a prefix hit there.
    assert cached(again) == (again.prompt_tokens - 1) // 16 * 16
    assert decode.metrics().value("turnout_worker_images_total", source="inline") == 0
