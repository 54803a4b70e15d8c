"""The vllm engine's disaggregation flags: `--kv-transfer nixl` and the settings that need it
(no vLLM needed)."""

from __future__ import annotations

import pytest

from common.config import parse_configs
from services.worker.args import WorkerConfig
from services.worker.engines import default_kv_transfer, engine_config_classes
from services.worker.engines.vllm_config import DEFAULT_KV_LEASE_S, VllmConfig


def vllm_config(*argv: str) -> VllmConfig:
    *_, vllm = parse_configs([WorkerConfig, *engine_config_classes()],
                             ["--engine", "vllm", *argv])
    assert isinstance(vllm, VllmConfig)
    return vllm


def test_cli_sets_the_transfer_and_its_settings() -> None:
    cfg = vllm_config("--kv-transfer", "nixl", "--kv-transfer-host", "10.0.0.5",
                      "--kv-lease-s", "12")
    assert (cfg.kv_transfer, cfg.kv_transfer_host, cfg.kv_lease_s) == ("nixl", "10.0.0.5", 12)
    cfg.validate()
    assert vllm_config().kv_transfer == ""


def test_an_unknown_transfer_is_refused() -> None:
    with pytest.raises(SystemExit):
        vllm_config("--kv-transfer", "mooncake")
    with pytest.raises(ValueError, match="--kv-transfer must be one of"):
        VllmConfig(kv_transfer="mooncake").validate()


@pytest.mark.parametrize("cfg, message", [
    (VllmConfig(kv_transfer_host="10.0.0.5"), "--kv-transfer-host needs --kv-transfer nixl"),
    (VllmConfig(kv_lease_s=60), "--kv-lease-s needs --kv-transfer nixl"),
    (VllmConfig(kv_transfer="nixl", kv_lease_s=5), "--kv-lease-s must be at least 6"),
    (VllmConfig(kv_transfer="nixl", kv_transfer_host=""), "must not be empty"),
    (VllmConfig(kv_transfer="nixl", kv_store="/tmp/s"), "cannot be combined"),
    (VllmConfig(kv_transfer="nixl", engine_args="--kv-transfer-config '{}'"),
     "do not also give one"),
])
def test_settings_that_would_be_ignored_or_clash_are_refused(cfg: VllmConfig,
                                                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_the_transfer_leaves_the_vllm_command_line_alone() -> None:
    # The connector is set on the parsed engine arguments, not as a flag a user could clash with.
    assert VllmConfig(kv_transfer="nixl").argv("/m", 64, on_cpu=False) == \
        VllmConfig().argv("/m", 64, on_cpu=False)
    assert VllmConfig().kv_lease_s == DEFAULT_KV_LEASE_S


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_prefill_and_decode_workers_move_kv_over_nixl_by_default(mode: str) -> None:
    cfg = vllm_config("--worker-mode", mode)
    default_kv_transfer(mode, cfg)
    assert cfg.kv_transfer == "nixl"
    cfg.validate()
    aggregated = vllm_config()
    default_kv_transfer("aggregated", aggregated)
    assert aggregated.kv_transfer == ""


def test_a_prefill_worker_with_a_kv_store_is_refused_not_left_without_transfer() -> None:
    cfg = vllm_config("--worker-mode", "prefill", "--kv-store", "/tmp/store")
    with pytest.raises(ValueError, match="cannot be combined with --kv-store"):
        default_kv_transfer("prefill", cfg)
