"""The mocker's scheduler, driven step by step without the engine loop or any sleeping."""

from __future__ import annotations

import random

import pytest

from common.messages import (
    FINISH_LENGTH,
    PHASE_DECODE,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
)
from services.worker.engines.mocker.kv_pool import KvPool
from services.worker.engines.mocker.scheduler import Scheduler, StepPlan
from services.worker.engines.mocker.sequence import Sequence
from services.worker.engines.mocker.token_model import TokenModel, absorb, absorb_all

MODEL = TokenModel(32, 127)


def make(num_blocks: int = 16384, block_size: int = 64, max_num_seqs: int = 256,
         budget: int = 8192, priority: bool = False) -> Scheduler:
    return Scheduler(KvPool(num_blocks, block_size), MODEL, max_num_seqs, budget, priority)


def add(sched: Scheduler, rid: str, prompt: list[int], max_tokens: int,
        priority: int = 0) -> None:
    request = GenerateRequest(rid, "m", prompt, SamplingParams(max_tokens=max_tokens),
                              priority=priority)
    sched.add(Sequence(request, MODEL))


def drive(sched: Scheduler, max_steps: int = 10_000,
          ) -> tuple[dict[str, list[TokenChunk]], list[tuple[StepPlan, list[TokenChunk]]]]:
    """Step until idle; chunks per request and (plan, chunks) per step."""
    per_request: dict[str, list[TokenChunk]] = {}
    steps: list[tuple[StepPlan, list[TokenChunk]]] = []
    while sched.has_work():
        assert len(steps) < max_steps, "scheduler made no progress"
        plan = sched.schedule()
        assert plan.prefill_tokens + plan.decode_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        chunks = sched.complete(plan)
        steps.append((plan, chunks))
        for chunk in chunks:
            per_request.setdefault(chunk.request_id, []).append(chunk)
    return per_request, steps


def expected(prompt: list[int], n: int) -> list[int]:
    """The reference continuation: a pure function of the sequence so far."""
    state = absorb_all(prompt)
    out = []
    for _ in range(n):
        tok = MODEL.draw(state, False, None)
        out.append(tok)
        state = absorb(state, tok)
    return out


