"""MockerEngine end to end through its asyncio loop (speed-up 0 unless timing is the point)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from common.block_hash import block_hashes
from common.messages import (
    FINISH_LENGTH,
    FINISH_STOP,
    PHASE_DECODE,
    GenerateRequest,
    KvBlockRemoved,
    KvBlockStored,
    KvCleared,
    SamplingParams,
    TokenChunk,
)
from services.worker.engine import EngineError, EngineLoad, StepOutput
from services.worker.engines.mocker.config import MockerConfig
from services.worker.engines.mocker.engine import MockerEngine

TIMEOUT = 10.0


class Harness:
    """An engine plus a sink that records every step."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("speedup_ratio", 0.0)
        self.engine = MockerEngine(MockerConfig(**config))
        self.outputs: list[StepOutput] = []
        self.chunks: dict[str, list[TokenChunk]] = {}
        self.first_chunk_at: dict[str, float] = {}
        self.loads: list[EngineLoad] = []
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Harness:
        await self.engine.start(self.sink)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.shutdown()

    def sink(self, out: StepOutput) -> None:
        self.outputs.append(out)
        self.loads.append(self.engine.load())
        for chunk in out.chunks:
            if chunk.request_id not in self.chunks:
                self.first_chunk_at[chunk.request_id] = time.monotonic()
            self.chunks.setdefault(chunk.request_id, []).append(chunk)
        self._changed.set()

    def add(self, rid: str, prompt: list[int], max_tokens: int = 16, **sampling: Any) -> None:
        generated = sampling.pop("generated_token_ids", [])
        salt = sampling.pop("cache_salt", "")
        self.engine.add_request(GenerateRequest(
            rid, "mock", prompt, SamplingParams(max_tokens=max_tokens, **sampling),
            generated_token_ids=generated, cache_salt=salt))

    def finished(self, rid: str) -> bool:
        chunks = self.chunks.get(rid)
        return bool(chunks) and chunks[-1].finish_reason is not None

    async def until(self, done: Callable[[], bool], within: float = TIMEOUT) -> None:
        """Wait (bounded) until `done()` holds, re-checking after every step."""
        async with asyncio.timeout(within):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def wait(self, *rids: str) -> None:
        await self.until(lambda: all(self.finished(r) for r in rids))

    async def run(self, rid: str, prompt: list[int], max_tokens: int = 16,
                  **sampling: Any) -> list[int]:
        self.add(rid, prompt, max_tokens, **sampling)
        await self.wait(rid)
        return self.tokens(rid)

    def tokens(self, rid: str) -> list[int]:
        return [t for c in self.chunks[rid] for t in c.token_ids]

    def reason(self, rid: str) -> str | None:
        return self.chunks[rid][-1].finish_reason

    def kv_events(self) -> list[Any]:
        return [e for out in self.outputs for e in out.kv_events]


def prompt_of(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32, 127) for _ in range(n)]


@pytest.mark.asyncio
async def test_same_prompt_same_tokens_on_two_engines() -> None:
    prompt = prompt_of(1, 300)
    async with Harness() as a, Harness(block_size=16, max_num_batched_tokens=100) as b:
        ref = await a.run("x", prompt, 50)
        # Different batching, block size and sampling knobs: same tokens.
        b.add("noise", prompt_of(2, 90), 30)
        got = await b.run("x", prompt, 50, temperature=0.2, top_p=0.5, seed=9)
    assert got == ref
    assert len(ref) == 50 and all(32 <= t < 127 for t in ref)


@pytest.mark.asyncio
async def test_continuation_after_migration_is_exact() -> None:
    prompt = prompt_of(3, 130)
    async with Harness() as a, Harness() as b:
        ref = await a.run("x", prompt, 40)
        k = 17
        rest = await b.run("x", prompt, 40, generated_token_ids=ref[:k])
        assert rest == ref[k:]
        assert b.reason("x") == FINISH_LENGTH
        first = b.chunks["x"][0]
        assert first.num_prompt_tokens == 130
        # Nothing left to do: one empty final chunk.
        assert await b.run("y", prompt, 40, generated_token_ids=ref) == []
        assert b.reason("y") == FINISH_LENGTH
        assert b.chunks["y"][0].num_prompt_tokens == 130


