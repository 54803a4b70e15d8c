"""The SGLang and TensorRT-LLM adapters: their translation helpers everywhere, the engines
themselves only on an NVIDIA GPU with the package installed (`pytest -m gpu`; skipped elsewhere).

The GPU tests use $TURNOUT_GPU_TEST_MODEL (a HF directory) or the tiny random-weight model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil

import pytest

from common.block_hash import DEFAULT_SEED, block_hashes
from common.messages import GenerateRequest, KvBlockStored, SamplingParams
from services.worker.engine import StepOutput
from services.worker.engines.sglang_engine import (
    SglangEngine,
    finish_type,
    server_argv,
)
from services.worker.engines.sglang_engine import sampling_params as sglang_sampling
from services.worker.engines.trtllm_engine import (
    TrtllmEngine,
    block_events,
    llm_kwargs,
    parse_engine_args,
)
from services.worker.engines.vllm_config import VllmConfig
from services.worker.engines.vllm_kv_events import (
    KvEventTranslator,
    VllmBlockRemoved,
    VllmBlockStored,
)

# -- helpers (no engine needed) -------------------------------------------------------------------


def test_sglang_sampling_and_argv() -> None:
    sp = SamplingParams(100, temperature=0.5, top_k=0, seed=7, stop_token_ids=[3],
                        repetition_penalty=1.1, min_p=0.05)
    params = sglang_sampling(sp, 40, 2)
    assert (params["max_new_tokens"], params["min_new_tokens"], params["top_k"]) == (40, 2, -1)
    assert params["min_p"] == 0.05
    assert (params["sampling_seed"], params["stop_token_ids"]) == (7, [3])
    argv = server_argv(VllmConfig(enforce_eager=True, gpu_memory_utilization=0.8,
                                  engine_args="--tp-size 2"), "/m", 64,
                       {"max_num_seqs": 16}, {"publisher": "zmq"})
    assert argv[:6] == ["--model-path", "/m", "--page-size", "64", "--skip-tokenizer-init",
                        "--kv-events-config"]
    assert argv[6:] == ['{"publisher": "zmq"}', "--mem-fraction-static", "0.8",
                        "--disable-cuda-graph", "--max-running-requests", "16", "--tp-size", "2"]


def test_sglang_finish_reasons() -> None:
    assert finish_type({"finish_reason": None}) is None
    assert finish_type({"finish_reason": {"type": "length", "length": 5}}) == "length"
    assert finish_type({"finish_reason": {"type": "stop", "matched": 2}}) == "stop"
    assert finish_type({"finish_reason": {"type": "abort", "status_code": 500}}) == "error"
    assert finish_type({}) is None


def test_trtllm_engine_args_and_kwargs() -> None:
    assert parse_engine_args(["--max-batch-size", "8", "--enable-chunked-prefill",
                              "--backend=pytorch", "--kv-cache-config",
                              '{"free_gpu_memory_fraction": 0.5}']) == {
        "max_batch_size": 8, "enable_chunked_prefill": True, "backend": "pytorch",
        "kv_cache_config": {"free_gpu_memory_fraction": 0.5}}
    with pytest.raises(ValueError):
        parse_engine_args(["stray"])
    kwargs = llm_kwargs(VllmConfig(engine_args="--kv-cache-config '{\"max_tokens\": 4096}'"),
                        "/m", 32, {"max_model_len": 2048})
    assert kwargs["model"] == "/m" and kwargs["max_seq_len"] == 2048
    assert kwargs["kv_cache_config"] == {"enable_block_reuse": True, "max_tokens": 4096,
                                         "event_buffer_max_size": 1 << 16,
                                         "tokens_per_block": 32}


def test_trtllm_events_become_turnout_blocks() -> None:
    tokens = list(range(50, 58))
    stored = {"event_id": 1, "data": {"type": "stored", "parent_hash": None, "blocks": [
        {"type": "stored_block", "block_hash": 11, "cache_level": 0,
         "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0}
                    for t in tokens[:4]]},
        {"type": "stored_block", "block_hash": 12, "cache_level": 0,
         "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0}
                    for t in tokens[4:]]}]}}
    events = block_events(stored, 4)
    assert events == [VllmBlockStored([11, 12], None, tokens, 4)]
    assert block_events({"data": {"type": "removed", "block_hashes": [12]}}, 4) == [
        VllmBlockRemoved([12])]
    assert block_events({"data": {"type": "created", "num_blocks_per_cache_level": [9]}}, 4) == []
    offloaded = {"data": {"type": "stored", "parent_hash": 12, "blocks": [
        {"block_hash": 13, "cache_level": 1, "tokens": []}]}}
    assert block_events(offloaded, 4) == []
    translator = KvEventTranslator(4, DEFAULT_SEED)
    assert translator.translate(events) == [
        KvBlockStored(block_hashes(tokens, 4, DEFAULT_SEED), None, tokens, 4)]


# -- the engines, on a GPU ------------------------------------------------------------------------


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def _model() -> str:
    from tests.tiny_model import cached_tiny_model

    return os.environ.get("TURNOUT_GPU_TEST_MODEL") or str(cached_tiny_model(with_weights=True))


ENGINES = {"sglang": (SglangEngine, "sglang"), "trtllm": (TrtllmEngine, "tensorrt_llm")}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(ENGINES))
def test_engine_streams_steps_and_publishes_blocks(name: str) -> None:
    cls, package = ENGINES[name]
    if not _has_gpu():
        pytest.skip("needs an NVIDIA GPU")
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install 'turnout[{name}]')")

    async def run() -> None:
        steps: list[StepOutput] = []
        changed = asyncio.Event()

        def sink(out: StepOutput) -> None:
            steps.append(out)
            changed.set()

        engine = cls(VllmConfig(gpu_memory_utilization=0.3), _model(), block_size=32)
        await asyncio.wait_for(engine.start(sink), 600)
        try:
            prompt = [(i * 13) % 1000 + 20 for i in range(100)]
            for rid in ("a", "b"):
                engine.add_request(GenerateRequest(
                    rid, "m", prompt, SamplingParams(8, temperature=0.0, ignore_eos=True)))

                async def finished(rid: str = rid) -> None:
                    while not any(c.request_id == rid and c.finish_reason
                                  for s in steps for c in s.chunks):
                        changed.clear()
                        await changed.wait()

                await asyncio.wait_for(finished(), 120)
            chunks = {rid: [c for s in steps for c in s.chunks if c.request_id == rid]
                      for rid in ("a", "b")}
            tokens = {rid: [t for c in cs for t in c.token_ids] for rid, cs in chunks.items()}
            assert len(tokens["a"]) == 8 and tokens["a"] == tokens["b"]  # greedy
            assert chunks["a"][0].num_prompt_tokens == 100
            assert chunks["b"][0].cached_tokens >= 64  # the repeat hit the prefix cache
            expected = block_hashes(prompt, engine.block_size, DEFAULT_SEED)
            await asyncio.sleep(1)
            stored = {h for s in steps for e in s.kv_events if type(e) is KvBlockStored
                      for h in e.block_hashes}
            assert set(expected) <= stored
        finally:
            await engine.shutdown()

    asyncio.run(run())
