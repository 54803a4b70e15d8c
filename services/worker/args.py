"""Every flag of `turnout worker` that is not one engine's own, with its TURNOUT_* fallback and
default: the worker process (`WorkerConfig`) and the settings every engine takes
(`EngineConfig`). Each engine's own flags live with the engine (`engines/*config.py`)."""

from __future__ import annotations

import dataclasses

from common.block_hash import DEFAULT_SEED
from common.config import ProcessConfig, opt, require
from common.messages import SCHEDULING_FCFS, SCHEDULING_POLICIES

ENGINES = ["mocker", "vllm", "sglang", "trtllm"]
WORKER_MODES = ["aggregated", "prefill", "decode", "encode"]
DEFAULT_EMBEDDING_CACHE_MB = 512.0


@dataclasses.dataclass
class WorkerConfig(ProcessConfig):
    """Worker process."""

    engine: str = opt("mocker", help="inference engine behind this worker", choices=ENGINES)
    worker_id: str = opt("", help="unique instance id (default: worker-<pid>-<random>)")
    worker_mode: str = opt("aggregated", choices=WORKER_MODES,
                           help="disaggregation role: 'prefill' computes prompts' KV and first "
                                "tokens for decode workers (and serves whole requests while no "
                                "decode worker is alive); 'decode' continues them (and runs "
                                "whole requests the router prefills locally); 'aggregated' both; "
                                "'encode' turns chat images into embeddings for the others")
    worker_port: int = opt(0, help="request-plane port (0: any free port)")
    worker_event_port: int = opt(0, help="event-plane PUB port (0: any free port)")
    worker_metrics_port: int = opt(0, help="/metrics and /health port (0: any free port)")
    heartbeat_interval_ms: int = opt(100, help="heartbeat and load report period")
    kv_replicas: int = opt(0, help="copy every newly completed KV block to this many peers, so "
                                   "a request's KV survives its worker")
    host_kv_blocks: int = opt(65536, help="capacity of the host-memory tier holding peers' "
                                          "replicated blocks")
    drain_grace_s: float = opt(30.0, help="on SIGTERM, how long streams may run (and decode "
                                          "workers pull KV held for them) before migrating")
    kv_lease_ms: int = opt(30_000, help="a finished prefill keeps its KV blocks for the decode "
                                        "side at most this long when no release comes (a "
                                        "request's own lease_ms overrides it)")
    embedding_cache_mb: float = opt(DEFAULT_EMBEDDING_CACHE_MB,
                                    help="encode workers: most MiB of image embeddings kept by "
                                         "image hash (least recently used go first)")
    kv_pull_timeout_ms: int = opt(500, help="how long a KV pull waits for each source's answer "
                                            "before trying the next (or recomputing); time "
                                            "this worker ran: a pause does not count")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "be positive", "heartbeat_interval_ms", "kv_lease_ms", "kv_pull_timeout_ms",
                holds=lambda v: v > 0)
        # --embedding-cache-mb on a worker that is not an encode worker is refused when the
        # worker starts (`main.py`): `turnout up` sets it on the encode workers only.
        require(self, "be >= 0", "kv_replicas", "host_kv_blocks", "drain_grace_s",
                "embedding_cache_mb", holds=lambda v: v >= 0)


@dataclasses.dataclass
class EngineConfig:
    """Every engine (mocker, vllm, sglang, trtllm)."""

    block_size: int = opt(64, help="tokens per KV block (vllm --block-size, sglang "
                                   "--page-size, trtllm tokens_per_block)")
    hash_seed: int = opt(DEFAULT_SEED, help="seed of the KV block hashes (must match the router)")
    max_model_len: int = opt(0, help="longest prompt + max_tokens accepted; 0: the model's own "
                                     "context length (config.json of --model); the mocker "
                                     "without --model: what its KV pool holds")
    max_num_seqs: int = opt(0, help="most requests running at once; 0: the engine's default "
                                    "(mocker 256; vllm, sglang, trtllm size it themselves)")
    max_num_batched_tokens: int = opt(0, help="token budget of one engine step; 0: the "
                                              "engine's default (mocker 8192; vllm, sglang, "
                                              "trtllm size it themselves)")
    scheduling_policy: str = opt(SCHEDULING_FCFS, choices=list(SCHEDULING_POLICIES),
                                 help="order of waiting requests (vLLM's --scheduling-policy): "
                                      "fcfs, or priority (a request's `priority`, lower first, "
                                      "then arrival; the lowest running one is preempted "
                                      "first); vllm and mocker engines")

    def __post_init__(self) -> None:
        require(self, "be positive", "block_size", holds=lambda v: v > 0)
        require(self, "be >= 0 (0: the engine's default)", "max_model_len", "max_num_seqs",
                "max_num_batched_tokens", holds=lambda v: v >= 0)
        require(self, "be fcfs or priority", "scheduling_policy",
                holds=lambda v: v in SCHEDULING_POLICIES)

    def limits(self) -> dict[str, int]:
        """The limits set on the command line (non-zero): only those reach a real engine, which
        otherwise derives them from the model and the hardware."""
        return {name: getattr(self, name)
                for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens")
                if getattr(self, name)}
