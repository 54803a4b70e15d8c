"""MockerConfig: Dynamo-matching defaults, flags with TURNOUT_* fallbacks, validation."""

from __future__ import annotations

import pytest

from common.block_hash import DEFAULT_SEED
from common.config import parse
from services.worker.engines.mocker.config import MockerConfig


def test_defaults_match_dynamo() -> None:
    c = MockerConfig()
    assert (c.block_size, c.num_blocks, c.max_num_seqs, c.max_num_batched_tokens) == (
        64, 16384, 256, 8192)
    assert c.speedup_ratio == 1.0 and c.max_model_len == 65536
    assert c.output_range() == (32, 127) and c.eos_token_id is None
    assert c.hash_seed == DEFAULT_SEED and c.kv_transfer_gbps == 10.0
    assert c.max_time_debt_ms == 2000.0


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_NUM_BLOCKS", "128")
    c = parse(MockerConfig, ["--block-size", "16", "--speedup-ratio", "0", "--eos-token-id", "2",
                             "--vocab-size", "100", "--token-range-lo", "0",
                             "--token-range-hi", "1000"])
    assert (c.block_size, c.num_blocks, c.speedup_ratio, c.eos_token_id) == (16, 128, 0.0, 2)
    assert c.output_range() == (0, 100)  # capped by the vocabulary


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"speedup_ratio": -1.0},
                                 {"token_range_lo": 127}, {"max_num_batched_tokens": 0},
                                 {"mean_output_tokens": -1}, {"max_time_debt_ms": -1.0}])
def test_rejects_unusable_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MockerConfig(**bad)  # type: ignore[arg-type]
