"""The mocker's KV pool: chained block hashes, prefix hits, LRU eviction and KV events."""

from __future__ import annotations

from common.block_hash import DEFAULT_SEED, block_hashes, root_hash
from common.messages import KvBlockRemoved, KvBlockStored, KvCleared
from services.worker.engines.mocker.kv_pool import Block, KvPool

BS = 4


def fill(pool: KvPool, tokens: list[int]) -> tuple[list[Block], list[int]]:
    """Allocate and register every full block of `tokens` (plus a partial tail), as a prefill."""
    blocks = [pool.allocate() for _ in range(-(-len(tokens) // BS))]
    hashes: list[int] = []
    pool.register(blocks, hashes, tokens, 0, len(tokens) // BS)
    return blocks, hashes


def test_hashes_match_the_router_scheme_and_events_batch() -> None:
    pool = KvPool(16, BS)
    tokens = list(range(100, 111))  # 2 full blocks + 3 tokens
    _, hashes = fill(pool, tokens)
    assert hashes == block_hashes(tokens, BS, DEFAULT_SEED)
    assert pool.root == root_hash(DEFAULT_SEED)
    events = pool.drain_events()
    assert events == [KvBlockStored(hashes, None, tokens[:8], BS)]
    assert pool.drain_events() == []


def test_prefix_match_stops_at_first_miss_and_confirms_tokens() -> None:
    pool = KvPool(16, BS)
    tokens = list(range(12))
    blocks, _ = fill(pool, tokens)
    pool.release(blocks)
    probe = [*tokens[:8], 99, 99, 99, 99, 5]
    memo: list[int] = []
    hits = pool.match_prefix(probe, memo, 3)
    assert [b.block_id for b in hits] == [b.block_id for b in blocks[:2]]
    assert len(memo) == 3  # the miss's hash is memoised too
    # A stored block whose tokens differ is not trusted even when the hash matches.
    blocks[0].token_ids = [7, 7, 7, 7]
    assert pool.match_prefix(tokens, [], 3) == []


def test_acquire_and_release_track_usage() -> None:
    pool = KvPool(8, BS)
    blocks, _ = fill(pool, list(range(9)))  # 3 blocks, 2 cached
    assert pool.used_blocks == 3 and pool.free_blocks == 5
    pool.release(blocks)
    assert pool.used_blocks == 0 and pool.free_blocks == 8 and pool.cached_blocks == 2
    hits = pool.match_prefix(list(range(9)), [], 2)
    assert pool.unreferenced(hits) == 2
    pool.acquire(hits)
    assert pool.used_blocks == 2 and pool.free_blocks == 6


def test_lru_evicts_oldest_unreferenced_first_and_tails_before_heads() -> None:
    pool = KvPool(6, BS)
    a_blocks, a_hashes = fill(pool, list(range(0, 8)))
    b_blocks, b_hashes = fill(pool, list(range(50, 58)))
    pool.release(a_blocks)
    pool.release(b_blocks)
    pool.drain_events()
    # Reuse A: its blocks leave the LRU and come back after B's.
    hits = pool.match_prefix(list(range(0, 8)), [], 2)
    pool.acquire(hits)
    pool.release(hits)
    taken = [pool.allocate() for _ in range(4)]  # 2 fresh, then 2 evictions
    assert pool.drain_events() == [KvBlockRemoved([b_hashes[1], b_hashes[0]])]
    taken.append(pool.allocate())
    assert pool.drain_events() == [KvBlockRemoved([a_hashes[1]])]
    assert [e.block_hashes for e in pool.dump()] == [[a_hashes[0]]]
    assert len(taken) == 5


def test_referenced_blocks_are_never_evicted() -> None:
    pool = KvPool(3, BS)
    _held, hashes = fill(pool, list(range(8)))  # 2 blocks held
    pool.allocate()
    assert pool.free_blocks == 0
    assert pool.cached_blocks == 2
    assert pool.drain_events() == [KvBlockStored(hashes, None, list(range(8)), BS)]


def test_duplicate_content_shares_the_cached_block() -> None:
    pool = KvPool(8, BS)
    tokens = list(range(8))
    first, _ = fill(pool, tokens)
    pool.drain_events()
    second = [pool.allocate(), pool.allocate()]
    own = list(second)
    pool.register(second, [], tokens, 0, 2)
    assert second == first  # swapped for the cached copies
    assert all(b.ref_count == 2 for b in first)
    assert all(b.ref_count == 0 for b in own)
    assert pool.used_blocks == 2
    assert pool.drain_events() == []  # nothing new for the router


def test_dump_is_parents_first_and_matches_events() -> None:
    pool = KvPool(32, BS)
    fill(pool, list(range(16)))
    fill(pool, [*range(8), 70, 71, 72, 73, 74])  # shares 2 blocks, adds one branch
    fill(pool, list(range(200, 204)))
    replayed: dict[int, tuple[int | None, list[int]]] = {}
    for event in pool.drain_events():
        assert isinstance(event, KvBlockStored)
        parent = event.parent_hash
        for i, h in enumerate(event.block_hashes):
            replayed[h] = (parent, event.token_ids[i * BS:(i + 1) * BS])
            parent = h
    dump = pool.dump()
    seen: set[int] = set()
    for event in dump:
        assert len(event.block_hashes) == 1
        assert event.parent_hash is None or event.parent_hash in seen
        seen.add(event.block_hashes[0])
        assert replayed[event.block_hashes[0]] == (event.parent_hash, event.token_ids)
    assert seen == set(replayed)


def test_reset_forgets_everything_and_says_so() -> None:
    pool = KvPool(8, BS)
    held, _ = fill(pool, list(range(8)))
    other, _ = fill(pool, list(range(40, 48)))
    pool.release(other)
    pool.drain_events()
    pool.reset()
    assert pool.drain_events() == [KvCleared()]
    assert pool.dump() == [] and pool.cached_blocks == 0
    assert pool.match_prefix(list(range(8)), [], 2) == []
    pool.release(held)
    assert pool.free_blocks == 8 and pool.used_blocks == 0
