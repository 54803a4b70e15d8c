"""Chained hashes of full KV blocks: the identity the router's index and every engine agree on.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean equal
prefixes. Hashes are 63-bit unsigned ints (they fit MessagePack and JSON integers everywhere),
seeded so that deployments with different seeds never collide by construction, and stable across
processes, machines and Python versions (no use of `hash()`).
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Sequence

DEFAULT_SEED = 0x7475726E6F7574  # "turnout"
_MASK63 = (1 << 63) - 1


def root_hash(seed: int = DEFAULT_SEED) -> int:
    """The parent hash of a sequence's first block."""
    digest = hashlib.blake2b(struct.pack("<Q", seed & _MASK63), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block given its parent's hash."""
    h = hashlib.blake2b(struct.pack("<Q", parent), digest_size=8)
    h.update(array("I", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little") & _MASK63


def block_hashes(
    token_ids: Sequence[int], block_size: int, seed: int = DEFAULT_SEED, parent: int | None = None
) -> list[int]:
    """Hashes of every full block of `token_ids` (a trailing partial block has none)."""
    prev = root_hash(seed) if parent is None else parent
    out: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = block_hash(prev, token_ids[start : start + block_size])
        out.append(prev)
    return out
