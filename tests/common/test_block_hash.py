"""Chained block hashes: `block_hashes` (the fast path over a whole prompt) is the chain of
`block_hash` over each full block, for every length, block size, seed and parent."""

from __future__ import annotations

from array import array

import pytest

from common.block_hash import DEFAULT_SEED, block_hash, block_hashes, root_hash


def chained(tokens: list[int], block_size: int, parent: int) -> list[int]:
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start:start + block_size])
        out.append(parent)
    return out


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 64, 200, 1000])
def test_block_hashes_is_the_chain_of_block_hash(block_size: int, length: int) -> None:
    tokens = [(i * 7919 + 13) % 150_000 for i in range(length)]
    for seed in (DEFAULT_SEED, 1):
        assert block_hashes(tokens, block_size, seed) == chained(tokens, block_size,
                                                                 root_hash(seed))
    assert block_hashes(tokens, block_size, parent=42) == chained(tokens, block_size, 42)
    # Any sequence of ids hashes alike: tuples and arrays as lists.
    assert block_hashes(tuple(tokens), block_size) == block_hashes(array("I", tokens), block_size)


def test_hashes_fit_63_bits_and_depend_on_order() -> None:
    hashes = block_hashes(list(range(256)), 64)
    assert len(hashes) == 4 and all(0 <= h < 1 << 63 for h in hashes)
    assert block_hashes(list(range(255, -1, -1)), 64)[0] != hashes[0]


def test_a_cache_salt_gives_its_own_chain_and_no_salt_keeps_the_unsalted_one() -> None:
    tokens = list(range(64))
    plain = block_hashes(tokens, 16)
    # The unsalted root is the seed's digest, as before salts existed: hashes published by a
    # worker a release behind still match.
    assert root_hash(DEFAULT_SEED, "") == root_hash(DEFAULT_SEED)
    assert block_hashes(tokens, 16, salt="") == plain
    a, b = block_hashes(tokens, 16, salt="tenant-a"), block_hashes(tokens, 16, salt="tenant-b")
    assert a == chained(tokens, 16, root_hash(DEFAULT_SEED, "tenant-a"))
    # No block of one salt's chain names a block of another's (nor of the unsalted one).
    assert not set(a) & set(b) and not set(a) & set(plain)
    assert block_hashes(tokens, 16, seed=1, salt="tenant-a") != a
    assert block_hashes(tokens, 16, parent=42, salt="tenant-a") == chained(tokens, 16, 42)
    assert root_hash(DEFAULT_SEED, "\udcff") != root_hash(DEFAULT_SEED, "x")  # any str hashes
