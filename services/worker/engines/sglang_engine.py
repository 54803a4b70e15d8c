"""`SglangEngine`: SGLang's offline `Engine` inside the worker process (GPU only).

Requests go in as `input_ids` (prompt + tokens generated elsewhere) with `stream=True`; SGLang runs
without its tokenizer (`skip_tokenizer_init`: the frontend owns text) and with pages of our
block size, so its radix cache publishes full blocks. Its KV events are vLLM's wire format on a
private ipc socket, read and re-hashed by `vllm_kv_events`.

Owns SGLang's configuration from `RealEngineConfig` (the flags vllm, sglang and trtllm share;
`--engine-args` is parsed by SGLang's own `ServerArgs` parser) and the translation of its stream
items into deltas.
Imported only when `--engine sglang` is chosen; SGLang itself is imported when the engine starts,
so the translation helpers here are testable without it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator
from typing import Any

import zmq.asyncio

from common.block_hash import DEFAULT_SEED
from common.messages import GenerateRequest, SamplingParams
from services.worker.engines.real_engine_config import RealEngineConfig
from services.worker.engines.scratch_dir import ScratchDir, sweep_orphans
from services.worker.engines.stream_engine import Delta, StreamingEngine
from services.worker.engines.vllm_kv_events import KvEventSubscriber

SCRATCH_PREFIX = "turnout-sglang-"


def sampling_params(sp: SamplingParams, max_tokens: int, min_tokens: int) -> dict[str, Any]:
    """Turnout's sampling parameters as SGLang's sampling dict."""
    params: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": min_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k if sp.top_k > 0 else -1,
        "min_p": sp.min_p,
        "stop_token_ids": list(sp.stop_token_ids),
        "ignore_eos": sp.ignore_eos,
        "presence_penalty": sp.presence_penalty,
        "frequency_penalty": sp.frequency_penalty,
        "repetition_penalty": sp.repetition_penalty,
        "no_stop_trim": True,
    }
    if sp.seed is not None:
        params["sampling_seed"] = sp.seed
    return params


def server_argv(config: RealEngineConfig, model: str, block_size: int, shared: dict[str, int],
                kv_events: dict[str, str]) -> list[str]:
    """SGLang's command line: our settings first, `--engine-args` last (those win)."""
    argv = ["--model-path", model, "--page-size", str(block_size), "--skip-tokenizer-init",
            "--kv-events-config", json.dumps(kv_events)]
    if config.gpu_memory_utilization > 0:
        argv += ["--mem-fraction-static", str(config.gpu_memory_utilization)]
    if config.enforce_eager:
        argv.append("--disable-cuda-graph")
    names = {"max_model_len": "--context-length", "max_num_seqs": "--max-running-requests",
             "max_num_batched_tokens": "--chunked-prefill-size"}
    for name, value in shared.items():
        argv += [names[name], str(value)]
    return argv + config.extra_argv()


def finish_type(meta: dict[str, Any]) -> str | None:
    """SGLang's finish reason (`{"type": "length", ...}` or None) as a plain string."""
    reason = meta.get("finish_reason")
    if reason is None:
        return None
    if isinstance(reason, dict):
        kind = reason.get("type")
        return "error" if kind == "abort" and reason.get("status_code", 0) >= 500 else kind
    return str(reason)


def _scheduler_info(engine: Any) -> dict[str, Any]:
    """What the scheduler reported at start-up (KV capacity), wherever this version keeps it;
    `get_server_info()` would block on the loop we run on."""
    info = getattr(engine, "scheduler_info", None)
    if isinstance(info, dict):
        return info
    init = getattr(engine, "_scheduler_init_result", None)
    infos = getattr(init, "scheduler_infos", None)
    return infos[0] if infos and isinstance(infos[0], dict) else {}


