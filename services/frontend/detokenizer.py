"""Incremental detokenization: generated token ids in, complete text out.

Owns the per-request decoders. `step` returns only text that can no longer change: never half a
UTF-8 character, never the first bytes of a multi-byte sequence split across tokens. `flush` at
the end gives whatever was held back, invalid leftovers as U+FFFD. Special tokens produce no text
unless a request asks for them (vLLM's `skip_special_tokens: false`): then each is its own text.

For a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen: a `ByteLevel` decoder) every token is a
fixed byte string, so decoding is a table lookup and an incremental UTF-8 decode
(`ByteLevelDetokenizer`); `DecodeStream`, which decodes a window of ids twice per token, is kept
for every other decoder.

Does not own tokenizers or stop strings; `tokenizer` builds these, `stop_matcher` trims them.
"""

from __future__ import annotations

import codecs
import json
from typing import Protocol

import tokenizers
from tokenizers.decoders import DecodeStream

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class Detokenizer(Protocol):
    def step(self, token_ids: list[int]) -> str:
        """Text completed by `token_ids` (possibly "")."""
        ...

    def flush(self) -> str:
        """Whatever is still held back, at the end of the stream."""
        ...


def _byte_level_chars() -> dict[str, int]:
    """The byte-level alphabet: each byte is a printable character (itself where it is one)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def byte_level_table(tokenizer: tokenizers.Tokenizer) -> list[bytes] | None:
    """Each token id's bytes when `tokenizer` decodes with exactly a ByteLevel decoder (special
    tokens: no bytes, as `skip_special_tokens` decodes), else None. Checked against the
    tokenizer's own decode of every token that is whole UTF-8; any difference gives None."""
    spec = json.loads(tokenizer.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    chars = _byte_level_chars()
    special = _special_ids(tokenizer)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    table: list[bytes] = []
    for token_id in range(size):
        piece = tokenizer.id_to_token(token_id)
        if token_id in special or piece is None:
            table.append(b"")
            continue
        try:
            table.append(bytes(chars[c] for c in piece))
        except KeyError:  # an added token outside the alphabet decodes as its own text
            table.append(piece.encode())
    for token_id, raw in enumerate(table):
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            continue  # part of a character: only meaningful next to its neighbours
        if tokenizer.decode([token_id], skip_special_tokens=True) != text:
            return None
    return table


def _special_ids(tokenizer: tokenizers.Tokenizer) -> set[int]:
    return {token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()
            if token.special}


def with_special_tokens(table: list[bytes], tokenizer: tokenizers.Tokenizer) -> list[bytes]:
    """`table` with each special token's text in its place, as the tokenizer decodes it with
    `skip_special_tokens=False`."""
    out = list(table)
    for token_id in _special_ids(tokenizer):
        if 0 <= token_id < len(out):
            out[token_id] = tokenizer.decode([token_id], skip_special_tokens=False).encode()
    return out


class ByteLevelDetokenizer:
    """Token ids to text through a byte table (see `byte_level_table`)."""

    __slots__ = ("_decoder", "_table")

    def __init__(self, table: list[bytes]) -> None:
        self._table = table
        self._decoder = _utf8_decoder(errors="replace")

    def step(self, token_ids: list[int]) -> str:
        table = self._table
        try:
            if len(token_ids) == 1:
                return self._decoder.decode(table[token_ids[0]])
            return self._decoder.decode(b"".join([table[t] for t in token_ids]))
        except IndexError:  # an id past the vocabulary (an engine's padding) has no text
            size = len(table)
            return self._decoder.decode(b"".join([table[t] for t in token_ids if t < size]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class HfDetokenizer:
    """For `tokenizers` models, on top of `tokenizers.decoders.DecodeStream`.

    DecodeStream answers None while the text so far ends in an incomplete character; the ids fed
    since its last answer are kept so `flush` can decode them (lossily) at the end.
    """

    __slots__ = ("_pending", "_skip_special", "_stream", "_tokenizer")

    def __init__(self, tokenizer: tokenizers.Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._stream = DecodeStream(skip_special_tokens=skip_special)
        self._pending: list[int] = []

    def step(self, token_ids: list[int]) -> str:
        # One id at a time: given a list, DecodeStream would hold back all of it whenever the
        # list ends inside a character, delaying text that is already complete.
        if len(token_ids) == 1:
            return self._step_one(token_ids[0])
        return "".join([self._step_one(token) for token in token_ids])

    def _step_one(self, token: int) -> str:
        try:
            text = self._stream.step(self._tokenizer, token)
        except Exception:
            # The stream lost track of its prefix (a decoder quirk): start a fresh one from what
            # the old one held back. Text already emitted stays emitted.
            self._stream = DecodeStream(skip_special_tokens=self._skip_special)
            ids, self._pending = [*self._pending, token], []
            text = self._stream.step(self._tokenizer, ids)
            if text is None:
                self._pending = ids
                return ""
            return text
        if text is None:
            self._pending.append(token)
            return ""
        if self._pending:
            self._pending.clear()
        return text

    def flush(self) -> str:
        if not self._pending:
            return ""
        ids, self._pending = self._pending, []
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
