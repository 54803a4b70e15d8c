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


class FunctionCallDelta(msgspec.Struct, omit_defaults=True):
    arguments: str
    name: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """One call's part of a streamed `delta.tool_calls`: its opening (id, type, name and its
    arguments so far), or more of its arguments (index and arguments only), as OpenAI and vLLM
    stream a call."""

    index: int
    function: FunctionCallDelta
    id: str | None = None
    type: str | None = None


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
    """What every reader of calls out of a reply's text shares: the calls found (the last may
    still be being written: see `complete`), and what of them was handed over (`take`).
    `finish_reason`: the reply's, when it holds calls and ended on its own."""

    __slots__ = ("_opened", "_sent", "calls")
    finish_reason = "tool_calls"

    def __init__(self) -> None:
        self._opened = 0  # calls whose opening was handed over
        self._sent = 0  # characters of the last opened call's arguments handed over
        self.calls: list[ToolCall] = []

    @property
    def complete(self) -> int:
        """How many of `calls` are written to their end."""
        return len(self.calls)

    def take(self) -> list[ToolCallDelta]:
        """What was written since the last `take`: the rest of the last call handed over,
        then each new call's opening with its arguments so far, numbered in order of
        appearance."""
        out = []
        if self._opened and len(args := self.calls[self._opened - 1].function.arguments) \
                > self._sent:
            out.append(ToolCallDelta(self._opened - 1, FunctionCallDelta(args[self._sent:])))
        for i in range(self._opened, len(self.calls)):
            call = self.calls[i]
            out.append(ToolCallDelta(i, FunctionCallDelta(call.function.arguments,
                                                          call.function.name),
                                     call.id, call.type))
        self._opened = len(self.calls)
        self._sent = len(self.calls[-1].function.arguments) if self.calls else 0
        return out


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
    `forced_call_schema` made its constraint). For a named function the text is the call's
    arguments, streamed as they are written (a reply cut short by its token budget leaves
    them unfinished, as in OpenAI and vLLM). For "required" it is vLLM's array of `{"name":
    ..., "parameters": ...}`, read once complete; text that does not read so (cut short) is
    shown as content."""

    __slots__ = ("_ended", "_held", "_name", "_single", "finish_reason")

    def __init__(self, name: str | None, single: bool = False) -> None:
        """`name`: the named function (None: "required"); `single` as for `ToolCallText`."""
        super().__init__()
        self._held: list[str] = []
        self._name = name
        self._single = single
        self._ended = False
        # A named call ends as OpenAI and vLLM end one: "stop".
        self.finish_reason = "stop" if name is not None else "tool_calls"

    @property
    def complete(self) -> int:
        return len(self.calls) if self._ended or self._name is None else 0

    def feed(self, text: str) -> str:
        if self._name is None:
            self._held.append(text)
        elif self.calls:
            self.calls[0].function.arguments += text
        elif text:
            self.calls.append(ToolCall(call_id(), FunctionCall(self._name, text)))
        return ""

    def end(self) -> str:
        self._ended = True
        if self._name is not None:
            return ""
        text = "".join(self._held)
        self._held.clear()
        try:
            value = json.loads(text)
        except ValueError:
            return text
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
