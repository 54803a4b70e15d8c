"""Leases on the KV blocks a finished prefill keeps for its decode worker.

A prefill-phase request ends with its first token, but its KV must outlive it until the decode
worker has copied it. The lease ends on the decode side's release (`KIND_KV_RELEASE`) or when
it expires, so a decode worker that dies before pulling never leaks the blocks. Owns the
expiry times only; freeing the blocks is the engine's (`Engine.release_held`).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class KvLeases:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._expires: dict[str, float] = {}  # request id → monotonic expiry

    def __len__(self) -> int:
        return len(self._expires)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._expires

    def hold(self, request_id: str, seconds: float) -> None:
        self._expires[request_id] = self._clock() + seconds

    def release(self, request_id: str) -> bool:
        """The decode side is done with it; False when no lease was held (expired, unknown)."""
        return self._expires.pop(request_id, None) is not None

    def extend(self, seconds: float) -> None:
        """Every lease runs `seconds` longer: time this process did not run is not the decode
        side's to lose."""
        for rid in self._expires:
            self._expires[rid] += seconds

    def expired(self, now: float | None = None) -> list[str]:
        """Leases past their expiry at `now` (the clock, unless given), removed."""
        now = self._clock() if now is None else now
        gone = [rid for rid, at in self._expires.items() if at <= now]
        for rid in gone:
            del self._expires[rid]
        return gone
