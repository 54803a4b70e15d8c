"""Every setting of the mocker engine: its own flags (with TURNOUT_* fallbacks and defaults) and
the engine-neutral settings it runs with.

The engine-neutral ones (`block_size`, `hash_seed`, `max_model_len`, `max_num_seqs`,
`max_num_batched_tokens`) are flags of `EngineConfig` (`services/worker/args.py`); here they are
plain fields, resolved by `create_engine` for the mocker (`for_engine`). Defaults match NVIDIA
Dynamo's mocker so the two compare on equal terms. Owns the settings and their validation only;
what they mean in motion lives in the scheduler, KV pool and timing model.
"""

from __future__ import annotations

import dataclasses

from common.block_hash import DEFAULT_SEED
from common.config import opt
from common.messages import SCHEDULING_FCFS

DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


@dataclasses.dataclass
class MockerConfig:
    """The mocker engine (--engine mocker)."""

    num_blocks: int = opt(16384, help="KV blocks in the simulated pool")
    speedup_ratio: float = opt(1.0, help="simulated time is divided by this; 0: no delays at all")
    vocab_size: int = opt(0, help="when >0, prompt token ids must be below it and output ids are "
                                  "drawn below it too; 0: only the token range applies "
                                  "(--model sets it from config.json)")
    token_range_lo: int = opt(32, help="lowest output token id (byte tokenizer: printable ASCII)")
    token_range_hi: int = opt(127, help="output token ids are below this")
    eos_token_id: int | None = opt(None, help="the model's end-of-sequence token id (--model "
                                              "sets it from config.json)")
    mean_output_tokens: int = opt(0, help="when >0 (and an EOS id is set), emit EOS with "
                                          "probability 1/N at each position; 0: never by itself")
    kv_transfer_gbps: float = opt(10.0, help="simulated KV transfer bandwidth, GB/s (blocks "
                                             "pulled from a peer or promoted from host memory)")
    kv_bytes_per_token: int = opt(131072, help="simulated KV bytes per token (default: a "
                                               "Llama-3-8B layout in bf16)")
    # Steps a descheduled process owes are repaid by running later steps without their sleep,
    # so wall time follows the model. The bound: past it the CPU is short for good (not
    # briefly taken away) or the process was frozen, and repaying more would be a long burst of
    # back-to-back steps that looks nothing like the model; the excess is dropped and counted.
    max_time_debt_ms: float = opt(2000.0, help="most wall time the step clock may run behind "
                                               "the timing model and still catch up; the rest "
                                               "is dropped (turnout_worker_engine_time_dropped_"
                                               "seconds_total)")
    encode_ms_per_image: float = opt(25.0, help="simulated vision-encoder time per image "
                                                "(divided by --speedup-ratio): an encode "
                                                "worker's per image, or an aggregated worker's "
                                                "charged in the step that admits the request "
                                                "when no encode worker sent the embedding")
    embedding_bytes_per_token: int = opt(1024, help="bytes of the simulated embedding per image "
                                                    "placeholder token (what an encode worker "
                                                    "sends)")
    # Engine-neutral settings (not flags here: `EngineConfig` declares them for every engine).
    block_size: int = 64
    hash_seed: int = DEFAULT_SEED
    max_model_len: int = 0  # 0: what the KV pool holds (num_blocks x block_size)
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    scheduling_policy: str = SCHEDULING_FCFS  # or SCHEDULING_PRIORITY
    startup_time_s: float = opt(0.0, help="simulated model load time before the engine serves "
                                          "(logged each second at info level); 0: none")

    def __post_init__(self) -> None:
        if self.max_model_len == 0:
            self.max_model_len = self.pool_tokens()
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on settings the engine cannot run with."""
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens",
                     "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"mocker: {name} must be positive, got {getattr(self, name)}")
        # Written so that NaN fails each bound too.
        for name in ("speedup_ratio", "max_time_debt_ms", "startup_time_s", "encode_ms_per_image",
                     "vocab_size", "mean_output_tokens"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"mocker: {name} must be >= 0, got {getattr(self, name)}")
        if self.eos_token_id is not None and self.eos_token_id < 0:
            raise ValueError(f"mocker: eos_token_id must be >= 0, got {self.eos_token_id}")
        if self.embedding_bytes_per_token < 1:
            raise ValueError(f"mocker: embedding_bytes_per_token must be >= 1, got "
                             f"{self.embedding_bytes_per_token}")
        # A transfer's modelled time divides by the bandwidth: 0 would fail the first pull.
        if not self.kv_transfer_gbps > 0:
            raise ValueError(f"mocker: kv_transfer_gbps must be positive, got "
                             f"{self.kv_transfer_gbps}")
        if self.kv_bytes_per_token < 1:
            raise ValueError(f"mocker: kv_bytes_per_token must be >= 1, got "
                             f"{self.kv_bytes_per_token}")
        lo, hi = self.output_range()
        if not 0 <= lo < hi:
            raise ValueError(f"mocker: empty output token range [{lo}, {hi})")

    def pool_tokens(self) -> int:
        """Tokens the simulated KV pool holds: the longest sequence it could ever run."""
        return self.num_blocks * self.block_size

    def output_range(self) -> tuple[int, int]:
        """[lo, hi) of output token ids: the configured range, capped by the vocabulary."""
        hi = self.token_range_hi
        if self.vocab_size > 0:
            hi = min(hi, self.vocab_size)
        return self.token_range_lo, hi
