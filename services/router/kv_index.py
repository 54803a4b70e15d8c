"""The router's index of which worker caches which KV block, and the prefix walk over it.

Owns the block-hash → workers table built from the workers' KV events (`KvEventBatch`), and the
per-request question "how many leading blocks of this request does each worker already hold".
Each worker gets a small integer slot (reused after the worker leaves) and every indexed block maps
to an int bitmask of the slots holding it, so a lookup is one dict probe and one AND per block.
Per-worker hash sets back `remove_worker`, `KvCleared` and dump replacement.

Does not own event transport, sequence-gap detection or resync requests (the router's main loop
does), nor routing costs (`policies`). `WorkerSlots` and `prefix_overlaps` are shared with
`approx_kv_index`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from common.messages import KvBlockRemoved, KvBlockStored, KvCleared, KvEvent, KvEventBatch


class WorkerSlots:
    """Small integer slots for worker ids; freed slots are reused lowest first so masks stay
    as narrow as the live fleet."""

    __slots__ = ("_free", "slot_of", "worker_at")

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.worker_at: list[str | None] = []
        self._free: list[int] = []  # min-heap

    def __len__(self) -> int:
        return len(self.slot_of)

    def acquire(self, worker_id: str) -> int:
        slot = self.slot_of.get(worker_id)
        if slot is not None:
            return slot
        if self._free:
            slot = heapq.heappop(self._free)
            self.worker_at[slot] = worker_id
        else:
            slot = len(self.worker_at)
            self.worker_at.append(worker_id)
        self.slot_of[worker_id] = slot
        return slot

    def release(self, worker_id: str) -> int | None:
        slot = self.slot_of.pop(worker_id, None)
        if slot is not None:
            self.worker_at[slot] = None
            heapq.heappush(self._free, slot)
        return slot


def prefix_overlaps(
    masks: dict[int, int], worker_at: Sequence[str | None], hashes: Sequence[int]
) -> dict[str, int]:
    """For every worker holding `hashes[0]`: how many leading blocks of `hashes` it holds.

    Walks from the front ANDing masks; a slot whose bit drops out at position i has overlap i.
    Stops at the first block no remaining worker holds. `masks` never stores 0. Consecutive
    blocks usually share one mask object, and an identity check skips them without touching it:
    the walk is bound by memory latency, not arithmetic.
    """
    out: dict[str, int] = {}
    if not hashes:
        return out
    get = masks.get
    active = get(hashes[0], 0)
    if not active:
        return out
    prev = active
    depth = len(hashes)
    for i, m in enumerate(map(get, hashes[1:]), 1):
        if m is prev:
            continue  # same mask object as the block before (see set_bit): nothing changes
        if m is None:
            depth = i
            break
        prev = m
        m &= active
        if m != active:
            _assign(out, worker_at, active ^ m, i)
            if not m:
                return out
            active = m
    _assign(out, worker_at, active, depth)
    return out


def _assign(out: dict[str, int], worker_at: Sequence[str | None], bits: int, depth: int) -> None:
    while bits:
        low = bits & -bits
        out[worker_at[low.bit_length() - 1]] = depth  # type: ignore[index]
        bits ^= low


# Mask updates hand consecutive blocks that had the same mask the same new mask object: the
# blocks of one event (usually one chain) share it, which saves memory and lets
# `prefix_overlaps` skip them by identity.
_NOTHING = object()


def set_bit(masks: dict[int, int], bit: int, hashes: Iterable[int]) -> None:
    """Set `bit` in the masks of `hashes`, indexing the ones not there yet."""
    get = masks.get
    prev_old: object = _NOTHING
    new = 0
    for h in hashes:
        old = get(h, 0)
        if old is not prev_old:
            prev_old = old
            new = old if old & bit else old | bit
        masks[h] = new


def clear_bit(masks: dict[int, int], bit: int, hashes: Iterable[int]) -> None:
    """Clear `bit` in the masks of `hashes`, which must all be indexed."""
    keep = ~bit
    prev_old: object = _NOTHING
    new = 0
    for h in hashes:
        old = masks[h]
        if old is not prev_old:
            prev_old = old
            new = old & keep
        if new:
            masks[h] = new
        else:
            del masks[h]


class KvIndex:
    """Exact index of the workers' KV caches, fed by their KV events."""

    def __init__(self) -> None:
        self._slots = WorkerSlots()
        self._masks: dict[int, int] = {}  # block hash -> bitmask of slots holding it
        self._blocks: list[set[int]] = []  # slot -> hashes it holds (empty for free slots)
        self.events_applied = 0

    # -- events --------------------------------------------------------------------------------

    def apply(self, worker_id: str, batch: KvEventBatch) -> None:
        """Apply a worker's batch of KV events; a dump batch replaces all that worker's state."""
        self.events_applied += len(batch.events)
        if batch.dump:
            self._replace(worker_id, batch.events)
            return
        slot = self._slots.slot_of.get(worker_id)
        for event in batch.events:
            if type(event) is KvBlockStored:
                if slot is None:
                    slot = self._acquire(worker_id)
                self._store(slot, event.block_hashes)
            elif slot is None:
                continue  # nothing known about this worker: nothing to remove
            elif type(event) is KvBlockRemoved:
                self._remove(slot, event.block_hashes)
            elif type(event) is KvCleared:
                self._clear(slot)

    def remove_worker(self, worker_id: str) -> None:
        slot = self._slots.slot_of.get(worker_id)
        if slot is None:
            return
        self._clear(slot)
        self._slots.release(worker_id)

    def _acquire(self, worker_id: str) -> int:
        slot = self._slots.acquire(worker_id)
        if slot == len(self._blocks):
            self._blocks.append(set())
        return slot

    def _store(self, slot: int, hashes: Sequence[int]) -> None:
        self._blocks[slot].update(hashes)
        set_bit(self._masks, 1 << slot, hashes)

    def _remove(self, slot: int, hashes: Sequence[int]) -> None:
        held = self._blocks[slot]
        present = []  # once each, in order: removals may repeat a hash or name unknown ones
        for h in hashes:
            if h in held:
                held.remove(h)
                present.append(h)
        clear_bit(self._masks, 1 << slot, present)

    def _clear(self, slot: int) -> None:
        held = self._blocks[slot]
        clear_bit(self._masks, 1 << slot, held)
        held.clear()

    def _replace(self, worker_id: str, events: Sequence[KvEvent]) -> None:
        # Build the worker's true state, then touch only the masks that differ: a resync after
        # a short gap changes little.
        state: set[int] = set()
        for event in events:
            if type(event) is KvBlockStored:
                state.update(event.block_hashes)
            elif type(event) is KvBlockRemoved:
                state.difference_update(event.block_hashes)
            elif type(event) is KvCleared:
                state.clear()
        slot = self._slots.slot_of.get(worker_id)
        if slot is None:
            if not state:
                return
            slot = self._acquire(worker_id)
        old = self._blocks[slot]
        clear_bit(self._masks, 1 << slot, old - state)
        set_bit(self._masks, 1 << slot, state - old)
        self._blocks[slot] = state

    # -- queries -------------------------------------------------------------------------------

    def find_matches(self, hashes: Sequence[int]) -> dict[str, int]:
        """worker id -> number of leading blocks of `hashes` it holds (workers with > 0 only)."""
        return prefix_overlaps(self._masks, self._slots.worker_at, hashes)

    def workers_holding(self, block_hash: int) -> list[str]:
        out: dict[str, int] = {}
        _assign(out, self._slots.worker_at, self._masks.get(block_hash, 0), 0)
        return list(out)

    def num_blocks(self) -> int:
        """Distinct block hashes indexed."""
        return len(self._masks)

    def num_entries(self) -> int:
        """(worker, block) pairs indexed."""
        return sum(map(len, self._blocks))

    def blocks_of(self, worker_id: str) -> set[int]:
        slot = self._slots.slot_of.get(worker_id)
        return set() if slot is None else set(self._blocks[slot])

    def workers(self) -> list[str]:
        """Workers the index holds state for (including ones whose cache is now empty)."""
        return list(self._slots.slot_of)
