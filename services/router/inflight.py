"""The router's table of in-flight requests: who asked, which worker serves, what was streamed.

It keeps each request's prompt, sampling parameters and every token already streamed, which is
exactly what a migration needs to continue the stream on another worker.
"""

from __future__ import annotations

from common.messages import GenerateRequest


class InflightRequest:
    __slots__ = ("blocks", "frontend", "generated", "hashes", "migrations", "prefill_blocks",
                 "request", "resume_tokens", "worker_id")

    def __init__(self, request: GenerateRequest, frontend: bytes, worker_id: str) -> None:
        self.request = request
        self.frontend = frontend  # ROUTER identity of the frontend connection
        self.worker_id = worker_id
        self.generated: list[int] = list(request.generated_token_ids)
        self.migrations = 0
        self.blocks = 0  # KV blocks it holds on its worker (router's accounting)
        self.prefill_blocks = 0  # blocks still to prefill until its first token arrives
        self.hashes: list[int] = []
        self.resume_tokens = 0  # sequence length at the last migration (0: none pending)


class InflightTable:
    def __init__(self) -> None:
        self.requests: dict[str, InflightRequest] = {}
        self.by_worker: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def get(self, request_id: str) -> InflightRequest | None:
        return self.requests.get(request_id)

    def add(self, entry: InflightRequest) -> None:
        self.requests[entry.request.request_id] = entry
        self.by_worker.setdefault(entry.worker_id, set()).add(entry.request.request_id)

    def move(self, entry: InflightRequest, worker_id: str) -> None:
        rid = entry.request.request_id
        self.by_worker.get(entry.worker_id, set()).discard(rid)
        entry.worker_id = worker_id
        self.by_worker.setdefault(worker_id, set()).add(rid)

    def remove(self, request_id: str) -> InflightRequest | None:
        entry = self.requests.pop(request_id, None)
        if entry is not None:
            ids = self.by_worker.get(entry.worker_id)
            if ids is not None:
                ids.discard(request_id)
        return entry

    def on_worker(self, worker_id: str) -> list[InflightRequest]:
        return [self.requests[r] for r in self.by_worker.get(worker_id, ()) if r in self.requests]

    def count(self, worker_id: str) -> int:
        return len(self.by_worker.get(worker_id, ()))
