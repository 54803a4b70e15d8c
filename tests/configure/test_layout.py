"""Reading recorded aiconfigurator sweeps: the layout chosen, the targets checked here, the
frontier."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from tests.configure.recorded import AGG, DISAGG, INFEASIBLE, TRTLLM, sweep
from turnout.configure.layout import NoLayout, Pool, choose, frontier, layout_from_row


def test_disaggregated_wins_and_its_replica_becomes_worker_pools() -> None:
    choice = choose(DISAGG, sweep(DISAGG))
    layout = choice.layout
    assert layout.mode == "disaggregated"
    # aiconfigurator's rank-1 disagg row: one replica of 1 prefill + 3 decode TP4 workers.
    assert layout.pools == (Pool("prefill", 1, 4, 1, 1), Pool("decode", 3, 4, 1, 15))
    assert layout.gpus_used == 16 and layout.replicas == 1
    assert layout.ttft_ms == pytest.approx(216.171) and layout.itl_ms == pytest.approx(19.947)
    assert layout.tokens_per_s_per_gpu == pytest.approx(129.979, rel=1e-4)
    assert layout.concurrency == 45 and layout.requests_per_s == pytest.approx(4.159)
    assert layout.backend_version == "0.24.0"
    # The aggregated best is kept for comparison: 4 replicas of one TP4 worker.
    agg = choice.best_by_mode["aggregated"]
    assert agg.pools == (Pool("aggregated", 4, 4, 1, 9),)
    assert agg.tokens_per_s_per_gpu < layout.tokens_per_s_per_gpu
    assert choice.missed_targets == 0 and choice.untranslatable == 0


def test_replicas_multiply_the_workers_of_a_row() -> None:
    layout = layout_from_row(TRTLLM, "disagg", sweep(TRTLLM)["experiments"]["disagg"]["best"][0])
    # Rank 1: two replicas of 1 prefill TP4 + 1 decode TP4 (batch 48), 478 tokens/s/GPU.
    assert layout is not None
    assert layout.mode == "disaggregated" and layout.replicas == 2
    assert layout.pools == (Pool("prefill", 2, 4, 1, 1), Pool("decode", 2, 4, 1, 48))
    assert layout.tokens_per_s_per_gpu == pytest.approx(478.35, rel=1e-4)
    assert layout.itl_ms <= TRTLLM.itl_ms and layout.ttft_ms <= TRTLLM.ttft_ms


def test_disaggregated_rows_of_an_engine_turnout_cannot_split_are_not_chosen() -> None:
    # TensorRT-LLM's disaggregated rows win its sweep, but Turnout moves no KV between
    # TensorRT-LLM workers: the best aggregated row is chosen and the others are counted.
    choice = choose(TRTLLM, sweep(TRTLLM))
    assert choice.layout.mode == "aggregated"
    assert set(choice.best_by_mode) == {"aggregated"}
    assert choice.unsplittable == 3
    # The same rows for an engine it splits: the disaggregated one wins.
    as_vllm = choose(dataclasses.replace(TRTLLM, backend="vllm"), sweep(TRTLLM))
    assert as_vllm.layout.mode == "disaggregated" and as_vllm.unsplittable == 0
    assert as_vllm.layout.tokens_per_s_per_gpu > choice.layout.tokens_per_s_per_gpu


def test_aggregated_wins_on_a_small_model() -> None:
    layout = choose(AGG, sweep(AGG)).layout
    assert layout.mode == "aggregated" and len(layout.pools) == 1
    pool = layout.pools[0]
    assert pool.workers * pool.gpus_per_worker <= AGG.gpus
    assert layout.itl_ms <= AGG.itl_ms and layout.ttft_ms <= AGG.ttft_ms


def test_no_configuration_meeting_the_targets_is_one_clear_error() -> None:
    with pytest.raises(NoLayout) as caught:
        choose(INFEASIBLE, sweep(INFEASIBLE))
    message = str(caught.value)
    assert "\n" not in message
    assert "ITL <= 10 ms" in message and "TTFT <= 300 ms" in message
    assert "Qwen/Qwen3-32B-FP8 on 16 x h200_sxm (vllm)" in message


def test_targets_are_checked_here_not_taken_from_aiconfigurator() -> None:
    # The same recorded sweep against a tighter ITL: rows over it are dropped, whatever
    # aiconfigurator's own filter let through.
    tighter = dataclasses.replace(DISAGG, itl_ms=19.8)
    choice = choose(tighter, sweep(DISAGG))
    assert choice.missed_targets > 0
    assert choice.layout.itl_ms <= 19.8
    assert choice.layout.mode == "aggregated"  # the 19.95 ms disagg rank 1 no longer qualifies
    with pytest.raises(NoLayout):
        choose(dataclasses.replace(DISAGG, ttft_ms=100.0), sweep(DISAGG))


def test_rows_needing_data_or_expert_parallelism_are_not_translated() -> None:
    row = copy.deepcopy(sweep(DISAGG)["experiments"]["agg"]["best"][0])
    assert layout_from_row(DISAGG, "agg", row) is not None
    row["dp"] = 2
    assert layout_from_row(DISAGG, "agg", row) is None
    row = copy.deepcopy(sweep(DISAGG)["experiments"]["disagg"]["best"][0])
    row["(d)moe_ep"] = 8
    assert layout_from_row(DISAGG, "disagg", row) is None
    # A replica larger than the GPUs given cannot be laid out.
    assert layout_from_row(dataclasses.replace(DISAGG, gpus=8), "disagg",
                           sweep(DISAGG)["experiments"]["disagg"]["best"][0]) is None


def test_frontier_has_every_pareto_row_of_both_modes() -> None:
    recorded = sweep(DISAGG)
    points = frontier(recorded)
    by_mode = {m: [p for p in points if p.mode == m] for m in ("aggregated", "disaggregated")}
    assert len(by_mode["aggregated"]) == len(recorded["experiments"]["agg"]["pareto"]) == 11
    assert len(by_mode["disaggregated"]) == len(recorded["experiments"]["disagg"]["pareto"])
    assert all(p.itl_ms <= DISAGG.itl_ms for p in points)  # strict SLA: the frontier meets it
