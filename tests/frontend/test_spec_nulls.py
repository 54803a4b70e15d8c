"""`null` where the official OpenAI spec does not allow it is a 400 naming the field, and
`null` where the spec allows it is accepted: every field of both request bodies, checked
against the spec itself (and the nested fields that once let null through)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from services.frontend import protocol
from services.frontend.errors import ApiError
from tests.openapi_spec import is_valid

CHAT_BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION_BASE = {"model": "m", "prompt": "hi"}
# Fields whose null the frontend used to accept though the spec forbids it.
ONCE_ACCEPTED = {"top_logprobs", "response_format", "web_search_options", "tools",
                 "tool_choice", "parallel_tool_calls", "functions", "function_call", "user",
                 "safety_identifier", "prompt_cache_key"}


def _cases() -> list[tuple[str, str, dict[str, Any]]]:
    cases = []
    for field in protocol.ChatCompletionRequest.__struct_fields__:
        cases.append(("CreateChatCompletionRequest", field, {**CHAT_BASE, field: None}))
    for field in protocol.CompletionRequest.__struct_fields__:
        cases.append(("CreateCompletionRequest", field, {**COMPLETION_BASE, field: None}))
    for field in protocol.StreamOptions.__struct_fields__:
        param = f"stream_options.{field}"
        cases.append(("CreateChatCompletionRequest", param,
                      {**CHAT_BASE, "stream": True, "stream_options": {field: None}}))
        cases.append(("CreateCompletionRequest", param,
                      {**COMPLETION_BASE, "stream": True, "stream_options": {field: None}}))
    for field in protocol.AssistantMessage.__struct_fields__:
        message = {"role": "assistant", "content": "x", field: None}
        cases.append(("CreateChatCompletionRequest", f"messages[1].{field}",
                      {**CHAT_BASE, "messages": [*CHAT_BASE["messages"], message]}))
    return cases


def _parser(component: str) -> Callable[[bytes], Any]:
    return protocol.parse_chat if component == "CreateChatCompletionRequest" \
        else protocol.parse_completion


@pytest.mark.parametrize(("component", "param", "body"), _cases(),
                         ids=[f"{c[0][6:10]}-{c[1]}" for c in _cases()])
def test_null_is_refused_exactly_where_the_spec_refuses_it(component: str, param: str,
                                                           body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    if is_valid(component, body):
        _parser(component)(raw)  # accepted
        return
    with pytest.raises(ApiError) as refused:
        _parser(component)(raw)
    assert refused.value.status == 400
    assert refused.value.param == param
    assert "null" in refused.value.message


def test_the_fields_that_once_let_null_through_are_covered() -> None:
    refused = {param for component, param, body in _cases()
               if component == "CreateChatCompletionRequest" and "." not in param
               and "[" not in param and not is_valid(component, body)}
    assert ONCE_ACCEPTED <= refused