@pytest.mark.asyncio
async def test_prefix_hit_reports_cached_tokens_and_shortens_prefill() -> None:
    prompt = prompt_of(4, 1000)
    async with Harness() as h:
        await h.run("a", prompt, 2)
        await h.run("b", prompt, 2)
        await h.run("c", [*prompt[:500], *prompt_of(5, 100)], 2)
    assert h.chunks["a"][0].cached_tokens == 0
    assert h.chunks["b"][0].cached_tokens == 960  # 15 full blocks of 64
    assert h.chunks["c"][0].cached_tokens == 448  # the 7 full blocks they share
    assert h.chunks["b"][0].num_prompt_tokens == 1000

    def first_step(rid: str) -> Any:
        return next(o.forward_pass for o in h.outputs if any(
            c.request_id == rid for c in o.chunks))
    a_fp, b_fp = first_step("a"), first_step("b")
    assert a_fp.prefill_tokens == 1000 and b_fp.prefill_tokens == 40
    assert b_fp.duration_ms < a_fp.duration_ms - 10


@pytest.mark.asyncio
async def test_a_cache_salt_shares_cached_blocks_only_with_its_own_salt() -> None:
    prompt = prompt_of(6, 300)
    async with Harness() as h:
        await h.run("a", prompt, 2, cache_salt="tenant-a")
        await h.run("plain", prompt, 2)
        await h.run("b", prompt, 2, cache_salt="tenant-b")
        await h.run("a2", prompt, 2, cache_salt="tenant-a")
        stored = [h for e in h.kv_events() if isinstance(e, KvBlockStored)
                  for h in e.block_hashes]
    assert [h.chunks[r][0].cached_tokens for r in ("a", "plain", "b", "a2")] == [0, 0, 0, 256]
    # The blocks it publishes are the salted chain the router computes for the request.
    salted = block_hashes(prompt, 64, salt="tenant-a")
    assert set(salted) <= set(stored) and set(block_hashes(prompt, 64)) <= set(stored)
    # Its output does not depend on the salt.
    assert h.tokens("a") == h.tokens("plain") == h.tokens("b")


@pytest.mark.asyncio
async def test_stop_token_ids_and_min_tokens() -> None:
    prompt = prompt_of(6, 50)
    async with Harness() as h:
        ref = await h.run("ref", prompt, 40)
        stop = ref[5]
        i = ref.index(stop)
        got = await h.run("stop", prompt, 40, stop_token_ids=[stop])
        assert got == ref[:i + 1]  # the stop token is included, like vLLM's output ids
        assert h.reason("stop") == FINISH_STOP
        n_min = i + 3
        held = await h.run("min", prompt, 40, stop_token_ids=[stop], min_tokens=n_min)
        assert held[:i] == ref[:i]
        assert stop not in held[:n_min]
        assert len(held) >= n_min


@pytest.mark.asyncio
async def test_eos_is_drawn_about_once_per_mean_and_honours_ignore_eos_and_min_tokens() -> None:
    async with Harness(eos_token_id=2, mean_output_tokens=8) as h:
        for i in range(40):
            h.add(f"e{i}", prompt_of(100 + i, 20), 64)
            h.add(f"i{i}", prompt_of(100 + i, 20), 64, ignore_eos=True)
            h.add(f"m{i}", prompt_of(100 + i, 20), 64, min_tokens=12)
        await h.wait(*(f"{k}{i}" for k in "eim" for i in range(40)))
    lengths = [len(h.tokens(f"e{i}")) for i in range(40)]
    assert 4 < sum(lengths) / len(lengths) < 16
    for i in range(40):
        e, ign, m = h.tokens(f"e{i}"), h.tokens(f"i{i}"), h.tokens(f"m{i}")
        if h.reason(f"e{i}") == FINISH_STOP:
            assert e[-1] == 2 and 2 not in e[:-1]
        assert len(ign) == 64 and 2 not in ign and h.reason(f"i{i}") == FINISH_LENGTH
        assert len(m) >= 12 and 2 not in m[:12]
        # Until EOS, a request's tokens are the ignore_eos run's tokens.
        assert e[:-1] == ign[:len(e) - 1]


