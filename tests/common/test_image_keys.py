"""An image's placeholder ids carry its hash into the KV block hashes."""

from __future__ import annotations

import hashlib

import pytest

from common.block_hash import block_hashes
from common.image_keys import FIRST_ID, placeholder_ids


def h(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def test_ids_are_deterministic_and_differ_per_image() -> None:
    assert placeholder_ids(h("a"), 32) == placeholder_ids(h("a"), 32)
    assert placeholder_ids(h("a"), 32) != placeholder_ids(h("b"), 32)
    assert all(FIRST_ID <= i < 1 << 31 for i in placeholder_ids(h("a"), 500))


def test_ids_stay_inside_a_vocabulary() -> None:
    ids = placeholder_ids(h("a"), 1000, vocab_size=258)
    assert all(0 <= i < 258 for i in ids)
    assert len(set(ids)) > 100  # spread, not a constant


def test_an_image_needs_a_token() -> None:
    with pytest.raises(ValueError):
        placeholder_ids(h("a"), 0)


def test_block_hashes_fold_in_the_image() -> None:
    """Same text around two images: the blocks before the image agree, the block covering
    its first placeholder and every later one differ; the same image agrees everywhere."""
    text = list(range(40, 60))  # 20 tokens: block 0 and part of block 1 (block size 16)

    def prompt(image: str) -> list[int]:
        return [*text, *placeholder_ids(h(image), 24), *range(60, 90)]

    red, red_again, blue = (block_hashes(prompt(i), 16) for i in ("red", "red", "blue"))
    assert red == red_again
    assert red[0] == blue[0]
    assert all(a != b for a, b in zip(red[1:], blue[1:], strict=True))
