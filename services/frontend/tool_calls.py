"""Tool calls in a model's output: finding them in the text as it streams, and their wire shape.

A model asked to call tools writes each call in its own syntax; `--tool-call-parser` names the
syntax the served model uses. `hermes` (Hermes, Qwen2.5/Qwen3 and the many models trained on
their template) wraps each call in `<tool_call>` ... `</tool_call>` around a JSON object with
`name` and `arguments`. `ToolCallText` takes the text in pieces as they are decoded and splits
it into what the client sees as content and the calls it sees as `tool_calls`; text that only
looked like a call (a tag without a valid object) stays content, as vLLM leaves it.

Owns the parsing and the call objects; not the request checks (`protocol`) or the events
(`responses`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Final

import msgspec

PARSERS: Final = ("hermes",)
_OPEN: Final = "<tool_call>"
_CLOSE: Final = "</tool_call>"


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class ToolCallDelta(msgspec.Struct):
    """One call in a streamed `delta.tool_calls`: whole, in one event."""

    index: int
    id: str
    function: FunctionCall
    type: str = "function"


def call_id() -> str:
    return "call_" + os.urandom(12).hex()


def _call(body: str) -> ToolCall | None:
    """The call one tag holds, or None when it holds no `{"name": ..., "arguments": ...}`."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call_id(), FunctionCall(value["name"],
                                            json.dumps(arguments, ensure_ascii=False)))


def _tag_start(text: str) -> int:
    """Where a possible opening tag begins at the end of `text` (len(text): nowhere), so a
    tag split across two pieces is held back, not shown."""
    for keep in range(min(len(_OPEN) - 1, len(text)), 0, -1):
        if _OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


class _CallReader:
    """What every reader of calls out of a reply's text shares: the calls found, and those
    handed over (`take`). `finish_reason`: the reply's, when it holds calls and ended on its
    own."""

    __slots__ = ("_sent", "calls")
    finish_reason = "tool_calls"

    def __init__(self) -> None:
        self._sent = 0
        self.calls: list[ToolCall] = []

    def take(self) -> list[ToolCallDelta]:
        """The calls finished since the last `take`, numbered in order of appearance."""
        fresh = [ToolCallDelta(self._sent + i, call.id, call.function)
                 for i, call in enumerate(self.calls[self._sent:])]
        self._sent = len(self.calls)
        return fresh


class ToolCallText(_CallReader):
    """The `hermes` syntax over a stream of text pieces: `feed` returns the content to show
    now and keeps each finished call in `calls` (`take` hands over the ones not yet sent);
    `end` returns what is left once the text is complete."""

    __slots__ = ("_blank", "_held", "_inside", "_single")

    def __init__(self, single: bool = False) -> None:
        """`single`: OpenAI's `parallel_tool_calls: false`, calls after the first dropped."""
        super().__init__()
        self._held = ""  # text not shown yet: a possible tag start, or a call being written
        self._blank = ""  # blank text after a call: shown only if more text follows it
        self._inside = False
        self._single = single

    def _add(self, call: ToolCall) -> None:
        if not (self._single and self.calls):
            self.calls.append(call)

    def feed(self, text: str) -> str:
        if not text:
            return ""
        text = self._held + text
        self._held = ""
        shown: list[str] = []
        while text:
            if self._inside:
                end = text.find(_CLOSE)
                if end < 0:
                    self._held = text
                    break
                body, text = text[:end], text[end + len(_CLOSE):]
                self._inside = False
                call = _call(body)
                if call is None:  # not a call after all: the text as written
                    shown.append(self._content(_OPEN + body + _CLOSE))
                else:
                    self._add(call)
                continue
            start = text.find(_OPEN)
            if start < 0:
                cut = _tag_start(text)
                shown.append(self._content(text[:cut]))
                self._held = text[cut:]
                break
            shown.append(self._content(text[:start]))
            text = text[start + len(_OPEN):]
            self._inside = True
        return "".join(shown)

    def _content(self, out: str) -> str:
        """Text before the first call is content; between and after calls a model writes
        newlines, content only if it says something (whatever the pieces' boundaries)."""
        if not self.calls:
            return out
        if not out.strip():
            self._blank += out
            return ""
        out, self._blank = self._blank + out, ""
        return out

    def end(self) -> str:
        """The text is complete: a call left open is one if its object is whole, else text."""
        held, self._held = self._held, ""
        if self._inside:
            self._inside = False
            call = _call(held)
            if call is not None:
                self._add(call)
                return ""
            held = _OPEN + held
        return self._content(held)


class ForcedCallText(_CallReader):
    """A reply constrained to be calls (`tool_choice` a named function, or "required";
    `forced_call_schema` made its constraint): its whole text is JSON, read once complete.
    For a named function the text is the call's arguments; for "required", vLLM's array of
    `{"name": ..., "parameters": ...}`. Text that does not read so (a reply cut short by its
    token budget) is shown as content."""

    __slots__ = ("_held", "_name", "_single", "finish_reason")

    def __init__(self, name: str | None, single: bool = False) -> None:
        """`name`: the named function (None: "required"); `single` as for `ToolCallText`."""
        super().__init__()
        self._held: list[str] = []
        self._name = name
        self._single = single
        # A named call ends as OpenAI and vLLM end one: "stop".
        self.finish_reason = "stop" if name is not None else "tool_calls"

    def feed(self, text: str) -> str:
        self._held.append(text)
        return ""

    def end(self) -> str:
        text = "".join(self._held)
        self._held.clear()
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if self._name is not None:
            if not isinstance(value, dict):
                return text
            self.calls.append(ToolCall(call_id(), FunctionCall(self._name, text)))
            return ""
        if not isinstance(value, list) or not all(
                isinstance(item, dict) and isinstance(item.get("name"), str)
                and isinstance(item.get("parameters"), dict) for item in value):
            return text
        for item in value[:1] if self._single else value:
            self.calls.append(ToolCall(call_id(), FunctionCall(
                item["name"], json.dumps(item["parameters"], ensure_ascii=False))))
        return ""


def forced_call_schema(tools: list[dict[str, Any]], name: str | None,
                       single: bool = False) -> dict[str, Any]:
    """The JSON schema a reply forced to call tools must fit: the named function's parameters,
    or (`name` None: "required") a non-empty array of calls to any of `tools`, as vLLM builds
    them; one call at most when `single` (`parallel_tool_calls: false`)."""
    def parameters(function: dict[str, Any]) -> dict[str, Any]:
        return function.get("parameters") or {"type": "object", "properties": {}}

    functions = [tool["function"] for tool in tools]
    if name is not None:
        return parameters(next(f for f in functions if f["name"] == name))
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [f["name"]]},
                        "parameters": parameters(f)},
         "required": ["name", "parameters"]} for f in functions]}}
    if single:
        schema["maxItems"] = 1
    return schema
