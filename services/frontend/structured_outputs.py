"""Structured outputs on the request side: OpenAI's `response_format` and vLLM's
`structured_outputs`, checked and turned into the one `StructuredOutput` a request carries.

Owns the two fields' shapes and the rules an engine cannot check for us: at most one
constraint across both fields, a JSON schema is an object, a choice is a non-empty list, a
schema's name is OpenAI's. Whether a schema, regex or grammar compiles is the engine's to say
(the worker answers a 400 naming it). Does not own decoding.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, Literal

import msgspec

from common.messages import StructuredOutput
from services.frontend.errors import invalid

_SCHEMA_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsOption(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """vLLM's `structured_outputs` request field: one constraint. Its per-request spacing
    options are refused as unknown fields: vLLM 0.32 reads them from its engine's
    configuration only (`--structured-outputs-config`), not from a request."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def structured_output(response_format: ResponseFormat | None,
                      option: StructuredOutputsOption | None) -> StructuredOutput | None:
    """The request's one output constraint (None: free text); an `ApiError` for a malformed or
    doubled one."""
    found: list[tuple[str, Any]] = []
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(("json_object", True))
        else:
            found.append(("json", _response_schema(response_format.json_schema)))
    if option is not None:
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(option, name)
            if value is not None:
                found.append((name, value))
        if option.json_object:
            found.append(("json_object", True))
    if len(found) > 1:
        raise invalid("Only one kind of structured output may be given; got "
                      + ", ".join(name for name, _ in found) + " (across 'response_format' "
                      "and 'structured_outputs')", "structured_outputs", "invalid_value")
    if not found:
        return None
    (kind, value), = found
    if kind == "json":
        value = "{}" if value is None else _schema_text(value)  # no schema: any JSON value
    elif kind == "choice":
        if not value:
            raise invalid("'structured_outputs.choice' must list at least one string",
                          "structured_outputs.choice", "invalid_value")
    elif kind in ("regex", "grammar") and not value:
        raise invalid(f"'structured_outputs.{kind}' must not be empty",
                      f"structured_outputs.{kind}", "invalid_value")
    return StructuredOutput(**{kind: value})


def _response_schema(spec: JsonSchemaFormat | None) -> dict[str, Any] | None:
    if spec is None:
        raise invalid("Missing required parameter: 'response_format.json_schema'.",
                      "response_format.json_schema", "missing_required_parameter")
    if not _SCHEMA_NAME.fullmatch(spec.name):
        raise invalid("Invalid 'response_format.json_schema.name': a schema name is 1-64 "
                      "letters, digits, underscores and dashes",
                      "response_format.json_schema.name", "invalid_value")
    return spec.schema


def _schema_text(schema: str | dict[str, Any]) -> str:
    if isinstance(schema, dict):
        return json.dumps(schema, separators=(",", ":"))
    try:
        parsed = json.loads(schema)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise invalid("'structured_outputs.json' must be a JSON schema: an object, or a "
                      "string holding one", "structured_outputs.json", "invalid_value")
    return schema
