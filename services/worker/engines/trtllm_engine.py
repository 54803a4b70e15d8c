"""`TrtllmEngine`: TensorRT-LLM's `LLM` API inside the worker process (GPU only).

Requests go in as token ids (prompt + tokens generated elsewhere) to `generate_async(...,
streaming=True)` with detokenization off; each streamed result carries the cumulative output ids,
so the adapter sends the new tail. Block reuse and KV cache events are switched on with blocks of
our size; the events (`get_kv_cache_events_async`, Python dicts) are turned into vLLM's event
structs and re-hashed by the shared translator.

Owns TensorRT-LLM's configuration from `RealEngineConfig` (the flags vllm, sglang and trtllm
share; `--engine-args` takes `--name value` pairs, values read as JSON where they parse, passed as
`LLM(...)` keyword arguments) and the translation of its outputs and events. Imported only when
`--engine trtllm` is chosen; TensorRT-LLM itself is imported when the engine starts, so the
translation helpers here are testable without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator
from typing import Any

from common.block_hash import DEFAULT_SEED
from common.messages import GenerateRequest, SamplingParams
from services.worker.engines.real_engine_config import RealEngineConfig
from services.worker.engines.stream_engine import Delta, StreamingEngine
from services.worker.engines.vllm_kv_events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
)

KV_EVENT_BUFFER = 1 << 16
_PRIMARY_CACHE_LEVEL = 0  # device memory; other levels are offload tiers


def parse_engine_args(argv: list[str]) -> dict[str, Any]:
    """`--max-batch-size 8 --enable-chunked-prefill --kv-cache-config '{"x": 1}'` →
    `{"max_batch_size": 8, "enable_chunked_prefill": True, "kv_cache_config": {"x": 1}}`."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"TensorRT-LLM engine args: expected --name, got {arg!r}")
        name, eq, inline = arg[2:].partition("=")
        key = name.replace("-", "_")
        if eq:
            raw: str | None = inline
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            i += 1
            raw = argv[i]
        else:
            raw = None
        if raw is None:
            out[key] = True
        else:
            try:
                out[key] = json.loads(raw)
            except ValueError:
                out[key] = raw
        i += 1
    return out


def llm_kwargs(config: RealEngineConfig, model: str, block_size: int,
               shared: dict[str, int]) -> dict[str, Any]:
    """`LLM(...)` keyword arguments: ours, then `--engine-args` (a `kv_cache_config` dict there
    is merged into ours, so block reuse and events stay on unless it says otherwise)."""
    kv: dict[str, Any] = {"enable_block_reuse": True, "event_buffer_max_size": KV_EVENT_BUFFER,
                          "tokens_per_block": block_size}
    if config.gpu_memory_utilization > 0:
        kv["free_gpu_memory_fraction"] = config.gpu_memory_utilization
    kwargs: dict[str, Any] = {"model": model, "skip_tokenizer_init": True}
    names = {"max_model_len": "max_seq_len", "max_num_seqs": "max_batch_size",
             "max_num_batched_tokens": "max_num_tokens"}
    for name, value in shared.items():
        kwargs[names[name]] = value
    if config.enforce_eager:
        kwargs["cuda_graph_config"] = None
    extra = parse_engine_args(config.extra_argv())
    user_kv = extra.pop("kv_cache_config", None)
    if isinstance(user_kv, dict):
        kv.update(user_kv)
    kwargs.update(extra)
    kwargs["kv_cache_config"] = kv  # a dict here; `KvCacheConfig` once TensorRT-LLM is loaded
    return kwargs


def sampling_params(sp: SamplingParams, max_tokens: int, min_tokens: int) -> Any:
    from tensorrt_llm import SamplingParams as TrtSamplingParams

    return TrtSamplingParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens or None,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k if sp.top_k > 0 else None,
        min_p=sp.min_p or None,
        seed=sp.seed,
        stop_token_ids=list(sp.stop_token_ids) or None,
        ignore_eos=sp.ignore_eos,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty,
        detokenize=False,
        return_perf_metrics=True,  # the KV reuse count, where `cached_tokens` is missing
    )