def tokens_of(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_chunked_prefill_takes_three_steps_for_20k_tokens() -> None:
    sched = make()
    prompt = [random.Random(0).randrange(32, 127) for _ in range(20_000)]
    add(sched, "big", prompt, 2)
    per_request, steps = drive(sched)
    assert [p.prefill_tokens for p, _ in steps[:3]] == [8192, 8192, 20_000 - 2 * 8192]
    assert [len(c) for _, c in steps[:3]] == [0, 0, 1]
    assert per_request["big"][0].num_prompt_tokens == 20_000
    assert tokens_of(per_request["big"]) == expected(prompt, 2)
    assert per_request["big"][-1].finish_reason == FINISH_LENGTH


def test_decodes_go_first_then_new_prompts_fill_the_budget() -> None:
    sched = make()
    for i in range(3):
        add(sched, f"d{i}", [40 + i] * 10, 50)
    sched.complete(sched.schedule())  # all three prefilled, each has its first token
    add(sched, "big", [50] * 20_000, 1)
    plan = sched.schedule()
    assert plan.decode_tokens == 3
    assert plan.prefill_tokens == 8192 - 3
    chunks = sched.complete(plan)
    assert sorted(c.request_id for c in chunks) == ["d0", "d1", "d2"]


def test_max_num_seqs_is_respected() -> None:
    sched = make(max_num_seqs=4)
    for i in range(10):
        add(sched, f"r{i}", [33 + i] * 100, 5)
    per_request, steps = drive(sched)
    assert max(p.decode_tokens + (p.prefill_tokens > 0) for p, _ in steps) <= 4
    assert max(len(p.seqs) for p, _ in steps) == 4
    assert len(per_request) == 10
    assert all(len(tokens_of(c)) == 5 for c in per_request.values())


def test_preemption_under_a_tiny_pool_keeps_tokens_exact() -> None:
    rng = random.Random(7)
    # 4 concurrent requests need 4 x 12 blocks at the end; the pool has 20.
    sched = make(num_blocks=20, block_size=4)
    prompts = {f"r{i}": [rng.randrange(32, 127) for _ in range(10)] for i in range(4)}
    for rid, prompt in prompts.items():
        add(sched, rid, prompt, 36)
    per_request, _ = drive(sched)
    assert sched.num_preemptions > 0
    for rid, prompt in prompts.items():
        assert tokens_of(per_request[rid]) == expected(prompt, 36), rid
        assert [c.finish_reason for c in per_request[rid]].count(FINISH_LENGTH) == 1
        assert per_request[rid][0].num_prompt_tokens == 10
    assert sched.pool.used_blocks == 0
    assert not sched.requests


def first_tokens(steps: list[tuple[StepPlan, list[TokenChunk]]]) -> list[str]:
    """Request ids in the order their first tokens came."""
    seen: list[str] = []
    for _, chunks in steps:
        seen += [c.request_id for c in chunks if c.token_ids and c.request_id not in seen]
    return seen


@pytest.mark.parametrize("priority", [False, True])
def test_priority_policy_admits_the_lowest_priority_first(priority: bool) -> None:
    """One request runs at a time: under fcfs they start in arrival order; under priority by
    (priority, arrival), whatever the order they came in."""
    sched = make(max_num_seqs=1, priority=priority)
    for rid, level in (("a", 0), ("late", 5), ("urgent", -1), ("b", 0), ("urgent2", -1)):
        add(sched, rid, [40] * 8, 2, level)
    _, steps = drive(sched)
    assert first_tokens(steps) == (["urgent", "urgent2", "a", "b", "late"] if priority
                                   else ["a", "late", "urgent", "b", "urgent2"])


def test_priority_policy_preempts_the_lowest_priority_running_request() -> None:
    """The pool runs dry: fcfs preempts the one admitted last, priority the one with the
    highest (priority, arrival); either way the tokens are exact."""
    for priority, victim in ((False, "b"), (True, "a")):
        sched = make(num_blocks=12, block_size=4, priority=priority)
        add(sched, "a", [40] * 16, 24, priority=3)  # each ends needing 10 blocks
        add(sched, "b", [41] * 16, 24, priority=1)
        per_request, steps = drive(sched)
        assert sched.num_preemptions == 1
        done = [c.request_id for _, chunks in steps for c in chunks if c.finish_reason]
        assert done[0] != victim, (priority, done)
        assert tokens_of(per_request["a"]) == expected([40] * 16, 24)
        assert tokens_of(per_request["b"]) == expected([41] * 16, 24)


def test_preempted_request_reuses_its_cached_prefix() -> None:
    sched = make(num_blocks=12, block_size=4)
    add(sched, "a", [40] * 16, 24)  # each ends needing 10 blocks: they cannot both finish
    add(sched, "b", [41] * 16, 24)
    per_request, steps = drive(sched)
    assert sched.num_preemptions == 1
    # b (admitted last) was preempted; when it comes back it re-prefills prompt + its 8 tokens,
    # minus the leading blocks a's growth did not evict.
    reprefill = [p.prefill_tokens for p, _ in steps[1:] if p.prefill_tokens]
    assert len(reprefill) == 1 and 0 < reprefill[0] < 16 + 8
    assert tokens_of(per_request["a"]) == expected([40] * 16, 24)
    assert tokens_of(per_request["b"]) == expected([41] * 16, 24)
    assert per_request["b"][0].cached_tokens == 0  # reported from its first admission


def test_second_identical_prompt_hits_the_cache() -> None:
    sched = make(block_size=4)
    prompt = list(range(40, 70))  # 7 full blocks + 2
    add(sched, "a", prompt, 3)
    first, steps_a = drive(sched)
    add(sched, "b", prompt, 3)
    second, steps_b = drive(sched)
    assert first["a"][0].cached_tokens == 0
    assert second["b"][0].cached_tokens == 28
    assert steps_a[0][0].prefill_tokens == 30 and steps_b[0][0].prefill_tokens == 2
    assert tokens_of(first["a"]) == tokens_of(second["b"])


def test_a_fully_cached_prompt_still_computes_its_last_block() -> None:
    sched = make(block_size=4)
    prompt = list(range(40, 56))  # exactly 4 blocks
    add(sched, "a", prompt, 2)
    drive(sched)
    add(sched, "b", prompt, 2)
    second, steps = drive(sched)
    assert second["b"][0].cached_tokens == 12
    assert steps[0][0].prefill_tokens == 4


@pytest.mark.parametrize("budget", [1, 7, 64])
def test_small_budgets_still_finish_with_the_same_tokens(budget: int) -> None:
    sched = make(block_size=4, budget=budget)
    prompts = {f"r{i}": [32 + i, 50, 60, 70, 80, 90, 33] * 3 for i in range(3)}
    for rid, prompt in prompts.items():
        add(sched, rid, prompt, 6)
    per_request, _ = drive(sched)
    for rid, prompt in prompts.items():
        assert tokens_of(per_request[rid]) == expected(prompt, 6)


def test_abort_releases_blocks_and_drops_the_request() -> None:
    sched = make(block_size=4, max_num_seqs=1)
    add(sched, "a", [40] * 20, 100)
    add(sched, "w", [41] * 20, 100)
    sched.complete(sched.schedule())
    assert [s.request_id for s in sched.running] == ["a"]
    assert [s.request_id for s in sched.waiting] == ["w"]
    assert sched.pool.used_blocks == 5  # the sampled token has no KV yet
    assert sched.abort("w") and sched.abort("a")
    assert not sched.abort("a")
    assert sched.pool.used_blocks == 0
    assert not sched.has_work()


def test_aborted_during_a_step_produces_nothing() -> None:
    sched = make(block_size=4)
    add(sched, "a", [40] * 20, 100)
    plan = sched.schedule()
    sched.abort("a")
    assert sched.complete(plan) == []
    assert sched.pool.used_blocks == 0 and sched.pool.cached_blocks == 0


def test_a_waiting_decode_phase_reports_only_its_last_token_to_prefill() -> None:
    """A decode phase arrives with its prompt's KV: its load report must not claim a prompt's
    worth of prefill (the planner would judge a decode worker by a prefill it never runs)."""
    sched = make()
    prompt = [random.Random(3).randrange(32, 127) for _ in range(1000)]
    sched.add(Sequence(GenerateRequest("d", "m", prompt, SamplingParams(max_tokens=8),
                                       generated_token_ids=[40], phase=PHASE_DECODE), MODEL))
    add(sched, "a", prompt[:500], 8)
    assert sched.load().active_prefill_tokens == 1 + 500
