"""`StreamingEngine`: the base of adapters whose engine streams per request (SGLang's
`async_generate(stream=True)`, TensorRT-LLM's `generate_async(streaming=True)`).

One task per request consumes the engine's stream and pushes each delta into a `StepGatherer`,
which flushes on the next event-loop turn: the deltas one engine iteration woke up leave as one
`StepOutput`. An abort drops the request from the gatherer first (nothing more is sent for it),
cancels its task and tells the engine. Block events, in the vLLM event structs, go through the
same translator as vLLM's, so every engine's KV events carry Turnout's block hashes.

Owns the per-request tasks and the `Engine` surface shared by those adapters. Does not own any
engine's API: a subclass builds its engine (`_launch`), opens one request's stream (`_stream`),
aborts natively (`_abort_native`) and closes it (`_close`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from common.block_hash import DEFAULT_SEED
from common.messages import GenerateRequest, KvBlockStored, KvEvent
from services.worker.engine import Engine, EngineError, EngineLoad, StepOutput, StepSink
from services.worker.engines.child_reaper import ChildReaper
from services.worker.engines.step_gatherer import (
    StepGatherer,
    Tracked,
    check_request,
    finish_reason,
    remaining_budget,
)
from services.worker.engines.vllm_kv_events import KvEventTranslator, VllmEvent

log = logging.getLogger("turnout.worker")


@dataclass(slots=True)
class Delta:
    """What one stream item adds: new token ids, the engine's finish reason on the last one,
    and (on the first) how many prompt tokens came from the prefix cache."""

    token_ids: list[int]
    finish_reason: str | None = None
    cached_tokens: int = 0


class StreamingEngine(Engine):
    name = "engine"

    def __init__(self, *, block_size: int = 64, hash_seed: int = DEFAULT_SEED) -> None:
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.max_model_len = 0  # set by `_launch`
        self.vocab_size = 0  # set by `_launch` where the engine says (0: unchecked)
        self.num_blocks = 0  # KV blocks of the engine's cache, where it says
        self._gather: StepGatherer | None = None
        self._translator: KvEventTranslator | None = None
        self._sink: StepSink | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper = ChildReaper()

    # -- what a subclass provides ------------------------------------------------------------------

    @abc.abstractmethod
    async def _launch(self) -> None:
        """Build the engine; set `block_size`, `max_model_len` and what else it reports."""

    @abc.abstractmethod
    def _stream(self, request: GenerateRequest, max_tokens: int,
                min_tokens: int) -> AsyncIterator[Delta]:
        """One request's deltas, over prompt + already generated tokens, for `max_tokens`."""

    @abc.abstractmethod
    async def _abort_native(self, request_id: str) -> None:
        """Tell the engine to drop a request (its stream task is already cancelled)."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Shut the engine down."""

    def _on_ready(self) -> None:
        """Called once the gatherer and KV translator exist (start event feeds here)."""

    def _running(self) -> int | None:
        """The engine's own count of running requests, if it has a cheap one."""
        return None

    def _kv_used_blocks(self) -> int:
        return 0

    # -- Engine ------------------------------------------------------------------------------------

    async def start(self, sink: StepSink) -> None:
        if self._gather is not None:
            raise RuntimeError(f"{self.name} engine already started")
        self._sink = sink
        self._reaper.mark()
        await self._launch()
        self._reaper.feed_new_children()  # the engine's processes die with us, even on SIGKILL
        self._gather = StepGatherer(sink, self.block_size)
        self._translator = KvEventTranslator(self.block_size, self.hash_seed)
        self._on_ready()
        log.info(f"{self.name} engine ready", extra={"fields": {
            "block_size": self.block_size, "max_model_len": self.max_model_len}})

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._gather is not None:
            await self._close()
        self._reaper.release()

    def add_request(self, request: GenerateRequest) -> None:
        gather = self._gather
        if gather is None:
            raise EngineError(f"the {self.name} engine is not started", 503)
        check_request(request, self.max_model_len, self.vocab_size)
        if request.sampling.logprobs >= 0 or request.sampling.prompt_logprobs >= 0:
            raise EngineError(f"logprobs are not supported on the {self.name} engine; the vllm "
                              f"and mocker engines return them")
        if request.sampling.logit_bias:
            raise EngineError(f"logit_bias is not supported on the {self.name} engine; the vllm "
                              f"and mocker engines apply it")
        if request.sampling.bad_words:
            raise EngineError(f"bad_words is not supported on the {self.name} engine; the vllm "
                              f"and mocker engines apply it")
        if request.sampling.allowed_token_ids:
            raise EngineError(f"allowed_token_ids is not supported on the {self.name} engine; "
                              f"the vllm and mocker engines apply it")
        if request.cache_salt:
            # Its events would carry blocks this translator hashes unsalted: the router would
            # then route salted requests by other tenants' prefixes.
            raise EngineError(f"cache_salt is not supported on the {self.name} engine; the vllm "
                              f"and mocker engines apply it")
        max_new, min_new = remaining_budget(request)
        tracked = gather.admit(request)
        if max_new <= 0:  # migrated with its whole budget already spent
            gather.push(request.request_id, [], "length")
            gather.flush_soon()
            return
        tracked.handle = self._spawn(self._consume(tracked, request, max_new, min_new),
                                     f"{self.name}-{request.request_id}")

    def abort(self, request_id: str) -> None:
        if self._gather is None:
            return
        tracked = self._gather.drop(request_id)
        if tracked is None:
            return
        if tracked.handle is not None:
            tracked.handle.cancel()
        self._spawn(self._abort_native(request_id), f"{self.name}-abort-{request_id}")

    def load(self) -> EngineLoad:
        if self._gather is None:
            return EngineLoad()
        return self._gather.load(self._running(), self._kv_used_blocks(), self.num_blocks)

    def steps_done(self) -> int:
        return self._gather.steps if self._gather is not None else 0

    def kv_dump(self) -> list[KvBlockStored]:
        return self._translator.dump() if self._translator is not None else []

    def cached_prefix(self, hashes: list[int]) -> int:
        return self._translator.cached_prefix(hashes) if self._translator is not None else 0

    # -- for subclasses ----------------------------------------------------------------------------

    def deliver_block_events(self, events: list[VllmEvent]) -> None:
        """The engine's block events (as vLLM's structs): re-hashed, then to the worker."""
        if self._translator is not None:
            self.deliver_kv(self._translator.translate(events))

    def deliver_kv(self, events: list[KvEvent]) -> None:
        """Block events already in Turnout's terms, to the worker."""
        if self._sink is not None and events:
            self._sink(StepOutput(kv_events=events))

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    # -- internals ---------------------------------------------------------------------------------

    async def _consume(self, tracked: Tracked, request: GenerateRequest, max_new: int,
                       min_new: int) -> None:
        gather = self._gather
        assert gather is not None
        rid = tracked.request_id
        try:
            async for delta in self._stream(request, max_new, min_new):
                if gather.requests.get(rid) is not tracked:
                    return  # aborted
                reason = finish_reason(delta.finish_reason)
                gather.push(rid, delta.token_ids, reason, delta.cached_tokens)
                gather.flush_soon()
                if reason is not None:
                    return
            if gather.requests.get(rid) is tracked:
                gather.fail(rid, 500, f"{self.name}: the stream ended without a finish reason")
                gather.flush_soon()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("request failed in the engine",
                        extra={"fields": {"request": rid, "error": repr(exc)}})
            gather.fail(rid, 500, f"{self.name}: {exc}")
            gather.flush_soon()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("engine task %s failed", task.get_name(), exc_info=task.exception())
