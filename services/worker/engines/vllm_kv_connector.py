"""`TurnoutKvStoreConnector`: a vLLM KV connector that keeps every full KV block of every request
in a block store shared by the workers, so a request migrated off a dead worker loads the blocks
that worker computed instead of recomputing them.

The store is a directory (on one machine, or a shared filesystem): one file per block, named by
Turnout's chained block hash (`common.block_hash`, the id the router and `kv_dump` use), holding
that block's KV for every attention layer, written to a temporary name and renamed so a reader
never sees half a block. Blocks are written as they fill, prompt and generated tokens alike, so
when a worker is killed mid-stream everything up to its last full block survives it.

vLLM runs a connector in two halves. The scheduler half (in the engine-core process) answers
"how many of this request's leading tokens can be loaded" by looking its block hashes up in the
store (always leaving the last token to compute), and plans each step's loads (into the blocks
vLLM allocated for them) and stores (blocks that became full). The worker half (next to the
model) copies planned blocks between the store and the paged KV cache: loads before the forward
pass, stores after each layer has written its KV. Block copies are whole-block memory copies of
the per-layer cache view, so they need no knowledge of the attention backend's layout inside a
block. A block that cannot be read is reported back and vLLM recomputes it.

Enabled with the worker's `--kv-store DIR` (the vllm engine writes the `--kv-transfer-config`).
Stores are synchronous and the store is never pruned: a deployment-lifetime directory on fast
local storage (e.g. /dev/shm) is the intended use. Owns the store format and both halves; does
not own migration policy (the router) or the worker's own host tier (`--kv-replicas`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from common.block_hash import DEFAULT_SEED, block_hashes, root_hash

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("turnout.worker.vllm")

CONNECTOR_NAME = "TurnoutKvStoreConnector"
MODULE_PATH = __name__
# Requests whose (vLLM-internal) id starts with this are never stored: the engine's warm-up.
UNSTORED_PREFIX = "turnout-warm-up"


def block_path(store: str, h: int) -> str:
    return os.path.join(store, f"{h:016x}.safetensors")


@dataclass
class StoreMetadata(KVConnectorMetadata):
    """One step's plan, scheduler half → worker half: (vLLM block id, our block hash)."""

    loads: list[tuple[int, int]] = field(default_factory=list)
    stores: list[tuple[int, int]] = field(default_factory=list)


class _Tracked:
    """Scheduler-side view of one request: its block table and the hashes of its full blocks."""

    __slots__ = ("block_ids", "hashes", "load", "request", "stored")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.block_ids: list[int] = []
        self.hashes: list[int] = []
        self.stored = 0  # leading blocks already in the store (or planned)
        self.load: tuple[int, int] | None = None  # (first block, count) to load next step


class TurnoutKvStoreConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.store = str(extra["store"])
        self.seed = int(extra.get("seed", DEFAULT_SEED))
        self.root = root_hash(self.seed)
        self.block_size = vllm_config.cache_config.block_size
        os.makedirs(self.store, exist_ok=True)
        # scheduler half
        self._requests: dict[str, _Tracked] = {}
        self._matched: dict[str, tuple[int, int]] = {}  # request → (first block, count) found
        # worker half
        self._saving: dict[int, dict[str, torch.Tensor]] = {}
        self._load_errors: set[int] = set()

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a lost store is a later miss, nothing more

    # -- scheduler half ----------------------------------------------------------------------------

    def _hashes(self, tracked: _Tracked, full_blocks: int) -> list[int]:
        """Chained hashes of the request's first `full_blocks` blocks (computed once each)."""
        hashes = tracked.hashes
        tokens = tracked.request.all_token_ids
        bs = self.block_size
        full_blocks = min(full_blocks, len(tokens) // bs)
        if len(hashes) < full_blocks:
            # A salted request's blocks are stored under its salt (`cache_salt`), as the router
            # and the migration path name them.
            salt = getattr(tracked.request, "cache_salt", None) if not hashes else None
            parent = hashes[-1] if hashes else root_hash(self.seed, salt) if salt else self.root
            hashes += block_hashes(tokens[len(hashes) * bs:full_blocks * bs], bs, parent=parent)
        return hashes

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        if request.request_id.startswith(UNSTORED_PREFIX):
            return 0, False
        tracked = self._requests.get(request.request_id) or _Tracked(request)
        self._requests[request.request_id] = tracked
        # Leave the last token to compute: its logits are needed.
        usable = (request.num_tokens - 1) // self.block_size
        hashes = self._hashes(tracked, usable)
        first = num_computed_tokens // self.block_size
        n = 0
        while first + n < len(hashes) and os.path.exists(block_path(self.store,
                                                                    hashes[first + n])):
            n += 1
        self._matched[request.request_id] = (first, n)
        return n * self.block_size, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        if request.request_id.startswith(UNSTORED_PREFIX):
            return
        tracked = self._requests.setdefault(request.request_id, _Tracked(request))
        first, n = self._matched.pop(request.request_id, (0, 0))
        if num_external_tokens > 0:
            tracked.load = (first, num_external_tokens // self.block_size)
            tracked.stored = max(tracked.stored, first + n)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = StoreMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._plan(tracked, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # after a preemption: the whole table anew
                tracked.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                tracked.block_ids.extend(new_ids[0])
            self._plan(tracked, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta)
        return meta

    def _plan(self, tracked: _Tracked, computed_after: int, meta: StoreMetadata) -> None:
        if tracked.load is not None:
            first, n = tracked.load
            tracked.load = None
            hashes = self._hashes(tracked, first + n)
            for b in range(first, min(first + n, len(hashes), len(tracked.block_ids))):
                meta.loads.append((tracked.block_ids[b], hashes[b]))
        hashes = self._hashes(tracked, computed_after // self.block_size)
        upto = min(len(hashes), len(tracked.block_ids))
        for b in range(tracked.stored, upto):
            if not os.path.exists(block_path(self.store, hashes[b])):
                meta.stores.append((tracked.block_ids[b], hashes[b]))
        tracked.stored = max(tracked.stored, upto)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        return False, None

    # -- worker half -------------------------------------------------------------------------------

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StoreMetadata)
        if not meta.loads:
            return
        layers = _kv_layers(forward_context)
        for block_id, h in meta.loads:
            try:
                saved = safetensors.torch.load_file(block_path(self.store, h))
                for name, cache in layers.items():
                    cache[block_id].copy_(saved[name])
            except (OSError, KeyError, RuntimeError, ValueError) as exc:
                log.warning("KV block %016x could not be loaded (%s); recomputing it", h, exc)
                self._load_errors.add(block_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StoreMetadata)
        for block_id, h in meta.stores:
            self._saving.setdefault(h, {})[layer_name] = kv_layer[block_id].detach().to(
                "cpu", copy=True).contiguous()

    def wait_for_save(self) -> None:
        saving, self._saving = self._saving, {}
        for h, tensors in saving.items():
            final = block_path(self.store, h)
            tmp = f"{final}.{os.getpid()}.tmp"
            try:
                safetensors.torch.save_file(tensors, tmp)
                os.replace(tmp, final)
            except OSError as exc:
                log.warning("KV block %016x not stored: %s", h, exc)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors


def _kv_layers(forward_context: ForwardContext) -> dict[str, torch.Tensor]:
    """Every attention layer's paged KV cache view (blocks first), by layer name."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in forward_context.no_compile_layers.items():
        cache = getattr(layer, "kv_cache", None)
        if isinstance(cache, list):  # older vLLM: one per virtual engine
            cache = cache[0] if cache else None
        if isinstance(cache, torch.Tensor):
            out[name] = cache
    return out
