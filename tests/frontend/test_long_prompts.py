"""Long token-id prompts on /v1/completions: decoded and range-checked in one pass, with the same
errors as any other prompt when an id is wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.frontend.errors import ApiError
from services.frontend.protocol import completion_prompts, parse_completion

VOCAB = 50_000


def prompt_of(value: Any, vocab: int = VOCAB) -> str | list[int]:
    raw = json.dumps({"model": "tiny", "prompt": value, "max_tokens": 1}).encode()
    [prompt] = completion_prompts(parse_completion(raw), vocab_size=vocab)
    return prompt


def error_of(value: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        prompt_of(value)
    return info.value


def test_a_100k_token_prompt_comes_back_as_the_same_ids() -> None:
    ids = [(i * 7919 + 13) % VOCAB for i in range(100_000)]
    assert prompt_of(ids) == ids
    assert prompt_of([ids]) == ids  # one prompt as an array of token id arrays


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1, 2**40])
def test_an_id_outside_the_vocabulary_deep_in_a_long_prompt_is_named(bad: int) -> None:
    ids = [1] * 50_000 + [bad] + [2] * 10
    error = error_of(ids)
    assert (error.status, error.param, error.code) == (400, "prompt", "invalid_value")
    assert error.message == f"Token id {bad} in 'prompt' is outside the vocabulary [0, {VOCAB})"


@pytest.mark.parametrize("odd", [-1, True, 1.5, "7", None, [3]])
def test_anything_but_a_non_negative_int_among_ids_is_refused(odd: Any) -> None:
    error = error_of([5] * 1000 + [odd])
    assert (error.status, error.param) == (400, "prompt")


def test_integral_floats_among_ids_are_ids() -> None:
    assert prompt_of([5] * 1000 + [7.0]) == [5] * 1000 + [7]  # JSON Schema: 7.0 is an integer


@pytest.mark.parametrize("value", [5, True, {"ids": [1]}])
def test_a_prompt_of_the_wrong_type_is_refused_at_parse(value: Any) -> None:
    raw = json.dumps({"model": "tiny", "prompt": value}).encode()
    with pytest.raises(ApiError) as info:
        parse_completion(raw)
    assert (info.value.param, info.value.code) == ("prompt", "invalid_value")
    assert "Expected `str | array | null`" in info.value.message