@pytest.mark.asyncio
async def test_no_eos_without_a_mean() -> None:
    async with Harness(eos_token_id=65) as h:  # EOS inside the output range
        tokens = await h.run("x", prompt_of(7, 10), 2000)
    assert len(tokens) == 2000 and 65 not in tokens


@pytest.mark.asyncio
async def test_abort_stops_the_stream_and_frees_blocks() -> None:
    async with Harness(max_num_seqs=1) as h:
        h.add("long", prompt_of(8, 200), 5000)
        h.add("queued", prompt_of(9, 200), 10)
        await h.until(lambda: len(h.chunks.get("long", [])) >= 5)
        assert h.engine.load().kv_used_blocks == 4
        h.engine.abort("queued")
        h.engine.abort("long")
        h.engine.abort("unknown")
        n = len(h.chunks["long"])
        steps = h.engine.steps_done()
        await asyncio.sleep(0.05)
        assert len(h.chunks["long"]) == n and "queued" not in h.chunks
        assert h.engine.steps_done() <= steps + 1
        load = h.engine.load()
        assert (load.kv_used_blocks, load.running, load.waiting) == (0, 0, 0)
        # The engine keeps serving after an abort.
        assert len(await h.run("after", prompt_of(10, 20), 3)) == 3


@pytest.mark.asyncio
async def test_refused_requests() -> None:
    async with Harness(max_model_len=1000, num_blocks=10, block_size=16, vocab_size=500) as h:
        def refuse(rid: str, prompt: list[int], max_tokens: int, **kw: Any) -> EngineError:
            with pytest.raises(EngineError) as info:
                h.add(rid, prompt, max_tokens, **kw)
            return info.value
        assert refuse("empty", [], 5).code == 400
        assert refuse("long", [40] * 990, 20).code == 400
        assert refuse("blocks", [40] * 150, 20).code == 400  # 170 tokens > 10 x 16
        assert refuse("vocab", [40, 500], 5).code == 400
        assert refuse("neg", [-1], 5).code == 400
        assert refuse("zero", [40], 0).code == 400
        assert refuse("min", [40], 5, min_tokens=6).code == 400
        h.add("dup", [40] * 10, 50)
        assert refuse("dup", [40] * 10, 5).code == 409
        await h.wait("dup")
        h.add("dup", [40] * 10, 5)  # a finished id may be reused
        await h.wait("dup")


@pytest.mark.asyncio
async def test_kv_event_stream_replays_to_the_dump() -> None:
    rng = random.Random(11)
    shared = [prompt_of(200 + i, 40) for i in range(4)]
    async with Harness(num_blocks=48, block_size=8, max_num_seqs=8,
                       max_num_batched_tokens=64) as h:
        rids = []
        for i in range(60):
            head = rng.choice(shared)[:rng.randrange(0, 40)]
            h.add(f"r{i}", [*head, *prompt_of(300 + i, rng.randrange(1, 60))], rng.randrange(1, 40))
            rids.append(f"r{i}")
            if i % 12 == 11:
                await h.wait(*rids)
        await h.wait(*rids)
        dump = h.engine.kv_dump()
    assert h.engine.scheduler.num_preemptions > 0
    events = h.kv_events()
    assert any(isinstance(e, KvBlockRemoved) for e in events)
    index: dict[int, tuple[int | None, list[int]]] = {}
    for e in events:
        if isinstance(e, KvBlockStored):
            parent = e.parent_hash
            for j, bh in enumerate(e.block_hashes):
                assert bh not in index, "stored twice without a removal"
                index[bh] = (parent, e.token_ids[j * 8:(j + 1) * 8])
                parent = bh
        elif isinstance(e, KvBlockRemoved):
            for bh in e.block_hashes:
                del index[bh]
        elif isinstance(e, KvCleared):
            index.clear()
    dumped = {e.block_hashes[0]: (e.parent_hash, e.token_ids) for e in dump}
    assert dumped == index
    # Every cached block's hash is what the router computes for those tokens.
    for bh, (parent, tokens) in dumped.items():
        chain = [tokens]
        while parent is not None and parent in dumped:
            parent, toks = dumped[parent]
            chain.insert(0, toks)
        if parent is None:
            assert block_hashes([t for c in chain for t in c], 8)[-1] == bh


