"""Worker selection policies: round-robin, random, least-loaded and direct.

A policy sees the routable workers that serve the request's model and returns one. KV-aware
selection (overlap against the KV index) plugs in here too.
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


class Policy(Protocol):
    name: str

    def select(self, candidates: list[WorkerHandle], request: GenerateRequest) -> WorkerHandle: ...


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, candidates: list[WorkerHandle], request: GenerateRequest) -> WorkerHandle:
        self._next += 1
        return candidates[self._next % len(candidates)]


class RandomChoice:
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, candidates: list[WorkerHandle], request: GenerateRequest) -> WorkerHandle:
        return self._rng.choice(candidates)


class LeastLoaded:
    """Fewest requests in flight through this router, then least KV in use; ties rotate."""

    name = "least-loaded"

    def __init__(self) -> None:
        self._turn = 0

    def select(self, candidates: list[WorkerHandle], request: GenerateRequest) -> WorkerHandle:
        self._turn += 1
        n = len(candidates)
        rotated = candidates[self._turn % n:] + candidates[: self._turn % n]
        return min(rotated, key=lambda w: (w.inflight, w.load.kv_used_blocks if w.load else 0))


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
    """Every request must name its worker (`x-worker-instance-id`): a gateway picks."""

    name = "direct"

    def select(self, candidates: list[WorkerHandle], request: GenerateRequest) -> WorkerHandle:
        if not request.target_worker:
            raise RoutingError("router mode 'direct' needs the x-worker-instance-id or the "
                               "x-gateway-destination-endpoint header", 400)
        return select_target(candidates, request)


def make_policy(mode: str) -> Policy:
    if mode == "round-robin":
        return RoundRobin()
    if mode == "random":
        return RandomChoice()
    if mode == "least-loaded":
        return LeastLoaded()
    if mode == "direct":
        return Direct()
    raise ValueError(f"unknown router mode {mode!r}")
