"""Requests parked until a worker for their model appears (discovery lags a starting worker by
a poll): each waits up to `no_worker_wait_ms`, then gets a 503."""

from __future__ import annotations

import dataclasses

from common.messages import GenerateRequest


@dataclasses.dataclass(slots=True)
class ParkedRequest:
    deadline: float  # monotonic time after which it gets a 503
    frontend: bytes  # ROUTER identity of the frontend connection
    request: GenerateRequest
    payload: bytes  # the request as received, forwarded unchanged once placed


class ParkingLot:
    def __init__(self) -> None:
        self.requests: dict[str, ParkedRequest] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def park(self, parked: ParkedRequest) -> None:
        self.requests[parked.request.request_id] = parked

    def cancel(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def take_all(self) -> list[ParkedRequest]:
        """Every parked request, leaving the lot empty (those still unplaced park again)."""
        parked = list(self.requests.values())
        self.requests.clear()
        return parked