@pytest.mark.asyncio
async def test_forward_pass_every_step_and_load_reports() -> None:
    async with Harness(max_num_batched_tokens=64) as h:
        h.add("a", prompt_of(12, 100), 10)
        h.add("b", prompt_of(13, 30), 3)
        assert h.engine.load() == EngineLoad(0, 130, 0, 16384, 2, 0)
        await h.wait("a", "b")
    fps = [o.forward_pass for o in h.outputs]
    assert all(fp is not None for fp in fps)
    assert [fp.step for fp in fps] == list(range(1, len(fps) + 1))  # type: ignore[union-attr]
    assert h.engine.steps_done() == len(fps)
    # Step 1: 64 tokens of a; step 2: a's last 36 + 28 of b; step 3: a decodes, b's last 2.
    assert [(fp.prefill_tokens, fp.decode_tokens, fp.batch_size)  # type: ignore[union-attr]
            for fp in fps[:3]] == [(64, 0, 1), (64, 0, 2), (2, 1, 2)]
    assert h.loads[0] == EngineLoad(0, 66, 1, 16384, 1, 1)
    assert h.loads[1] == EngineLoad(2, 2, 3, 16384, 0, 2)
    assert h.engine.load() == EngineLoad(0, 0, 0, 16384, 0, 0)


@pytest.mark.asyncio
async def test_idle_engine_sleeps_and_wakes_on_a_request() -> None:
    async with Harness(speedup_ratio=1.0) as h:
        cpu0 = time.process_time()
        await asyncio.sleep(0.2)
        assert time.process_time() - cpu0 < 0.05
        assert h.engine.steps_done() == 0
        assert len(await h.run("x", [40, 41], 2)) == 2


@pytest.mark.asyncio
async def test_reset_prefix_cache_emits_cleared() -> None:
    async with Harness() as h:
        await h.run("a", prompt_of(14, 200), 2)
        assert len(h.engine.kv_dump()) == 3
        h.engine.reset_prefix_cache()
        assert isinstance(h.outputs[-1].kv_events[-1], KvCleared)
        assert h.engine.kv_dump() == []
        await h.run("b", prompt_of(14, 200), 2)
        assert h.chunks["b"][0].cached_tokens == 0


@pytest.mark.asyncio
async def test_a_decode_phase_with_its_kv_says_so_a_step_before_its_next_token() -> None:
    """The step that starts decoding a transferred prompt is announced before it runs (an
    empty chunk, no forward pass yet); its token comes with the step. A request that computes
    its prompt here announces nothing."""
    prompt = prompt_of(7, 150)
    async with Harness(speedup_ratio=1.0) as source:  # the prefill side: first token, blocks
        first = await source.run("p", prompt, max_tokens=1)
        blocks = source.engine.export_blocks(block_hashes(prompt, 64))
    async with Harness(speedup_ratio=1.0) as h:
        h.engine.import_blocks(blocks, 0)
        h.engine.add_request(GenerateRequest("r", "mock", prompt, SamplingParams(max_tokens=4),
                                             generated_token_ids=first, phase=PHASE_DECODE))
        await h.wait("r")
        announce, token = h.outputs[0], h.outputs[1]
        assert [(c.request_id, c.token_ids, c.finish_reason) for c in announce.chunks] == [
            ("r", [], None)]
        assert announce.forward_pass is None
        assert token.forward_pass is not None and token.forward_pass.prefill_tokens == 0
        assert [len(c.token_ids) for c in token.chunks] == [1]
        await h.run("a", prompt_of(8, 100), max_tokens=2)
        assert all(c.token_ids for c in h.chunks["a"])
