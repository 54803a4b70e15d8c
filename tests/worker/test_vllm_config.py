"""The vLLM engine's flags and the command line they make (no vLLM needed)."""

from __future__ import annotations

import pytest

from common.config import parse_configs
from services.worker.args import EngineConfig, WorkerConfig
from services.worker.engines import create_engine, engine_config_classes
from services.worker.engines.vllm_config import CPU_DEFAULT_KV_CACHE_BYTES, VllmConfig


def parse(*argv: str) -> list[object]:
    return parse_configs([WorkerConfig, *engine_config_classes()], list(argv))


def test_defaults_on_gpu_leave_sizing_to_vllm() -> None:
    argv = VllmConfig().argv("/m", 64, on_cpu=False)
    assert argv == ["--model", "/m", "--block-size", "64", "--enable-prefix-caching"]


def test_cpu_gets_a_fixed_kv_cache_unless_sized() -> None:
    assert VllmConfig().argv("/m", 64, on_cpu=True)[-2:] == [
        "--kv-cache-memory-bytes", str(CPU_DEFAULT_KV_CACHE_BYTES)]
    sized = VllmConfig(gpu_memory_utilization=0.3).argv("/m", 64, on_cpu=True)
    assert "--kv-cache-memory-bytes" not in sized
    assert sized[-2:] == ["--gpu-memory-utilization", "0.3"]
    via_extra = VllmConfig(engine_args="--gpu-memory-utilization=0.25").argv("/m", 64, on_cpu=True)
    assert "--kv-cache-memory-bytes" not in via_extra


def test_engine_args_replace_our_flags() -> None:
    cfg = VllmConfig(enforce_eager=True, kv_cache_memory_bytes=1 << 20,
                     engine_args="--max-num-seqs 8 --block-size 128 --dtype 'float32'")
    argv = cfg.argv("/m", 64, on_cpu=True, shared={"max_model_len": 2048})
    assert argv == ["--model", "/m", "--enable-prefix-caching",
                    "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 20),
                    "--max-model-len", "2048",
                    "--max-num-seqs", "8", "--block-size", "128", "--dtype", "float32"]
    no_cache = VllmConfig(engine_args="--no-enable-prefix-caching --block-size=16")
    assert no_cache.argv("/m", 64, on_cpu=False) == [
        "--model", "/m", "--no-enable-prefix-caching", "--block-size=16"]


def test_the_scheduling_policy_reaches_vllm_unless_engine_args_name_one() -> None:
    assert "--scheduling-policy" not in VllmConfig().argv("/m", 64, on_cpu=True)
    argv = VllmConfig().argv("/m", 64, on_cpu=True, scheduling_policy="priority")
    assert argv[argv.index("--scheduling-policy") + 1] == "priority"
    given = VllmConfig(engine_args="--scheduling-policy fcfs").argv(
        "/m", 64, on_cpu=True, scheduling_policy="priority")
    assert given[given.index("--scheduling-policy"):] == ["--scheduling-policy", "fcfs"]


def test_validation() -> None:
    with pytest.raises(ValueError):
        VllmConfig(gpu_memory_utilization=1.5).validate()
    with pytest.raises(ValueError):
        VllmConfig(engine_args="--dtype 'unbalanced").validate()


def test_worker_cli_fills_the_vllm_config_and_the_engine_neutral_one() -> None:
    worker, engine, _mocker, vllm = parse("--engine", "vllm", "--model", "/m", "--block-size",
                                          "32", "--engine-args", "--max-num-seqs 4",
                                          "--enforce-eager")
    assert worker.engine == "vllm"  # type: ignore[attr-defined]
    assert engine == EngineConfig(block_size=32)
    assert vllm == VllmConfig(enforce_eager=True, engine_args="--max-num-seqs 4")


def test_real_engines_need_a_model() -> None:
    worker, *engines = parse("--engine", "vllm")
    with pytest.raises(SystemExit, match="needs --model"):
        create_engine(worker, engines)  # type: ignore[arg-type]


def test_only_limits_set_on_the_command_line_reach_the_engine() -> None:
    _, engine, _, _ = parse("--max-model-len", "2048")
    assert engine.limits() == {"max_model_len": 2048}  # type: ignore[attr-defined]
    _, engine, _, _ = parse()
    assert engine.limits() == {}  # type: ignore[attr-defined]
