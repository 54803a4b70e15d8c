"""`StreamingEngine` (the base of the SGLang and TensorRT-LLM adapters) over a scripted fake
engine: streams woken by one engine iteration leave as one step, the chunk contract, aborts,
failures, migration budgets, load and translated KV events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from common.block_hash import DEFAULT_SEED, block_hashes
from common.messages import (
    GenerateRequest,
    KvBlockStored,
    SamplingParams,
    TokenChunk,
)
from services.worker.engine import EngineError, StepOutput
from services.worker.engines.stream_engine import Delta, StreamingEngine
from services.worker.engines.vllm_kv_events import VllmBlockStored

pytestmark = pytest.mark.asyncio

BS = 4


class FakeEngine(StreamingEngine):
    """Every `tick()` is one engine iteration: each live stream gets one token (its index)."""

    name = "fake"

    def __init__(self) -> None:
        super().__init__(block_size=BS, hash_seed=DEFAULT_SEED)
        self.iteration: asyncio.Future[None] | None = None
        self.aborted: list[str] = []
        self.closed = False
        self.fail_at: dict[str, int] = {}  # request id → token index that raises
        self.unfinished: set[str] = set()  # streams that end without a finish reason

    async def _launch(self) -> None:
        self.max_model_len = 64
        self.vocab_size = 1000
        self.num_blocks = 100

    def tick(self) -> None:
        if self.iteration is not None and not self.iteration.done():
            self.iteration.set_result(None)

    async def _stream(self, request: GenerateRequest, max_tokens: int,
                      min_tokens: int) -> AsyncIterator[Delta]:
        rid = request.request_id
        start = len(request.generated_token_ids)
        for i in range(max_tokens):
            if self.iteration is None or self.iteration.done():
                self.iteration = asyncio.get_running_loop().create_future()
            await asyncio.shield(self.iteration)
            if self.fail_at.get(rid) == i:
                raise RuntimeError("device fell over")
            last = i == max_tokens - 1
            reason = "length" if last and rid not in self.unfinished else None
            yield Delta([start + i], reason, 3 if i == 0 else 0)
            if last:
                return

    async def _abort_native(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def _close(self) -> None:
        self.closed = True


class Sink:
    def __init__(self) -> None:
        self.steps: list[StepOutput] = []

    def __call__(self, out: StepOutput) -> None:
        self.steps.append(out)

    def chunks(self, rid: str) -> list[TokenChunk]:
        return [c for s in self.steps for c in s.chunks if c.request_id == rid]


def req(rid: str, max_tokens: int = 3, prompt: int = 5, generated: int = 0) -> GenerateRequest:
    return GenerateRequest(rid, "m", list(range(10, 10 + prompt)), SamplingParams(max_tokens),
                           generated_token_ids=list(range(generated)))


async def started() -> tuple[FakeEngine, Sink]:
    engine, sink = FakeEngine(), Sink()
    await engine.start(sink)
    return engine, sink


async def turn(engine: FakeEngine) -> None:
    """One engine iteration, then let the woken streams and the flush run."""
    engine.tick()
    for _ in range(5):
        await asyncio.sleep(0)


async def test_streams_of_one_iteration_leave_as_one_step() -> None:
    engine, sink = await started()
    engine.add_request(req("a"))
    engine.add_request(req("b"))
    await asyncio.sleep(0)
    for _ in range(3):
        await turn(engine)
    token_steps = [s for s in sink.steps if s.chunks]
    assert len(token_steps) == 3
    assert all({c.request_id for c in s.chunks} == {"a", "b"} for s in token_steps)
    for rid in ("a", "b"):
        chunks = sink.chunks(rid)
        assert [c.token_ids for c in chunks] == [[0], [1], [2]]
        assert (chunks[0].num_prompt_tokens, chunks[0].cached_tokens) == (5, 3)
        assert [c.finish_reason for c in chunks] == [None, None, "length"]
    fp = token_steps[0].forward_pass
    assert fp is not None and fp.batch_size == 2 and fp.prefill_tokens == 2 * (5 - 3)
    assert engine.steps_done() == 3
    await engine.shutdown()
    assert engine.closed


async def test_abort_sends_nothing_more_and_tells_the_engine() -> None:
    engine, sink = await started()
    engine.add_request(req("a", 10))
    await asyncio.sleep(0)
    await turn(engine)
    engine.abort("a")
    await turn(engine)
    await turn(engine)
    assert [c.token_ids for c in sink.chunks("a")] == [[0]]
    assert engine.aborted == ["a"]
    assert engine.load().running == 0
    engine.abort("a")  # unknown now: ignored
    assert engine.aborted == ["a"]
    await engine.shutdown()


async def test_engine_failure_and_truncated_stream_end_with_errors() -> None:
    engine, sink = await started()
    engine.fail_at["x"] = 1
    engine.unfinished.add("y")
    engine.add_request(req("x", 3))
    engine.add_request(req("y", 2))
    await asyncio.sleep(0)
    for _ in range(3):
        await turn(engine)
    x, y = sink.chunks("x"), sink.chunks("y")
    assert (x[-1].finish_reason, x[-1].error_code) == ("error", 500)
    assert "device fell over" in x[-1].error_message
    assert (y[-1].finish_reason, y[-1].error_code) == ("error", 500)
    assert engine.load().running == 0
    await engine.shutdown()


async def test_migrated_request_counts_generated_tokens_against_its_budget() -> None:
    engine, sink = await started()
    engine.add_request(req("m", 5, generated=3))  # 2 left
    engine.add_request(req("done", 3, generated=3))  # nothing left
    await asyncio.sleep(0)
    for _ in range(3):
        await turn(engine)
    assert [c.token_ids for c in sink.chunks("m")] == [[3], [4]]
    assert sink.chunks("m")[0].num_prompt_tokens == 5  # the original prompt
    assert [(c.token_ids, c.finish_reason) for c in sink.chunks("done")] == [([], "length")]
    await engine.shutdown()


async def test_checks_and_load() -> None:
    engine, _ = await started()
    with pytest.raises(EngineError):
        engine.add_request(req("long", 60, prompt=10))  # 70 > max_model_len 64
    with pytest.raises(EngineError):
        engine.add_request(GenerateRequest("v", "m", [5, 1000], SamplingParams(2)))
    with pytest.raises(EngineError, match="logprobs are not supported"):  # said, not dropped
        engine.add_request(GenerateRequest("l", "m", [5, 6], SamplingParams(2, logprobs=1)))
    for name, refused in (("logit_bias", SamplingParams(2, logit_bias={5: 1.0})),
                          ("bad_words", SamplingParams(2, bad_words=[[5, 6]])),
                          ("allowed_token_ids", SamplingParams(2, allowed_token_ids=[5]))):
        with pytest.raises(EngineError, match=f"{name} is not supported"):
            engine.add_request(GenerateRequest(name, "m", [5, 6], refused))
    with pytest.raises(EngineError, match="cache_salt is not supported"):
        engine.add_request(GenerateRequest("s", "m", [5, 6], SamplingParams(2), cache_salt="t"))
    engine.add_request(req("a", 10, prompt=6))
    with pytest.raises(EngineError):
        engine.add_request(req("a"))  # duplicate
    await asyncio.sleep(0)
    load = engine.load()
    assert (load.running, load.active_prefill_tokens, load.kv_total_blocks) == (0, 6, 100)
    await turn(engine)
    load = engine.load()
    assert (load.running, load.active_decode_blocks) == (1, 2)  # 7 tokens in blocks of 4
    await engine.shutdown()


async def test_block_events_are_rehashed_for_the_router() -> None:
    engine, sink = await started()
    tokens = list(range(100, 108))
    engine.deliver_block_events([VllmBlockStored([7, 8], None, tokens, BS)])
    ours = block_hashes(tokens, BS, DEFAULT_SEED)
    assert [e for s in sink.steps for e in s.kv_events] == [
        KvBlockStored(ours, None, tokens, BS)]
    assert engine.cached_prefix(ours) == 2
    assert [e.block_hashes for e in engine.kv_dump()] == [[ours[0]], [ours[1]]]
    await engine.shutdown()
