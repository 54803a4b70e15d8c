"""Worker selection policies behind one interface: round-robin, random, least-loaded, direct.

Every policy (the kv policy in `kv_policy.py` too) answers `decide(request, candidates, hint)`
with a `Decision` and changes nothing while doing so, so a preview (POST /v1/route) can ask the
same question as a real placement. Only `commit(decision)` advances the policy's own state
(a round-robin turn, a tie-break stamp). `hint` maps worker ids to KV blocks known to be held
there (a migration's replica peers and prefix caches): the load-blind policies prefer those
workers, the kv policy counts them as overlap.
"""

from __future__ import annotations

import random
from typing import Protocol

from common.messages import GenerateRequest
from services.router.worker_pool import WorkerHandle


class RoutingError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class NoWorkerError(RoutingError):
    """No routable worker serves the model (yet)."""


class Decision:
    """A chosen worker and what the choice predicts: the request's size in KV blocks, how many
    of them the worker already holds, their hashes (kv and approximate modes), the cost."""

    __slots__ = ("cost", "hashes", "overlap", "policy", "request_blocks", "worker")

    def __init__(self, worker: WorkerHandle, request_blocks: int, overlap: int = 0,
                 hashes: list[int] | None = None, cost: float | None = None,
                 policy: str = "") -> None:
        self.worker = worker
        self.request_blocks = request_blocks
        self.overlap = overlap
        self.hashes = hashes or []
        self.cost = cost  # the kv policy's cost of the chosen worker (None: other policies)
        self.policy = policy  # name of the policy that decided (the decisions metric's label)


def sequence_tokens(request: GenerateRequest) -> list[int]:
    """Prompt plus anything generated before a migration: what the worker must hold in KV."""
    if request.generated_token_ids:
        return request.token_ids + request.generated_token_ids
    return request.token_ids


def request_blocks(request: GenerateRequest, block_size: int) -> int:
    """KV blocks the sequence occupies, its last partial block included."""
    n = len(request.token_ids) + len(request.generated_token_ids)
    return -(-n // block_size)


class Policy(Protocol):
    name: str

    def decide(self, request: GenerateRequest, candidates: list[WorkerHandle],
               hint: dict[str, int] | None = None) -> Decision:
        """The worker for `request` among `candidates` (never empty); changes nothing."""
        ...

    def commit(self, decision: Decision) -> None:
        """`decision` was acted on: advance whatever state later decisions depend on."""
        ...


def _held_first(candidates: list[WorkerHandle],
                hint: dict[str, int] | None) -> list[WorkerHandle]:
    """A migration goes to a worker holding the request's KV when there is one."""
    held = [w for w in candidates if hint and hint.get(w.id)]
    return held or candidates


def _decision(worker: WorkerHandle, request: GenerateRequest, hint: dict[str, int] | None,
              policy: str) -> Decision:
    return Decision(worker, request_blocks(request, worker.block_size),
                    hint.get(worker.id, 0) if hint else 0, policy=policy)


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = 0

    def decide(self, request: GenerateRequest, candidates: list[WorkerHandle],
               hint: dict[str, int] | None = None) -> Decision:
        pool = _held_first(candidates, hint)
        return _decision(pool[(self._turn + 1) % len(pool)], request, hint, self.name)

    def commit(self, decision: Decision) -> None:
        self._turn += 1


class RandomChoice:
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def decide(self, request: GenerateRequest, candidates: list[WorkerHandle],
               hint: dict[str, int] | None = None) -> Decision:
        return _decision(self._rng.choice(_held_first(candidates, hint)), request, hint,
                         self.name)

    def commit(self, decision: Decision) -> None:
        pass  # nothing to remember: every draw is independent


class LeastLoaded:
    """Fewest requests in flight through this router, then least KV in use; ties rotate."""

    name = "least-loaded"

    def __init__(self) -> None:
        self._turn = 0

    def decide(self, request: GenerateRequest, candidates: list[WorkerHandle],
               hint: dict[str, int] | None = None) -> Decision:
        pool = _held_first(candidates, hint)
        k = (self._turn + 1) % len(pool)
        rotated = pool[k:] + pool[:k]
        worker = min(rotated, key=lambda w: (w.inflight, w.load.kv_used_blocks if w.load else 0))
        return _decision(worker, request, hint, self.name)

    def commit(self, decision: Decision) -> None:
        self._turn += 1


def select_target(candidates: list[WorkerHandle], request: GenerateRequest) -> WorkerHandle:
    """The worker an upstream gateway named in `target_worker` (honoured in every mode): a
    worker id, or "HOST:PORT" of one of its endpoints (the Gateway API Inference Extension's
    `x-gateway-destination-endpoint`; a comma-separated list is tried in order)."""
    target = request.target_worker or ""
    for worker in candidates:
        if worker.id == target:
            return worker
    for wanted in target.split(","):
        wanted = wanted.strip()
        if ":" not in wanted:
            continue
        for worker in candidates:
            if wanted in endpoint_addresses(worker):
                return worker
    raise RoutingError(f"{target!r} names no live worker serving {request.model!r} (by "
                       "worker id or by HOST:PORT of a worker endpoint)", 400)


def endpoint_addresses(worker: WorkerHandle) -> set[str]:
    """"HOST:PORT" of every endpoint in the worker's discovery record (request, events,
    metrics...), the form a gateway's endpoint picker names a pod by."""
    out = set()
    for url in worker.instance.endpoints.values():
        netloc = url.split("://", 1)[-1].split("/", 1)[0]
        if ":" in netloc:
            out.add(netloc)
    return out


class Direct:
    """The worker the request names (`x-worker-instance-id`): a gateway picks. As the router's
    mode, every request must name one."""

    name = "direct"

    def decide(self, request: GenerateRequest, candidates: list[WorkerHandle],
               hint: dict[str, int] | None = None) -> Decision:
        if not request.target_worker:
            raise RoutingError("router mode 'direct' needs the x-worker-instance-id or the "
                               "x-gateway-destination-endpoint header", 400)
        worker = select_target(candidates, request)
        return Decision(worker, request_blocks(request, worker.block_size), policy=self.name)

    def commit(self, decision: Decision) -> None:
        pass  # the gateway chose; nothing here depends on it


def make_policy(mode: str) -> Policy:
    """The load-blind policy of `mode` (the kv policy needs an index: see `selection.py`)."""
    if mode == "round-robin":
        return RoundRobin()
    if mode == "random":
        return RandomChoice()
    if mode == "least-loaded":
        return LeastLoaded()
    if mode == "direct":
        return Direct()
    raise ValueError(f"unknown router mode {mode!r}")
