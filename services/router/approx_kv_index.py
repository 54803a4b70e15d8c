"""The router's guess of each worker's KV cache when engines publish no KV events.

Owns a TTL table built from the router's own routing decisions: `record(worker, hashes)` says
"these blocks are on that worker now" and they count as cached for `ttl_s` seconds, refreshed
whenever recorded again. Lookups answer the same question as `KvIndex.find_matches` and ignore
expired entries. Expired entries are purged lazily on every call, at most `sweep_budget` per
call, so memory follows the live set and no single call stalls the event loop.

Does not own the exact, event-fed index (`kv_index`), nor deciding when to record (the router's
main loop records the blocks of each request it routes).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from services.router.kv_index import WorkerSlots, clear_bit, prefix_overlaps, set_bit


class ApproxKvIndex:
    """Blocks the router has sent to each worker, each alive until its TTL runs out.

    `clock` must not go backwards (expiry order is record order).
    """

    def __init__(
        self,
        ttl_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        sweep_budget: int = 8192,
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._sweep_budget = sweep_budget
        self._slots = WorkerSlots()
        self._masks: dict[int, int] = {}  # block hash -> bitmask of slots holding it (live or not)
        # slot -> hash -> expiry, oldest first; refreshed entries move to the end.
        self._expiry: list[OrderedDict[int, float]] = []
        self._earliest = math.inf  # lower bound on every stored expiry

    def record(self, worker_id: str, hashes: Sequence[int]) -> None:
        """Mark `hashes` as cached on `worker_id` until now + ttl."""
        now = self._clock()
        self._sweep(now)
        slot = self._slots.acquire(worker_id)
        if slot == len(self._expiry):
            self._expiry.append(OrderedDict())
        table = self._expiry[slot]
        expires = now + self.ttl_s
        fresh = []
        for h in hashes:
            if h in table:
                table.move_to_end(h)
            else:
                fresh.append(h)
            table[h] = expires
        set_bit(self._masks, 1 << slot, fresh)
        if hashes and expires < self._earliest:
            self._earliest = expires

    def find_matches(self, hashes: Sequence[int]) -> dict[str, int]:
        """worker id -> number of leading blocks of `hashes` it holds unexpired (> 0 only)."""
        now = self._clock()
        behind = self._sweep(now)
        found = prefix_overlaps(self._masks, self._slots.worker_at, hashes)
        # Workers the bounded sweep did not finish still have expired bits in the masks, so
        # their mask overlap is only an upper bound: confirm it entry by entry.
        for slot in behind:
            worker = self._slots.worker_at[slot]
            depth = found.get(worker)  # type: ignore[arg-type]
            if depth is None:
                continue
            table = self._expiry[slot]
            live = 0
            while live < depth and table.get(hashes[live], -math.inf) > now:
                live += 1
            if live:
                found[worker] = live  # type: ignore[index]
            else:
                del found[worker]  # type: ignore[arg-type]
        return found

    def remove_worker(self, worker_id: str) -> None:
        slot = self._slots.release(worker_id)
        if slot is None:
            return
        table = self._expiry[slot]
        clear_bit(self._masks, 1 << slot, table)
        table.clear()

    def num_entries(self) -> int:
        """(worker, block) pairs stored, including expired ones not yet swept."""
        return sum(map(len, self._expiry))

    def num_blocks(self) -> int:
        """Distinct block hashes stored, including expired ones not yet swept."""
        return len(self._masks)

    def _sweep(self, now: float) -> list[int]:
        """Drop up to `sweep_budget` expired entries; return the slots still holding some."""
        if now < self._earliest:
            return []
        budget = self._sweep_budget
        earliest = math.inf
        behind: list[int] = []
        for slot, table in enumerate(self._expiry):
            expired = []
            for h, expires in table.items():
                if expires > now or len(expired) == budget:
                    break
                expired.append(h)
            for h in expired:
                del table[h]
            clear_bit(self._masks, 1 << slot, expired)
            budget -= len(expired)
            if table:
                first = table[next(iter(table))]
                if first <= now:
                    behind.append(slot)
                earliest = min(earliest, first)
        self._earliest = earliest
        return behind
