"""KV-aware worker selection: send a request where its prefix is cached, without hotspots.

cost(w) = overlap_weight * (request blocks - cached overlap(w) + w's queued prefill blocks)
          + w's active decode blocks

Loads are the larger of what this router itself has in flight on the worker (fresh at every
decision) and what the worker last reported (which includes other routers' traffic; ignored
when older than the last request this router saw leave the worker). The lowest
cost wins; ties go to the less loaded worker, then to the one chosen longest ago, so equal
scores never pile onto the first worker in a list. With `temperature` > 0 the choice is a
softmax draw over normalised costs.
The hotspot guard drops a worker whose load exceeds the mean by more than `hotspot_margin`
(a fraction) before costs are compared, so a shared system prompt cannot send every request to
the one worker that cached it first.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

from common.block_hash import DEFAULT_SEED, block_hashes
from common.messages import GenerateRequest
from services.router.policies import Decision, request_blocks, sequence_tokens
from services.router.worker_pool import WorkerHandle


class PrefixIndex(Protocol):
    def find_matches(self, hashes: list[int]) -> dict[str, int]: ...


class KvAwarePolicy:
    name = "kv"

    def __init__(self, index: PrefixIndex, overlap_weight: float = 1.0,
                 temperature: float = 0.0, hotspot_margin: float = 0.5,
                 seed: int = DEFAULT_SEED, rng: random.Random | None = None) -> None:
        self.index = index
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.hotspot_margin = hotspot_margin
        self.seed = seed
        self._rng = rng or random.Random()
        self._turn = 0  # decisions committed: the "chosen longest ago" tie-break's clock

    def decide(self, request: GenerateRequest, candidates: list[WorkerHandle],
               hint: dict[str, int] | None = None) -> Decision:
        """`hint`: blocks known to be held outside the index (a migration's replica peers)."""
        block_size = candidates[0].block_size
        tokens = sequence_tokens(request)
        hashes = block_hashes(tokens, block_size, self.seed)
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
        costs = [self.overlap_weight * (blocks - matches.get(candidates[i].id, 0)
                                        + loads[i][0]) + loads[i][1] for i in pool]
        if self.temperature > 0 and len(pool) > 1:
            pick = pool[self._softmax(costs)]
        else:
            best = min(costs)
            tied = [i for i, c in zip(pool, costs, strict=True) if c == best]
            pick = min(tied, key=lambda i: (sum(loads[i]), candidates[i].last_chosen))
        worker = candidates[pick]
        return Decision(worker, blocks, matches.get(worker.id, 0), hashes,
                        costs[pool.index(pick)], policy=self.name)

    def commit(self, decision: Decision) -> None:
        self._turn += 1
        decision.worker.last_chosen = self._turn

    def _softmax(self, costs: list[float]) -> int:
        lo, hi = min(costs), max(costs)
        span = (hi - lo) or 1.0
        weights = [math.exp(-(c - lo) / span / self.temperature) for c in costs]
        return self._rng.choices(range(len(costs)), weights=weights)[0]


def load_of(worker: WorkerHandle) -> tuple[float, float]:
    """(queued prefill blocks, active decode blocks) of a worker."""
    usage = worker.usage
    prefill = float(usage.pending_prefill_blocks)
    decode = float(usage.active_blocks)
    report = worker.load
    # A report older than the last request that left the worker still counts that request.
    if report is not None and worker.load_at > usage.released_at:
        prefill = max(prefill, report.active_prefill_tokens / worker.block_size)
        decode = max(decode, float(report.active_decode_blocks))
    return prefill, decode
