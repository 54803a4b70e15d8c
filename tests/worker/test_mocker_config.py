"""The mocker's settings: Dynamo-matching defaults, its own flags beside the engine-neutral ones
(with TURNOUT_* fallbacks), the context length it derives, validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.block_hash import DEFAULT_SEED
from common.config import parse_configs
from services.worker.args import WorkerConfig
from services.worker.engines import create_engine, engine_config_classes, mocker_settings
from services.worker.engines.mocker.config import MockerConfig


def settings(*argv: str) -> MockerConfig:
    worker, *engines = parse_configs([WorkerConfig, *engine_config_classes()], list(argv))
    return mocker_settings(worker, engines)


def model_dir(tmp_path: Path, **config: Any) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000, **config}))
    return str(tmp_path)


def test_defaults_match_dynamo() -> None:
    c = settings()
    assert (c.block_size, c.num_blocks, c.max_num_seqs, c.max_num_batched_tokens) == (
        64, 16384, 256, 8192)
    assert c.speedup_ratio == 1.0
    assert c.output_range() == (32, 127) and c.eos_token_id is None
    assert c.hash_seed == DEFAULT_SEED and c.kv_transfer_gbps == 10.0
    assert c.max_time_debt_ms == 2000.0
    assert c == MockerConfig()  # the CLI's defaults are the engine's


def test_engine_neutral_and_own_flags_with_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_NUM_BLOCKS", "128")
    monkeypatch.setenv("TURNOUT_MAX_NUM_SEQS", "8")
    c = settings("--block-size", "16", "--speedup-ratio", "0", "--eos-token-id", "2",
                 "--vocab-size", "100", "--token-range-lo", "0", "--token-range-hi", "1000",
                 "--hash-seed", "7", "--max-num-batched-tokens", "512")
    assert (c.block_size, c.num_blocks, c.speedup_ratio, c.eos_token_id) == (16, 128, 0.0, 2)
    assert (c.hash_seed, c.max_num_seqs, c.max_num_batched_tokens) == (7, 8, 512)
    assert c.output_range() == (0, 100)  # capped by the vocabulary


def test_context_length_without_a_model_is_what_the_pool_holds() -> None:
    assert settings().max_model_len == 16384 * 64
    assert settings("--num-blocks", "100", "--block-size", "16").max_model_len == 1600
    assert settings("--max-model-len", "2048").max_model_len == 2048


def test_context_length_comes_from_the_model(tmp_path: Path) -> None:
    model = model_dir(tmp_path, max_position_embeddings=32768, eos_token_id=[5, 6])
    c = settings("--model", model)
    assert (c.max_model_len, c.vocab_size, c.eos_token_id) == (32768, 1000, 5)
    assert settings("--model", model, "--max-model-len", "100000").max_model_len == 100000
    # A model longer than the pool gets what the pool holds, as a real engine's KV cache caps it.
    assert settings("--model", model, "--num-blocks", "10").max_model_len == 640


def test_context_length_keys_of_other_model_families(tmp_path: Path) -> None:
    assert settings("--model", model_dir(tmp_path, n_positions=1024)).max_model_len == 1024
    multimodal = model_dir(tmp_path, text_config={"max_position_embeddings": 8192})
    assert settings("--model", multimodal).max_model_len == 8192
    nothing = model_dir(tmp_path)
    assert settings("--model", nothing).max_model_len == 16384 * 64


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"speedup_ratio": -1.0},
                                 {"token_range_lo": 127}, {"max_num_batched_tokens": 0},
                                 {"mean_output_tokens": -1}, {"max_time_debt_ms": -1.0},
                                 {"kv_transfer_gbps": 0.0}, {"kv_transfer_gbps": -1.0},
                                 {"kv_transfer_gbps": float("nan")},
                                 {"kv_bytes_per_token": 0}, {"speedup_ratio": float("nan")},
                                 {"startup_time_s": float("nan")}, {"vocab_size": -1},
                                 {"eos_token_id": -1}])
def test_rejects_unusable_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MockerConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("argv", "foreign"), [
    (["--kv-store", "/tmp/x"], "--kv-store"),
    (["--engine-args", "--dtype float32"], "--engine-args"),
    (["--engine", "vllm", "--model", "/m", "--speedup-ratio", "2"], "--speedup-ratio"),
    (["--engine", "sglang", "--model", "/m", "--kv-cache-memory-bytes", "1"],
     "--kv-cache-memory-bytes"),
])
def test_another_engines_flag_is_refused(argv: list[str], foreign: str) -> None:
    worker, *engines = parse_configs([WorkerConfig, *engine_config_classes()], argv)
    with pytest.raises(SystemExit, match=f"does not take {foreign}"):
        create_engine(worker, engines)


@pytest.mark.parametrize("argv", [["--engine-args", "--dtype float32"],
                                  ["--max-model-len", "4096"],
                                  ["--gpu-memory-utilization", "0.5"]])
def test_an_engine_flag_on_a_real_engines_encode_worker_is_refused(argv: list[str]) -> None:
    worker, *engines = parse_configs([WorkerConfig, *engine_config_classes()],
                                     ["--engine", "vllm", "--model", "/m", "--worker-mode",
                                      "encode", *argv])
    with pytest.raises(SystemExit, match=f"does not take {argv[0]}"):
        create_engine(worker, engines)