def block_events(event: dict[str, Any], block_size: int) -> list[VllmEvent]:
    """One TensorRT-LLM KV cache event dict as vLLM-style block events."""
    data = event.get("data") or {}
    kind = data.get("type")
    if kind == "stored":
        blocks = [b for b in data.get("blocks", [])
                  if b.get("cache_level", _PRIMARY_CACHE_LEVEL) == _PRIMARY_CACHE_LEVEL]
        if not blocks:
            return []
        tokens = [t["token_id"] for b in blocks for t in b.get("tokens", [])]
        return [VllmBlockStored([b["block_hash"] for b in blocks], data.get("parent_hash"),
                                tokens, block_size)]
    if kind == "removed":
        return [VllmBlockRemoved(list(data.get("block_hashes", [])))]
    if kind == "cleared":
        return [VllmAllBlocksCleared()]
    return []  # "created", "updated": nothing the index needs


class TrtllmEngine(StreamingEngine):
    name = "trtllm"

    def __init__(self, config: RealEngineConfig, model: str, *, block_size: int = 64,
                 hash_seed: int = DEFAULT_SEED, shared: dict[str, int] | None = None) -> None:
        if importlib.util.find_spec("tensorrt_llm") is None:
            raise ImportError("TensorRT-LLM is not installed")
        super().__init__(block_size=block_size, hash_seed=hash_seed)
        config.validate()
        self.config = config
        self.model = model
        self._shared = dict(shared or {})
        self._llm: Any = None
        self._streams: dict[str, Any] = {}  # request id → TensorRT-LLM's result handle

    async def _launch(self) -> None:
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        kwargs = llm_kwargs(self.config, self.model, self.block_size, self._shared)
        kv = kwargs["kv_cache_config"]
        kwargs["kv_cache_config"] = KvCacheConfig(**kv)
        # TensorRT-LLM binds its result queues to the loop that first awaits them; building the
        # LLM on the loop (before the worker registers) keeps everything on one loop.
        self._llm = llm = LLM(**kwargs)
        self.block_size = int(kv["tokens_per_block"])
        args = getattr(llm, "args", None)
        self.max_model_len = int(getattr(args, "max_seq_len", 0) or 0) or \
            self._shared.get("max_model_len", 0)
        if not self.max_model_len:
            raise ValueError("trtllm: could not learn the context length; pass --max-model-len")

    def _on_ready(self) -> None:
        self._spawn(self._read_kv_events(), "trtllm-kv-events")

    async def _read_kv_events(self) -> None:
        while True:
            got = 0
            async for event in self._llm.get_kv_cache_events_async(timeout=5):
                got += 1
                if isinstance(event, dict):
                    self.deliver_block_events(block_events(event, self.block_size))
            if not got:  # an idle poll can return at once: never spin on it
                await asyncio.sleep(0.5)

    async def _stream(self, request: GenerateRequest, max_tokens: int,
                      min_tokens: int) -> AsyncIterator[Delta]:
        prompt = [*request.token_ids, *request.generated_token_ids]
        result = self._llm.generate_async(
            prompt, sampling_params=sampling_params(request.sampling, max_tokens, min_tokens),
            streaming=True)
        rid = request.request_id
        self._streams[rid] = result
        seen = 0
        first = True
        try:
            async for out in result:
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                new, seen = ids[seen:], len(ids)
                cached = _cached_tokens(out, len(prompt), self.block_size) if first else 0
                first = False
                reason = completion.finish_reason if out.finished else None
                yield Delta(new, str(reason) if reason is not None else None, cached)
        except asyncio.CancelledError:
            raise  # an abort: `_abort_native` still needs the handle
        except BaseException:
            self._streams.pop(rid, None)
            raise
        self._streams.pop(rid, None)

    async def _abort_native(self, request_id: str) -> None:
        result = self._streams.pop(request_id, None)
        if result is not None:
            result.abort()

    async def _close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()


def _cached_tokens(out: Any, prompt_len: int, block_size: int) -> int:
    cached = getattr(out, "cached_tokens", None)
    if isinstance(cached, int):
        return cached
    metrics = getattr(out.outputs[0], "request_perf_metrics", None)
    kv = getattr(metrics, "kv_cache_metrics", None)
    reused = getattr(kv, "num_reused_blocks", 0) or 0
    return min(prompt_len, int(reused) * block_size)
