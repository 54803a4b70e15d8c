"""Choosing a worker in the router's mode: the candidates, the policy's pure decision, and the
commit that makes a decision count.

A request naming its worker (`target_worker`, set by a gateway) gets it in every mode; any
other goes to the mode's policy. `decide` changes nothing (POST /v1/route previews call it);
`commit` is what a real placement adds: the policy's own state, the approximate index's
prediction (--no-kv-events: the prefix will be cached where the request went) and the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common.block_hash import block_hashes
from common.messages import MODE_PREFILL, GenerateRequest
from services.router.approx_kv_index import ApproxKvIndex
from services.router.args import RouterConfig
from services.router.cost_model import CostModels
from services.router.kv_index import KvIndex
from services.router.kv_policy import KvAwarePolicy
from services.router.metrics import RouterMetrics
from services.router.policies import (
    Decision,
    Direct,
    NoWorkerError,
    Policy,
    make_policy,
    sequence_tokens,
)
from services.router.request_needs import able_workers, prefer_able
from services.router.worker_pool import WorkerHandle, WorkerPool


class Selector:
    def __init__(self, pool: WorkerPool, policy: Policy, metrics: RouterMetrics,
                 approx_index: ApproxKvIndex | None = None, hash_seed: int = 0,
                 timer: Callable[[], float] = time.perf_counter,
                 fallback_after_s: float | None = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        # --prefill-fallback-after-ms (None: --no-prefill-fallback), and since when no decode
        # or aggregated worker has served each model (as last seen).
        self.fallback_after_s = fallback_after_s
        self._clock = clock
        self._unserved_since: dict[str, float] = {}
        self.policy = policy
        self.direct = Direct()
        self.metrics = metrics
        self.approx_index = approx_index
        self.hash_seed = hash_seed
        self._timer = timer

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def cost_models(self) -> CostModels | None:
        """The adaptive cost's per-model fits (kv mode without --kv-overlap-weight), which the
        event intake feeds with forward-pass records."""
        return self.policy.cost_models if isinstance(self.policy, KvAwarePolicy) else None

    def candidates(self, model: str, exclude: str = "",
                   asking: GenerateRequest | None = None) -> list[WorkerHandle]:
        """Routable workers of `model` (but `exclude`) that serve whole requests: decode and
        aggregated ones (a prefill worker takes prefill phases: `disaggregation.py`), or, with
        none of those left for a while (`prefill_fallback`), the prefill workers: a stream or a
        request served by the prefill pool is slower there than on a decode worker, and better
        than failed. NoWorkerError when there are none. `asking`: a new request, for the
        workers that honour all it asks (`request_needs.able_workers`)."""
        routable = [w for w in self.pool.routable(model) if w.id != exclude]
        if asking is not None:
            routable = able_workers(routable, asking)
        candidates = [w for w in routable if w.mode != MODE_PREFILL]
        if not candidates and self.prefill_fallback(model):
            candidates = routable
        if not candidates:
            raise NoWorkerError(f"no live worker serves model {model!r}", 503)
        return candidates

    def prefill_fallback(self, model: str) -> bool:
        """Whether the prefill pool may serve `model` whole now: no decode or aggregated worker
        has for `--prefill-fallback-after-ms`. Until then requests and hand-offs wait for one
        (a worker restarting, a blip in discovery), rather than put whole streams on the
        prefill pool."""
        if self.fallback_after_s is None or any(
                w.mode != MODE_PREFILL for w in self.pool.routable(model)):
            self._unserved_since.pop(model, None)
            return False
        now = self._clock()
        return now - self._unserved_since.setdefault(model, now) >= self.fallback_after_s

    def note_serving(self) -> None:
        """Date each model's loss of its last decode and aggregated worker (called every half
        heartbeat, so an outage is timed from its start, not from the first request in it)."""
        for model in self.pool.models() | set(self._unserved_since):
            self.prefill_fallback(model)

    def decide(self, request: GenerateRequest, exclude: str = "",
               hint: dict[str, int] | None = None, prefer: str = "") -> Decision:
        """The worker for `request`, committing nothing. RoutingError when there is none.
        `prefer`: a worker id the policy is given alone when it is a candidate."""
        # A stream on its way elsewhere (a migration, a resume with tokens) keeps going on any
        # worker rather than fail; one sent by name is the worker's to refuse.
        fresh = not (request.target_worker or exclude or request.generated_token_ids)
        candidates = self.candidates(request.model, exclude, request if fresh else None)
        if not request.target_worker:
            if not fresh:
                candidates = prefer_able(candidates, request)
            preferred = [w for w in candidates if w.id == prefer] if prefer else []
            return self.policy.decide(request, preferred or candidates, hint)
        decision = self.direct.decide(request, candidates, hint)
        if self.approx_index is not None:
            # A gateway chose (maybe after a preview): the prefix gets cached there all the
            # same, and the prediction must say so.
            decision.hashes = block_hashes(sequence_tokens(request), decision.worker.block_size,
                                           self.hash_seed, salt=request.cache_salt)
        return decision

    def commit(self, decision: Decision) -> None:
        (self.direct if decision.policy == Direct.name else self.policy).commit(decision)
        if self.approx_index is not None:
            self.approx_index.record(decision.worker.id, decision.hashes)
        if decision.policy == KvAwarePolicy.name and decision.request_blocks:
            self.metrics.overlap.observe(decision.overlap / decision.request_blocks)
        self.metrics.decisions.labels(decision.policy).inc()

    def choose(self, request: GenerateRequest, exclude: str = "",
               hint: dict[str, int] | None = None, prefer: str = "") -> Decision:
        """Decide and commit: the request goes to the returned worker."""
        t0 = self._timer()
        decision = self.decide(request, exclude, hint, prefer)
        self.commit(decision)
        self.metrics.decision_seconds.observe(self._timer() - t0)
        return decision


def build_selection(config: RouterConfig, pool: WorkerPool, metrics: RouterMetrics,
                    ) -> tuple[Selector, KvIndex | None]:
    """The selector of `config.router_mode`, and the KV index it reads (kv mode with events)."""
    fallback = config.prefill_fallback_after_ms / 1000 if config.prefill_fallback else None
    if config.router_mode != KvAwarePolicy.name:
        return Selector(pool, make_policy(config.router_mode), metrics,
                        fallback_after_s=fallback), None
    kv_index = KvIndex() if config.kv_events else None
    approx_index = None if config.kv_events else ApproxKvIndex(ttl_s=config.kv_ttl_s)
    policy = KvAwarePolicy(
        kv_index if kv_index is not None else approx_index,  # type: ignore[arg-type]
        overlap_weight=config.kv_overlap_weight, temperature=config.router_temperature,
        hotspot_margin=config.hotspot_margin, seed=config.hash_seed)
    return Selector(pool, policy, metrics, approx_index, config.hash_seed,
                    fallback_after_s=fallback), kv_index
