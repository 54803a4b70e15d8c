"""Structured outputs on the request side: `response_format` and vLLM's `structured_outputs`
become one `StructuredOutput` on the request's sampling parameters, or a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.messages import StructuredOutput
from services.frontend.errors import ApiError
from services.frontend.protocol import parse_chat, parse_completion, sampling_params

USER = {"role": "user", "content": "hello"}
SCHEMA = {"type": "object", "properties": {"c": {"enum": ["x", "y"]}}, "required": ["c"]}


def _chat(**fields: Any) -> Any:
    return parse_chat(json.dumps({"model": "tiny", "messages": [USER], **fields}).encode())


def _structured(**fields: Any) -> StructuredOutput | None:
    return sampling_params(_chat(**fields), 4, 512, 300).structured


def test_each_kind_becomes_its_constraint() -> None:
    named = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
    assert _structured(response_format=named) == StructuredOutput(
        json=json.dumps(SCHEMA, separators=(",", ":")))
    assert _structured(response_format={"type": "json_object"}) == StructuredOutput(
        json_object=True)
    # No schema: any JSON value.
    assert _structured(response_format={"type": "json_schema", "json_schema": {"name": "a"}}) \
        == StructuredOutput(json="{}")
    assert _structured(response_format={"type": "text"}) is None
    assert _structured() is None
    assert _structured(structured_outputs={"choice": ["yes", "no"]}) == StructuredOutput(
        choice=["yes", "no"])
    assert _structured(structured_outputs={"regex": "[a-z]+"}) == StructuredOutput(regex="[a-z]+")
    assert _structured(structured_outputs={"grammar": 'root ::= "a"'}) == StructuredOutput(
        grammar='root ::= "a"')
    # A schema sent as text stays as sent.
    assert _structured(structured_outputs={"json": '{"type": "integer"}'}) == StructuredOutput(
        json='{"type": "integer"}')
    assert _structured(structured_outputs={}) is None
    completion = parse_completion(json.dumps({"model": "tiny", "prompt": "a", "response_format": {
        "type": "json_object"}}).encode())
    assert sampling_params(completion, 4, 512, 300).structured == StructuredOutput(
        json_object=True)


def test_a_sampled_constrained_request_gets_a_seed_so_a_move_can_replay_it() -> None:
    sp = sampling_params(_chat(response_format={"type": "json_object"}), 4, 512, 300)
    assert sp.seed is not None
    assert sampling_params(_chat(response_format={"type": "json_object"}), 4, 512, 300).seed \
        != sp.seed  # as random as an unseeded request
    assert sampling_params(_chat(response_format={"type": "json_object"}, seed=5), 4, 512,
                           300).seed == 5
    greedy = sampling_params(_chat(response_format={"type": "json_object"}, temperature=0), 4,
                             512, 300)
    assert greedy.seed is None  # greedy repeats without one
    assert sampling_params(_chat(), 4, 512, 300).seed is None


@pytest.mark.parametrize(("fields", "param"), [
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": ""}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": "not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"json_object": True}, "response_format": {"type": "json_object"}},
     "structured_outputs"),
    # vLLM 0.32 takes its JSON spacing from the engine's configuration, not a request's.
    ({"structured_outputs": {"disable_any_whitespace": True}},
     "structured_outputs.disable_any_whitespace"),
    ({"structured_outputs": {"whitespace": "none"}}, "structured_outputs.whitespace"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name"),
])
def test_a_malformed_constraint_is_a_400_naming_its_field(fields: dict[str, Any],
                                                          param: str) -> None:
    with pytest.raises(ApiError) as info:
        _chat(**fields)
    assert info.value.status == 400
    assert info.value.param == param, info.value.message


def test_vllms_removed_guided_fields_point_to_structured_outputs() -> None:
    # vLLM itself now ignores them (unconstrained output): here they are a 400 that says what
    # to send instead.
    with pytest.raises(ApiError) as info:
        _chat(guided_json={"type": "object"})
    assert info.value.param == "guided_json"
    assert '"structured_outputs": {"json": ...}' in info.value.message
