"""`MockerEngine`: the built-in simulated engine behind the worker's `Engine` interface.

An asyncio loop steps the scheduler: plan a step, sleep for the timing model's duration divided by
the speed-up ratio (ratio 0: no sleep, just a yield to the event loop), apply the step, and hand
its chunks, KV events and forward-pass record to the worker's sink in one `StepOutput`. When there
is nothing to do the loop waits on an event that `add_request` sets: no busy spin, no periodic
wake-ups. `ForwardPass.duration_ms` is the modelled time of the step (not divided by the speed-up
ratio), so records compare across speed-ups.

Steps end on a chained deadline, so when the process loses the CPU (a busy host) the time it
owes is repaid: later steps skip their sleep until the clock is back on the model's schedule.
Only debt past `--max-time-debt-ms` is dropped, and counted. A step sleeps on a thread
(`PreciseSleep`), not on the event loop's timers, which count whole milliseconds.

Owns the loop, request validation and the `Engine` surface; scheduling, caching, token choice and
timing live in the sibling modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from common.messages import (
    SCHEDULING_PRIORITY,
    ForwardPass,
    GenerateRequest,
    ImageInput,
    KvBlockStored,
    TokenChunk,
)
from services.worker.engine import Engine, EngineError, EngineLoad, StepOutput, StepSink
from services.worker.engines.mocker import timing
from services.worker.engines.mocker.config import MockerConfig
from services.worker.engines.mocker.kv_pool import KvPool
from services.worker.engines.mocker.scheduler import Scheduler
from services.worker.engines.mocker.sequence import Sequence
from services.worker.engines.mocker.token_model import TokenModel

log = logging.getLogger(__name__)

_MAX_TOKEN_ID = (1 << 32) - 1  # block hashes pack token ids as uint32

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class PreciseSleep:
    """Sleeps to a tenth of a millisecond. The event loop's timers (uvloop's, from libuv) count
    whole milliseconds from a time cached per loop iteration, so a 6.25 ms step lasted 6 or 7
    ms and the chained deadline alternated them: a +-1 ms spread of every inter-token gap that
    the timing model does not have. One thread sleeps instead and wakes the loop when the step
    is done (a few microseconds of CPU per step)."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mocker-step")

    async def __call__(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        await asyncio.get_running_loop().run_in_executor(self._thread, time.sleep, seconds)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


class MockerEngine(Engine):
    def __init__(self, config: MockerConfig | None = None, *, clock: Clock | None = None,
                 sleep: Sleep | None = None) -> None:
        """`clock`/`sleep` pace the steps (tests pass fakes); default: `time.perf_counter`
        and `PreciseSleep`."""
        self.config = config if config is not None else MockerConfig()
        c = self.config
        c.validate()  # again: callers may have edited fields after construction
        self.block_size = c.block_size
        self.max_model_len = c.max_model_len
        self.hash_seed = c.hash_seed
        self.scheduling_policy = c.scheduling_policy
        lo, hi = c.output_range()
        self.model = TokenModel(lo, hi, c.eos_token_id, c.mean_output_tokens)
        self.pool = KvPool(c.num_blocks, c.block_size, c.hash_seed)
        self.scheduler = Scheduler(self.pool, self.model, c.max_num_seqs,
                                   c.max_num_batched_tokens,
                                   priority=c.scheduling_policy == SCHEDULING_PRIORITY)
        self._max_token_id = c.vocab_size - 1 if c.vocab_size > 0 else _MAX_TOKEN_ID
        self._wakeup = asyncio.Event()
        self._sink: StepSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._steps = 0
        self._clock: Clock = clock if clock is not None else time.perf_counter
        self._precise: PreciseSleep | None = None
        if sleep is None:
            sleep = self._precise = PreciseSleep()
        self._sleep: Sleep = sleep
        self._debt_s = 0.0
        self._dropped_s = 0.0

    # -- Engine ------------------------------------------------------------------------------

    async def start(self, sink: StepSink) -> None:
        if self._task is not None:
            raise RuntimeError("mocker engine already started")
        self._sink = sink
        await self._load()
        self._task = asyncio.create_task(self._run(), name="mocker-engine")
        self._task.add_done_callback(self._on_loop_exit)

    async def _load(self) -> None:
        """Stands in for a real engine's model load: `startup_time_s` of waiting, said each
        second, so what waits for workers (readiness, `turnout up`) meets one that is slow."""
        left = self.config.startup_time_s
        while left > 0:
            log.info("loading model (simulated)", extra={"fields": {"seconds_left": f"{left:.0f}"}})
            await asyncio.sleep(min(1.0, left))
            left -= 1.0

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._precise is not None:
            self._precise.close()

    def add_request(self, request: GenerateRequest) -> None:
        self._validate(request)
        self.scheduler.add(Sequence(request, self.model))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        if self.scheduler.abort(request_id):
            self._wakeup.set()  # room may have opened for a stalled loop

    def load(self) -> EngineLoad:
        return self.scheduler.load()

    def steps_done(self) -> int:
        return self._steps

    def kv_dump(self) -> list[KvBlockStored]:
        return self.pool.dump()

    def time_debt_s(self) -> float:
        return self._debt_s

    def time_dropped_s(self) -> float:
        return self._dropped_s

    def cached_prefix(self, hashes: list[int]) -> int:
        return self.pool.cached_prefix(hashes)

    def export_blocks(self, hashes: list[int]) -> list[KvBlockStored]:
        return self.pool.export(hashes)

    def release_held(self, request_id: str) -> None:
        if self.scheduler.release_held(request_id):
            self._wakeup.set()  # room may have opened for a stalled loop

    async def encode_image(self, image: ImageInput) -> bytes:
        """The simulated vision encoder: `encode_ms_per_image` (over the speed-up), then the
        embedding stand-in."""
        c = self.config
        if c.speedup_ratio > 0 and c.encode_ms_per_image > 0:
            await self._sleep(c.encode_ms_per_image / 1000.0 / c.speedup_ratio)
        return embedding_stand_in(image.hash, image.num_tokens, c.embedding_bytes_per_token)

    def kv_transfer_seconds(self, num_tokens: int) -> float:
        """Modelled time to move `num_tokens` tokens' KV: bytes over `kv_transfer_gbps`,
        divided by the speed-up."""
        c = self.config
        if num_tokens <= 0 or c.speedup_ratio == 0:
            return 0.0
        return num_tokens * c.kv_bytes_per_token / (c.kv_transfer_gbps * 1e9) / c.speedup_ratio

    def import_blocks(self, blocks: list[KvBlockStored], first_position: int) -> float:
        """Simulated copy: the blocks land in the prefix cache; the modelled transfer time
        (bytes over `kv_transfer_gbps`, divided by the speed-up) is returned for the caller to
        wait before it admits the request that needs them."""
        n = self.pool.import_blocks(blocks, first_position)
        return self.kv_transfer_seconds(n * self.config.block_size)

    # -- extras ------------------------------------------------------------------------------

    def reset_prefix_cache(self) -> None:
        """Forget every cached block; the cleared event goes to the sink at once."""
        self.pool.reset()
        if self._sink is not None:
            self._sink(StepOutput(kv_events=self.pool.drain_events()))

    # -- internals ---------------------------------------------------------------------------

    def _validate(self, request: GenerateRequest) -> None:
        rid = request.request_id
        if rid in self.scheduler.requests:
            raise EngineError(f"request {rid!r} is already running on this engine", 409)
        if not request.token_ids:
            raise EngineError("the prompt is empty")
        sp = request.sampling
        if sp.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {sp.max_tokens}")
        if sp.min_tokens > sp.max_tokens:
            raise EngineError(f"min_tokens ({sp.min_tokens}) exceeds max_tokens ({sp.max_tokens})")
        total = len(request.token_ids) + sp.max_tokens
        if total > self.max_model_len:
            raise EngineError(
                f"prompt ({len(request.token_ids)} tokens) + max_tokens ({sp.max_tokens}) exceeds "
                f"the model's context length {self.max_model_len}")
        if -(-total // self.block_size) > self.pool.num_blocks:
            raise EngineError(f"request needs more KV blocks than this engine has "
                              f"({self.pool.num_blocks} of {self.block_size} tokens)")
        for ids in (request.token_ids, request.generated_token_ids):
            if ids and (min(ids) < 0 or max(ids) > self._max_token_id):
                raise EngineError(f"token ids must lie in [0, {self._max_token_id}]")

    async def _run(self) -> None:
        clock = self._clock
        sleep = self._sleep
        scheduler = self.scheduler
        pool = self.pool
        speedup = self.config.speedup_ratio
        max_debt = self.config.max_time_debt_ms / 1000.0
        total_blocks = pool.num_blocks
        # Steps end on a chained deadline rather than "now + duration": timer granularity, our
        # own CPU time and time the process was descheduled are all paid back by later steps.
        deadline = clock()
        while True:
            if not scheduler.has_work():
                self._debt_s = 0.0  # nothing left to run late: idle time owes nothing
                self._wakeup.clear()
                await self._wakeup.wait()
                deadline = clock()
                continue
            plan = scheduler.schedule()
            if plan.kv_admitted:
                # Decode phases start decoding in this step: an empty chunk each says so now,
                # a step ahead of their next token (a router holding a first token sends it).
                assert self._sink is not None
                self._sink(StepOutput([TokenChunk(rid, []) for rid in plan.kv_admitted]))
            model_ms = timing.step_ms(plan.prefill_tokens, plan.decode_tokens,
                                      plan.kv_used_blocks / total_blocks)
            if plan.encode_images:
                # In-line encoding stalls the whole batch of this step, as on one GPU.
                model_ms += plan.encode_images * self.config.encode_ms_per_image
            if speedup > 0:
                behind = clock() - deadline
                if behind > max_debt:
                    self._dropped_s += behind - max_debt
                    deadline += behind - max_debt
                    behind = max_debt
                self._debt_s = behind if behind > 0 else 0.0
                deadline += model_ms / (1000.0 * speedup)
                delay = deadline - clock()
                await sleep(delay if delay > 0 else 0)
            else:
                await sleep(0)
            chunks = scheduler.complete(plan)
            if not plan.seqs and not chunks:
                # Admission checks make this unreachable; never spin on it.
                log.error("mocker: work pending but nothing schedulable; waiting for a change")
                self._wakeup.clear()
                await self._wakeup.wait()
                deadline = clock()
                continue
            self._steps += 1
            assert self._sink is not None
            self._sink(StepOutput(chunks, pool.drain_events(), ForwardPass(
                self._steps, len(plan.seqs), plan.prefill_tokens, plan.decode_tokens, model_ms,
                plan.kv_used_blocks), plan.encode_images))

    def _on_loop_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("mocker engine loop died", exc_info=task.exception())


def embedding_stand_in(image_hash: str, num_tokens: int, bytes_per_token: int) -> bytes:
    """The mocker's deterministic embedding of an image: the same bytes for the same image on
    every encode worker, `num_tokens` x `bytes_per_token` long."""
    return hashlib.shake_256(b"turnout-mock-embedding:" + bytes.fromhex(image_hash)).digest(
        num_tokens * bytes_per_token)
