"""The one interface a worker drives, whatever engine sits behind it.

An engine is step-oriented rather than per-request: after every engine step it hands the worker
one `StepOutput` holding every request's new tokens, the KV events the step caused and a
forward-pass record. That is what lets the worker send one frame per step per destination
instead of a message per token (the design's `generate(request) -> async iterator` is the same
contract, batched). Engines whose native API is per-request (vLLM's `AsyncLLM.generate`) gather
their streams into steps in their adapter.

Owns the contract only; engines live in `services/worker/engines/`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.block_hash import DEFAULT_SEED
from common.custom_metrics import CustomMetrics
from common.messages import (
    SCHEDULING_FCFS,
    ForwardPass,
    GenerateRequest,
    ImageInput,
    KvBlockStored,
    KvEvent,
    TokenChunk,
)


@dataclass(slots=True)
class StepOutput:
    chunks: list[TokenChunk] = field(default_factory=list)
    kv_events: list[KvEvent] = field(default_factory=list)
    forward_pass: ForwardPass | None = None
    images_encoded: int = 0  # images the engine ran its vision encoder on in this step


@dataclass(slots=True)
class EngineLoad:
    active_decode_blocks: int = 0
    active_prefill_tokens: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    waiting: int = 0
    running: int = 0


class EngineError(Exception):
    """A request the engine refuses (too long for its context, malformed); the client is told."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


StepSink = Callable[[StepOutput], None]


class Engine(abc.ABC):
    """What a worker needs from an engine."""

    block_size: int
    max_model_len: int
    hash_seed: int = DEFAULT_SEED
    # How the engine orders waiting requests, one of SCHEDULING_POLICIES (--scheduling-policy;
    # its discovery record says so).
    scheduling_policy: str = SCHEDULING_FCFS
    # Whether it constrains output to `SamplingParams.structured` (else the worker refuses such
    # a request); its discovery record says so, and the router places those requests by it.
    applies_structured_outputs: bool = False
    # Set by the worker before `start`: where the engine declares its own `turnout_engine_*`
    # series (served on the worker's /metrics). None when nothing serves them (unit tests).
    metrics: CustomMetrics | None = None

    @abc.abstractmethod
    async def start(self, sink: StepSink) -> None:
        """Load the model and begin stepping; every step's output goes to `sink` (never blocks)."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop stepping and release the engine."""

    @abc.abstractmethod
    def add_request(self, request: GenerateRequest) -> None:
        """Admit a request (raise `EngineError` to refuse it). Its tokens arrive through the
        sink; the first chunk carries `num_prompt_tokens` and `cached_tokens`, the last a
        finish reason."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop a request and free its KV; unknown ids are ignored. No further chunks for it."""

    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """The engine's load right now (cheap; called on every load report)."""

    @abc.abstractmethod
    def steps_done(self) -> int:
        """Engine steps completed so far (heartbeats carry it as progress)."""

    @abc.abstractmethod
    def kv_dump(self) -> list[KvBlockStored]:
        """Every block the engine's prefix cache holds, parents before children (for a resync)."""

    # Pacing of simulated engines, which sleep to a timing model: real engines keep time by
    # doing the work, so they owe and drop nothing.

    def time_debt_s(self) -> float:
        """Seconds the step clock runs behind the timing model now (the process lost the CPU)."""
        return 0.0

    def time_dropped_s(self) -> float:
        """Seconds of debt given up so far because it exceeded the engine's bound."""
        return 0.0

    def discovery_metadata(self) -> dict[str, Any]:
        """Engine facts for the worker's discovery record (e.g. its KV transfer endpoint)."""
        return {}

    # KV block export/import, for migration with surviving KV. An engine that cannot move
    # blocks keeps these defaults: it holds nothing to give and recomputes what it lacks.

    def cached_prefix(self, hashes: list[int]) -> int:
        """How many leading blocks of a sequence (by chained hash) the prefix cache holds."""
        return 0

    def export_blocks(self, hashes: list[int]) -> list[KvBlockStored]:
        """Cached blocks among `hashes` (single-block events, in order) for a peer to import."""
        return []

    def import_blocks(self, blocks: list[KvBlockStored], first_position: int) -> float:
        """Put consecutive blocks of a sequence (starting at block `first_position`) into the
        prefix cache; return the seconds the transfer takes (the caller waits them)."""
        return 0.0

    # Disaggregated serving. A prefill-phase request (`GenerateRequest.phase == "prefill"`)
    # ends after its first token, its final chunk carrying the engine's `kv_transfer_params`,
    # and the engine keeps its KV until `release_held` (the decode side's acknowledgement, or
    # the worker's lease expiring). A decode-phase request continues after prompt +
    # generated_token_ids with the prompt's KV brought over rather than recomputed; an engine
    # that moves KV itself (vLLM's NIXL connector) does so from `kv_transfer_params`.

    def release_held(self, request_id: str) -> None:
        """Free the KV a finished prefill phase kept; unknown ids are ignored."""
        return None

    def kv_transfer_seconds(self, num_tokens: int) -> float:
        """Seconds moving `num_tokens` tokens' KV takes beyond the blocks `import_blocks`
        counted (a decode phase's partial last block); the caller waits them."""
        return 0.0

    # Multimodal: an encode worker (`--worker-mode encode`) turns images into embeddings.

    async def encode_image(self, image: ImageInput) -> bytes:
        """The vision encoder's output for `image` (its `data` set). EngineError when this
        engine cannot encode images."""
        raise EngineError(f"the {type(self).__name__} cannot encode images", 501)
