"""KV-aware worker selection: send a request where its prefix is cached, without hotspots.

Two costs. The adaptive one (the default: `overlap_weight` None) is in milliseconds, from
`cost_model.py`: the predicted time to the request's first token on w (its queued prefill plus
the request's uncached tokens, chunk by chunk, with the decode passes beside them) plus the
fleet's measured queueing pressure times the request's own prefill work there; the step-time
model is fitted per served model from the workers' forward-pass records (`fpm`). The block cost
(`overlap_weight` set) is a fixed trade-off in KV blocks:

cost(w) = overlap_weight * (request blocks - cached overlap(w) + w's queued prefill blocks)
          + w's active decode blocks

Loads are the larger of what this router itself has in flight on the worker (fresh at every
decision) and what the worker last reported (which includes other routers' traffic; ignored
when older than the last request this router saw leave the worker). The lowest
cost wins; ties go to the less loaded worker, then to the one caching more of the prompt, then
to the one chosen longest ago, so equal scores never pile onto the first worker in a list. With
`temperature` > 0 the choice is a softmax draw over normalised costs.
The hotspot guard (`hotspot_margin` >= 0; by default 0.5 with the block cost and off with the
adaptive one, which prices queues itself) drops a worker whose load in blocks exceeds the mean
by more than that fraction before costs are compared, so a shared system prompt cannot send
every request to the one worker that cached it first.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

from common.block_hash import DEFAULT_SEED, block_hashes
from common.messages import GenerateRequest
from services.router.cost_model import CostModels, WorkerLoad
from services.router.policies import Decision, request_blocks, sequence_tokens
from services.router.worker_pool import WorkerHandle


class PrefixIndex(Protocol):
    def find_matches(self, hashes: list[int]) -> dict[str, int]: ...


class KvAwarePolicy:
    name = "kv"

    def __init__(self, index: PrefixIndex, overlap_weight: float | None = 1.0,
                 temperature: float = 0.0, hotspot_margin: float | None = None,
                 seed: int = DEFAULT_SEED, rng: random.Random | None = None,
                 cost_models: CostModels | None = None, decode_weight: float = 1.0) -> None:
        """`overlap_weight` None: the adaptive cost, over `cost_models` (fed by the caller with
        forward-pass records; a fresh one when not given). `hotspot_margin` None: 0.5 with the
        block cost, off (-1) with the adaptive one. `decode_weight` weighs active decode blocks
        in the block cost (0: a prefill worker, whose decode load is nil)."""
        self.index = index
        self.overlap_weight = overlap_weight
        self.cost_models = None
        if overlap_weight is not None and cost_models is not None:
            raise ValueError("cost_models are the adaptive cost's: give no overlap_weight")
        if overlap_weight is None:
            self.cost_models = cost_models if cost_models is not None else CostModels()
        self.temperature = temperature
        if hotspot_margin is None:
            hotspot_margin = -1.0 if overlap_weight is None else 0.5
        self.hotspot_margin = hotspot_margin
        self.seed = seed
        self.decode_weight = decode_weight
        self._rng = rng or random.Random()
        self._turn = 0  # decisions committed: the "chosen longest ago" tie-break's clock

    def decide(self, request: GenerateRequest, candidates: list[WorkerHandle],
               hint: dict[str, int] | None = None) -> Decision:
        """`hint`: blocks known to be held outside the index (a migration's replica peers)."""
        block_size = candidates[0].block_size
        tokens = sequence_tokens(request)
        hashes = block_hashes(tokens, block_size, self.seed, salt=request.cache_salt)
        blocks = request_blocks(request, block_size)
        matches = self.index.find_matches(hashes) if hashes else {}
        if hint:
            matches = {**matches, **{w: max(n, matches.get(w, 0)) for w, n in hint.items()}}
        loads = [load_of(w) for w in candidates]
        pool = list(range(len(candidates)))
        if len(candidates) > 1 and self.hotspot_margin >= 0:
            mean = sum(p + d for p, d in loads) / len(loads)
            cap = (1 + self.hotspot_margin) * mean + blocks
            cool = [i for i in pool if loads[i][0] + loads[i][1] <= cap]
            pool = cool or pool
        quote = None
        if self.cost_models is not None:
            route = self.cost_models.get(candidates[0].instance.model)
            n = len(tokens)
            quote = route.quote(
                [worker_load(candidates[i], loads[i]) for i in pool],
                [max(1, n - matches.get(candidates[i].id, 0) * block_size) for i in pool])
            costs = quote.costs
        else:
            weight = self.overlap_weight or 0.0
            costs = [weight * (blocks - matches.get(candidates[i].id, 0) + loads[i][0])
                     + self.decode_weight * loads[i][1] for i in pool]
        if self.temperature > 0 and len(pool) > 1:
            pick = pool[self._softmax(costs)]
        else:
            best = min(costs)
            tied = [i for i, c in zip(pool, costs, strict=True) if c == best]
            # A tie goes to the least loaded, then to the one caching more of the prompt (a
            # flat cost fit says nothing of the work saved), then to the one chosen longest ago.
            pick = min(tied, key=lambda i: (sum(loads[i]), -matches.get(candidates[i].id, 0),
                                            candidates[i].last_chosen))
        worker = candidates[pick]
        decision = Decision(worker, blocks, matches.get(worker.id, 0), hashes,
                            costs[pool.index(pick)], policy=self.name)
        decision.quote = quote
        return decision

    def commit(self, decision: Decision) -> None:
        self._turn += 1
        decision.worker.last_chosen = self._turn
        if self.cost_models is not None and decision.quote is not None:
            self.cost_models.get(decision.worker.instance.model).observe(decision.quote)

    def _softmax(self, costs: list[float]) -> int:
        lo, hi = min(costs), max(costs)
        span = (hi - lo) or 1.0
        weights = [math.exp(-(c - lo) / span / self.temperature) for c in costs]
        return self._rng.choices(range(len(costs)), weights=weights)[0]


def load_of(worker: WorkerHandle) -> tuple[float, float]:
    """(queued prefill blocks, active decode blocks) of a worker."""
    usage = worker.usage
    # Ours plus what the other router replicas placed (replica sync).
    prefill = float(usage.pending_prefill_blocks + worker.peer_prefill_blocks)
    decode = float(usage.active_blocks + worker.peer_active_blocks)
    report = worker.load
    # A report older than the last request that left the worker still counts that request.
    if report is not None and worker.load_at > usage.released_at:
        prefill = max(prefill, report.active_prefill_tokens / worker.block_size)
        decode = max(decode, float(report.active_decode_blocks))
    return prefill, decode


def worker_load(worker: WorkerHandle, load: tuple[float, float]) -> WorkerLoad:
    """The adaptive cost's view of a worker, from `load_of`'s (prefill, decode) blocks: queued
    prefill tokens, decoding sequences (this router's requests there, or the worker's own
    running count when its report is fresh and larger), KV usage (active blocks over the pool
    its load report gives; 0 before any report)."""
    report = worker.load
    decoding = float(len(worker.usage.requests))
    used = load[1]
    total = 0
    if report is not None:
        total = report.kv_total_blocks
        if worker.load_at > worker.usage.released_at:
            decoding = max(decoding, float(report.running))
            used = max(used, float(report.kv_used_blocks))
    return WorkerLoad(load[0] * worker.block_size, decoding,
                      min(1.0, used / total) if total > 0 else 0.0)
