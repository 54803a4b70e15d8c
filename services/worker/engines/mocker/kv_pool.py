"""The simulated paged KV cache: a fixed pool of blocks with ref counts and a prefix cache.

A block that becomes full is registered under its chained hash (`common.block_hash`, the very
scheme the router hashes requests with), so a later request whose leading full blocks hash the
same can share them. Blocks nobody references stay cached in LRU order and are evicted, oldest
first, only when a fresh block is needed. Every change the router must know about is queued as a
KV event (stored, removed, cleared) and handed out by `drain_events()`.

Owns blocks, the hash → block map and KV events; knows nothing of requests or scheduling (a
sequence hands in its block list, its memoised block hashes and its token ids).
"""

from __future__ import annotations

from collections import OrderedDict

from common.block_hash import DEFAULT_SEED, block_hash, root_hash
from common.messages import KvBlockRemoved, KvBlockStored, KvCleared, KvEvent


class Block:
    __slots__ = ("block_hash", "block_id", "parent_hash", "position", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        # Set only while the block is registered in the prefix cache.
        self.block_hash: int | None = None
        self.parent_hash: int | None = None  # None for a sequence's first block
        self.token_ids: list[int] | None = None
        self.position = 0  # index of the block in its sequence (orders a dump parents-first)


class KvPool:
    """`num_blocks` blocks of `block_size` tokens, with prefix caching and LRU eviction."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = DEFAULT_SEED) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.seed = seed
        self.root = root_hash(seed)
        self.used_blocks = 0  # blocks with ref_count > 0
        self._blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks holding nothing worth keeping, taken before any cached block is evicted.
        self._fresh: list[Block] = self._blocks[::-1]
        # Cached blocks nobody references, least recently released first.
        self._lru: OrderedDict[int, Block] = OrderedDict()
        self._cached: dict[int, Block] = {}
        self._events: list[KvEvent] = []

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take right now (fresh ones plus evictable cached ones)."""
        return len(self._fresh) + len(self._lru)

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    def root_of(self, salt: str) -> int:
        """The parent hash of the first block of a request with this `cache_salt`."""
        return root_hash(self.seed, salt) if salt else self.root

    def match_prefix(self, token_ids: list[int], hashes: list[int], max_blocks: int,
                     salt: str = "") -> list[Block]:
        """The cached blocks equal to the leading full blocks of `token_ids` (at most
        `max_blocks`), stopping at the first miss. Takes no references. `hashes` memoises the
        sequence's block hashes and is extended as far as the walk goes."""
        bs = self.block_size
        root = self.root_of(salt) if not hashes else self.root  # read only for block 0
        hits: list[Block] = []
        for i in range(max_blocks):
            tokens = token_ids[i * bs:(i + 1) * bs]
            if i == len(hashes):
                hashes.append(block_hash(hashes[i - 1] if i else root, tokens))
            block = self._cached.get(hashes[i])
            # A 63-bit hash hit is confirmed against the stored tokens before it is trusted.
            if block is None or block.token_ids != tokens:
                break
            hits.append(block)
        return hits

    @staticmethod
    def unreferenced(blocks: list[Block]) -> int:
        """How many of `blocks` sit in the LRU (taking them shrinks `free_blocks`)."""
        return sum(1 for b in blocks if b.ref_count == 0)

    def acquire(self, blocks: list[Block]) -> None:
        """Take a reference on cached blocks (prefix hits)."""
        for b in blocks:
            if b.ref_count == 0:
                del self._lru[b.block_id]
                self.used_blocks += 1
            b.ref_count += 1

    def allocate(self) -> Block:
        """A block for new tokens; evicts the least recently released cached block if it must."""
        if self._fresh:
            block = self._fresh.pop()
        else:
            _, block = self._lru.popitem(last=False)
            self._evict(block)
        block.ref_count = 1
        self.used_blocks += 1
        return block

    def release(self, blocks: list[Block]) -> None:
        """Drop a sequence's references. Tail blocks go first so they are evicted before the
        blocks they extend: a cached block's parent then outlives it."""
        for b in reversed(blocks):
            b.ref_count -= 1
            if b.ref_count == 0:
                self.used_blocks -= 1
                if b.block_hash is None:
                    self._fresh.append(b)
                else:
                    self._lru[b.block_id] = b

    def register(self, blocks: list[Block], hashes: list[int], token_ids: list[int],
                 start: int, end: int, salt: str = "") -> None:
        """Blocks `start..end-1` of a sequence just became full: cache them and queue stored
        events. A block whose content is already cached elsewhere is swapped for the cached copy
        (`blocks` is updated in place), so one hash never names two blocks."""
        bs = self.block_size
        for i in range(start, end):
            tokens = token_ids[i * bs:(i + 1) * bs]
            parent = hashes[i - 1] if i else None
            if i == len(hashes):
                hashes.append(block_hash(self.root_of(salt) if parent is None else parent,
                                         tokens))
            h = hashes[i]
            block = blocks[i]
            existing = self._cached.get(h)
            if existing is not None:
                if existing is not block and existing.token_ids == tokens:
                    self.acquire([existing])
                    blocks[i] = existing
                    self.release([block])
                # On a (63-bit) collision the block simply stays uncached.
                continue
            block.block_hash = h
            block.parent_hash = parent
            block.token_ids = tokens
            block.position = i
            self._cached[h] = block
            last = self._events[-1] if self._events else None
            if (type(last) is KvBlockStored and parent is not None
                    and last.block_hashes[-1] == parent):
                last.block_hashes.append(h)
                last.token_ids.extend(tokens)
            else:
                self._events.append(KvBlockStored([h], parent, list(tokens), bs))

    def cached_prefix(self, hashes: list[int]) -> int:
        """How many leading blocks of a sequence (by hash) the cache holds."""
        n = 0
        for h in hashes:
            if h not in self._cached:
                break
            n += 1
        return n

    def export(self, hashes: list[int]) -> list[KvBlockStored]:
        """The cached blocks among `hashes`, one single-block stored event each, in order."""
        bs = self.block_size
        out = []
        for h in hashes:
            b = self._cached.get(h)
            if b is not None:
                out.append(KvBlockStored([h], b.parent_hash, list(b.token_ids or ()), bs))
        return out

    def import_blocks(self, blocks: list[KvBlockStored], first_position: int) -> int:
        """Cache blocks copied in from elsewhere (a peer, the host tier): consecutive blocks of
        one sequence starting at block `first_position`. They enter as unreferenced cached
        blocks, so the request about to be admitted finds them as prefix hits; no more are
        taken than there are free blocks. Returns how many were imported."""
        room = self.free_blocks
        done = 0
        for i, event in enumerate(blocks):
            h = event.block_hashes[0]
            if h in self._cached:
                continue
            if done >= room:
                break
            block = self.allocate()
            block.block_hash = h
            block.parent_hash = event.parent_hash
            block.token_ids = list(event.token_ids)
            block.position = first_position + i
            self._cached[h] = block
            self._events.append(KvBlockStored([h], event.parent_hash, list(event.token_ids),
                                              self.block_size))
            self.release([block])
            done += 1
        return done

    def _evict(self, block: Block) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        last = self._events[-1] if self._events else None
        if type(last) is KvBlockRemoved:
            last.block_hashes.append(block.block_hash)
        else:
            self._events.append(KvBlockRemoved([block.block_hash]))
        block.block_hash = None
        block.parent_hash = None
        block.token_ids = None

    def reset(self) -> None:
        """Forget every cached block (blocks in use stay allocated, just no longer shareable)."""
        for b in self._cached.values():
            b.block_hash = None
            b.parent_hash = None
            b.token_ids = None
        self._cached.clear()
        self._fresh.extend(self._lru.values())
        self._lru.clear()
        self._events.append(KvCleared())

    def drain_events(self) -> list[KvEvent]:
        """KV events queued since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def dump(self) -> list[KvBlockStored]:
        """Every cached block as a stored event, parents before children."""
        bs = self.block_size
        blocks = sorted(self._cached.values(), key=lambda b: b.position)
        return [KvBlockStored([b.block_hash], b.parent_hash, list(b.token_ids), bs)  # type: ignore[list-item,arg-type]
                for b in blocks]
