"""Hostile request bodies are 400s naming what is wrong, never another exception (a 500)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from services.frontend import protocol
from services.frontend.errors import ApiError

DEEP = 200_000


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       **fields}).encode()


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model":"m","messages":' + b"[" * DEEP + b"]" * DEEP + b"}", "messages[0]"),
    # Free-form fields (dict[str, Any]) are where msgspec recurses until Python's limit.
    (_chat()[:-1] + b',"tools":[{"a":' + b"[" * DEEP + b"]" * DEEP + b"}]}", None),
    (_chat()[:-1] + b',"audio":{"a":' + b'{"b":' * DEEP + b"1" + b"}" * DEEP + b"}}", None),
    (b'{"model":"m","messages":[{"role":"user","content":"\xff\xfe"}]}', None),
    (_chat(stop=["x"] * 100_000), "stop"),
    (_chat(logit_bias={str(i): 1 for i in range(100_000)}), "logit_bias"),
    (_chat()[:-1] + b',"seed":' + b"9" * 100_000 + b"}", "seed"),
    (b"[" + b"1," * 100_000 + b"1]", None),
    (_chat()[:-1] + b',"chat_template_kwargs":{"a":' + b"[" * DEEP + b"]" * DEEP + b"}}",
     None),
], ids=["nested-messages", "nested-tools", "nested-audio", "invalid-utf8", "stop-list",
        "logit-bias", "huge-number", "not-an-object", "nested-template-variables"])
def test_hostile_chat_bodies_are_400_quickly(raw: bytes, param: str | None) -> None:
    started = time.perf_counter()
    with pytest.raises(ApiError) as refused:
        protocol.parse_chat(raw)
    assert refused.value.status == 400
    assert refused.value.param == param
    assert time.perf_counter() - started < 1.0


def test_deeply_nested_completion_prompt_is_400() -> None:
    raw = b'{"model":"m","prompt":' + b"[" * DEEP + b"]" * DEEP + b"}"
    with pytest.raises(ApiError) as refused:
        protocol.parse_completion(raw)
    assert refused.value.status == 400


@pytest.mark.parametrize("raw", [
    b'{"messages":' + b"[" * DEEP + b"]" * DEEP + b"}",
    b'{"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":{"a":'
    + b"[" * DEEP + b"]" * DEEP + b"}}",
    b'{"prompt":' + b"[" * DEEP + b"]" * DEEP + b"}",
    b'{"prompt":"\xff"}',
], ids=["nested-messages", "nested-template-variables", "nested-prompt", "invalid-utf8"])
def test_hostile_tokenize_bodies_are_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as refused:
        protocol.parse_tokenize(raw)
    assert refused.value.status == 400
    with pytest.raises(ApiError) as refused:
        protocol.parse_detokenize(b'{"tokens":' + b"[" * DEEP + b"]" * DEEP + b"}", 258)
    assert refused.value.status == 400