class SglangEngine(StreamingEngine):
    name = "sglang"

    def __init__(self, config: RealEngineConfig, model: str, *, block_size: int = 64,
                 hash_seed: int = DEFAULT_SEED, shared: dict[str, int] | None = None) -> None:
        if importlib.util.find_spec("sglang") is None:
            raise ImportError("SGLang is not installed")
        super().__init__(block_size=block_size, hash_seed=hash_seed)
        config.validate()
        self.config = config
        self.model = model
        self._shared = dict(shared or {})
        self._engine: Any = None
        self._tmp: ScratchDir | None = None
        self._zmq: zmq.asyncio.Context | None = None
        self._subscriber: KvEventSubscriber | None = None
        self._endpoints: tuple[str, str] = ("", "")

    async def _launch(self) -> None:
        import sglang
        from sglang.srt.server_args import ServerArgs

        # Those of workers killed before they could delete theirs go first.
        await asyncio.to_thread(sweep_orphans, SCRATCH_PREFIX)
        self._tmp = ScratchDir(SCRATCH_PREFIX)
        endpoint, replay = f"ipc://{self._tmp.path}/kv", f"ipc://{self._tmp.path}/kv-replay"
        kv_events = {"publisher": "zmq", "endpoint": endpoint, "replay_endpoint": replay,
                     "topic": "kv"}
        parser = argparse.ArgumentParser(prog="sglang engine args")
        ServerArgs.add_cli_args(parser)
        argv = server_argv(self.config, self.model, self.block_size, self._shared, kv_events)
        try:
            server_args = ServerArgs.from_cli_args(parser.parse_args(argv))
        except SystemExit as exc:
            raise ValueError(f"bad SGLang engine arguments: {' '.join(argv)}") from exc
        # SGLang's engine binds its tokenizer manager to the running loop, so it is built here,
        # on the loop (the worker registers only after `start`).
        self._engine = engine = sglang.Engine(server_args=server_args)
        self.block_size = server_args.page_size or self.block_size
        manager = engine.tokenizer_manager
        self.max_model_len = int(getattr(manager, "context_len", 0) or 0)
        model_config = getattr(manager, "model_config", None)
        self.vocab_size = int(getattr(model_config, "vocab_size", 0) or 0)
        total_tokens = int(_scheduler_info(engine).get("max_total_num_tokens", 0) or 0)
        self.num_blocks = total_tokens // self.block_size
        self._endpoints = (endpoint, replay)

    def _on_ready(self) -> None:
        assert self._translator is not None
        self._zmq = zmq.asyncio.Context()
        self._subscriber = KvEventSubscriber(self._zmq, *self._endpoints, self._translator,
                                             self.deliver_kv)
        self._spawn(self._subscriber.run(), "sglang-kv-events")

    async def _stream(self, request: GenerateRequest, max_tokens: int,
                      min_tokens: int) -> AsyncIterator[Delta]:
        stream = await self._engine.async_generate(
            input_ids=[*request.token_ids, *request.generated_token_ids],
            sampling_params=sampling_params(request.sampling, max_tokens, min_tokens),
            stream=True, rid=request.request_id)
        seen = 0
        first = True
        async for item in stream:
            meta = item.get("meta_info", {})
            ids = item.get("output_ids") or []
            total = int(meta.get("completion_tokens", seen + len(ids)))
            # Cumulative or incremental output ids (`incremental_streaming_output`): the count of
            # completion tokens says which tail is new either way.
            fresh = total - seen
            new = list(ids[len(ids) - fresh:]) if fresh > 0 else []
            seen = total
            cached = int(meta.get("cached_tokens", 0) or 0) if first else 0
            first = False
            yield Delta(new, finish_type(meta), cached)

    async def _abort_native(self, request_id: str) -> None:
        self._engine.tokenizer_manager.abort_request(rid=request_id)

    async def _close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.close()
        if self._zmq is not None:
            self._zmq.term()
        if self._engine is not None:
            self._engine.shutdown()
        if self._tmp is not None:
            self._tmp.remove()
            self._tmp = None

