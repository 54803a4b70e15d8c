"""The mocker's disaggregated phases: a prefill holds its blocks after its first token; a
decode phase whose prompt KV was imported computes no prompt token; both continue the same
deterministic sequence as an aggregated run."""

from __future__ import annotations

from common.block_hash import block_hashes
from common.messages import (
    FINISH_LENGTH,
    PHASE_DECODE,
    PHASE_PREFILL,
    GenerateRequest,
    SamplingParams,
)
from services.worker.engines.mocker.kv_pool import KvPool
from services.worker.engines.mocker.scheduler import Scheduler
from services.worker.engines.mocker.sequence import Sequence
from tests.worker.test_mocker_scheduler import MODEL, drive, expected

PROMPT = list(range(1000, 1150))  # 150 tokens: 2 full blocks of 64 and a tail of 22


def scheduler(num_blocks: int = 64) -> Scheduler:
    return Scheduler(KvPool(num_blocks, 64), MODEL, 256, 8192)


def submit(sched: Scheduler, phase: str, generated: list[int] | None = None,
           max_tokens: int = 10) -> None:
    sched.add(Sequence(GenerateRequest("r", "m", PROMPT, SamplingParams(max_tokens=max_tokens),
                                       generated_token_ids=generated or [], phase=phase),
                       MODEL))


def test_prefill_phase_ends_at_the_first_token_and_holds_its_blocks() -> None:
    sched = scheduler()
    submit(sched, PHASE_PREFILL)
    chunks, steps = drive(sched)
    (chunk,) = chunks["r"]
    assert chunk.token_ids == expected(PROMPT, 1) and chunk.finish_reason == FINISH_LENGTH
    assert chunk.num_prompt_tokens == 150
    assert sum(p.decode_tokens for p, _ in steps) == 0
    assert sched.pool.used_blocks == 3  # held: 2 full blocks and the tail
    assert sched.release_held("r") and not sched.release_held("r")
    assert sched.pool.used_blocks == 0
    assert sched.pool.cached_prefix(block_hashes(PROMPT, 64)) == 2


def test_abort_frees_held_blocks() -> None:
    sched = scheduler()
    submit(sched, PHASE_PREFILL)
    drive(sched)
    assert sched.abort("r") and sched.pool.used_blocks == 0


def test_decode_phase_with_imported_kv_computes_no_prompt_token() -> None:
    source = scheduler()
    submit(source, PHASE_PREFILL)
    first = drive(source)[0]["r"][0].token_ids
    blocks = source.pool.export(block_hashes(PROMPT, 64))
    sched = scheduler()
    sched.pool.import_blocks(blocks, 0)
    submit(sched, PHASE_DECODE, first)
    chunks, steps = drive(sched)
    assert sum(p.prefill_tokens for p, _ in steps) == 0
    assert sum(p.decode_tokens for p, _ in steps) == 9
    # Its first step says so as it is planned (the engine sends an empty chunk then); later
    # steps, and a decode phase that must recompute, do not.
    assert [p.kv_admitted for p, _ in steps] == [["r"]] + [[]] * 8
    tokens = [t for c in chunks["r"] for t in c.token_ids]
    assert first + tokens == expected(PROMPT, 10)
    assert chunks["r"][-1].finish_reason == FINISH_LENGTH


def test_decode_phase_without_the_kv_recomputes_and_continues_identically() -> None:
    sched = scheduler()
    first = expected(PROMPT, 1)
    submit(sched, PHASE_DECODE, first)  # nothing imported: its blocks are not cached
    chunks, steps = drive(sched)
    assert sum(p.prefill_tokens for p, _ in steps) == 151
    assert not any(p.kv_admitted for p, _ in steps)
    assert first + [t for c in chunks["r"] for t in c.token_ids] == expected(PROMPT, 10)
