"""Incremental detokenization never yields half a character, and adds up to the full decode."""

from __future__ import annotations

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from services.frontend.detokenizer import (
    ByteLevelDetokenizer,
    HfDetokenizer,
    byte_level_table,
    with_special_tokens,
)
from services.frontend.tokenizer import ByteTokenizer, HfTokenizer, Tokenizer
from tests.tiny_model import cached_tiny_model

TEXTS = [
    "plain ascii text",
    "Café naïve résumé",
    "emoji 🙂🚀 and a skin tone 👍🏽 and ✨",
    "こんにちは世界、你好世界",
    "mixed: Straße — “quotes” 🙂x",
]


@pytest.fixture(scope="module", params=["byte", "hf"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return ByteTokenizer() if request.param == "byte" else HfTokenizer(cached_tiny_model())


def _no_partial(pieces: list[str]) -> None:
    for piece in pieces:
        assert "\ufffd" not in piece, pieces
        # A str that came out of a UTF-8 decode never holds lone surrogates.
        piece.encode("utf-8")


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_whole(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = tokenizer.new_detokenizer()
    pieces = [detok.step([token]) for token in ids]
    pieces.append(detok.flush())
    _no_partial(pieces)
    assert "".join(pieces) == text


def test_multibyte_char_split_across_tokens_is_held(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # both tokenizers spell this emoji byte by byte
    detok = tokenizer.new_detokenizer()
    assert [detok.step([token]) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.step(ids[-1:]) == "🙂"
    assert detok.flush() == ""


def test_incomplete_tail_is_replaced_on_flush(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🙂", add_special_tokens=False)
    detok = tokenizer.new_detokenizer()
    head = detok.step(ids[:-1])
    # A BPE token may carry the space together with the emoji's first bytes: then the space
    # waits too. Either way no half character is emitted, and flush marks the broken tail.
    assert head in ("ok", "ok ")
    assert head + detok.flush() == "ok \ufffd"


def test_special_tokens_produce_no_text(tokenizer: Tokenizer) -> None:
    detok = tokenizer.new_detokenizer()
    eos = sorted(tokenizer.eos_token_ids)
    ids = tokenizer.encode("hi", add_special_tokens=True)  # BOS first
    assert detok.step(ids) + detok.step(eos) + detok.flush() == "hi"


def test_special_tokens_show_when_asked(tokenizer: Tokenizer) -> None:
    detok = tokenizer.new_detokenizer(skip_special=False)
    ids = tokenizer.encode("hi", add_special_tokens=True)
    bos = "<|bos|>" if isinstance(tokenizer, ByteTokenizer) else "<|begin_of_text|>"
    # A special between the bytes of a character breaks it, as the full decode does.
    emoji = tokenizer.encode("🙂", add_special_tokens=False)
    text = detok.step(ids) + detok.step([emoji[0], ids[0], *emoji[1:]]) + detok.flush()
    assert text.startswith(f"{bos}hi\ufffd{bos}") and "🙂" not in text


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
       cuts=st.lists(st.integers(min_value=1, max_value=6), max_size=40))
def test_any_chunking_adds_up(text: str, cuts: list[int]) -> None:
    for tokenizer in (ByteTokenizer(), HfTokenizer(cached_tiny_model())):
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok = tokenizer.new_detokenizer()
        pieces, start = [], 0
        for size in [*cuts, len(ids)]:
            pieces.append(detok.step(ids[start:start + size]))
            start += size
        pieces.append(detok.flush())
        assert "".join(pieces) == tokenizer.decode(ids)
        if "\ufffd" not in text:
            _no_partial(pieces)


def test_a_byte_level_tokenizer_detokenizes_through_its_byte_table() -> None:
    tokenizer = HfTokenizer(cached_tiny_model())
    assert isinstance(tokenizer.new_detokenizer(), ByteLevelDetokenizer)


def test_other_decoders_keep_decode_stream() -> None:
    metaspace = tokenizers.Tokenizer(tokenizers.models.BPE())
    metaspace.decoder = tokenizers.decoders.Metaspace()
    assert byte_level_table(metaspace) is None


@settings(max_examples=80, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=2047), max_size=60),
       cuts=st.lists(st.integers(min_value=1, max_value=5), max_size=30),
       skip_special=st.booleans())
def test_byte_table_matches_decode_stream_on_any_ids(ids: list[int], cuts: list[int],
                                                     skip_special: bool) -> None:
    """Random ids (broken characters, specials, anything an engine may emit) come out exactly as
    the tokenizer's own DecodeStream gives them, however they are chunked, specials skipped or
    shown."""
    raw = tokenizers.Tokenizer.from_file(str(cached_tiny_model() / "tokenizer.json"))
    table = byte_level_table(raw)
    assert table is not None
    if not skip_special:
        table = with_special_tokens(table, raw)
    outputs = []
    for detok in (ByteLevelDetokenizer(table), HfDetokenizer(raw, skip_special)):
        pieces, start = [], 0
        for size in [*cuts, len(ids)]:
            pieces.append(detok.step(ids[start:start + size]))
            start += size
        outputs.append("".join(pieces) + detok.flush())
    assert outputs[0] == outputs[1] == raw.decode(ids, skip_special_tokens=skip_special)
