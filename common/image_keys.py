"""An image's identity inside a token sequence: its placeholder token ids.

Each image of a prompt occupies `num_tokens` placeholder positions. Their ids are derived from
the image's content hash (and the position within the image), so the chained KV block hashes
(`block_hash.py`) of every block covering the image, and of every block after it, fold in the
image's identity with no other change: the router's index, every worker's prefix cache, KV
pulls and migrations all agree that a repeated image is a prefix hit and that a different image
with the same text is not. An engine that needs its model's own image token id at those
positions substitutes it from `ImageInput.offset` (the ids here are keys, not vocabulary).
"""

from __future__ import annotations

import hashlib

# Ids are drawn from [FIRST_ID, FIRST_ID + span): above every byte-tokenizer id, below 2^31.
FIRST_ID = 1 << 20
MAX_SPAN = (1 << 31) - FIRST_ID


def placeholder_ids(image_hash: str, num_tokens: int, vocab_size: int = 0) -> list[int]:
    """The `num_tokens` placeholder ids of the image whose hex content hash is `image_hash`.

    With `vocab_size` (> 0) the ids stay below it (an engine that checks ids against the model's
    vocabulary accepts them); then they start at 0 and each carries log2(vocab_size) bits of the
    hash, and a whole block of them many times that."""
    if num_tokens < 1:
        raise ValueError(f"an image occupies at least one token, got {num_tokens}")
    first, span = (0, vocab_size) if vocab_size > 0 else (FIRST_ID, MAX_SPAN)
    # 8 bytes of SHAKE-256 output per position: stable across processes and Python versions.
    stream = hashlib.shake_256(bytes.fromhex(image_hash)).digest(8 * num_tokens)
    return [first + int.from_bytes(stream[i:i + 8], "little") % span
            for i in range(0, 8 * num_tokens, 8)]
