"""Tool calls in a model's output: finding them in the text as it streams, and their wire shape.

A model asked to call tools writes each call in its own syntax; `--tool-call-parser` names the
syntax the served model uses. `hermes` (Hermes, Qwen2.5/Qwen3 and the many models trained on
their template) wraps each call in `<tool_call>` ... `</tool_call>` around a JSON object with
`name` and `arguments`. `ToolCallText` takes the text in pieces as they are decoded and splits
it into what the client sees as content and the calls it sees as `tool_calls`; text that only
looked like a call (a tag without a valid object) stays content, as vLLM leaves it. A reply
forced to be calls (`tool_choice` a named function or "required") is JSON, and
`ForcedCallText` reads its calls out of it as it is written, without a parser.

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


class _Item:
    """The call one element of a "required" array is: its name and where its parameters
    object lies in the text, once they are read."""

    __slots__ = ("call", "name", "params_at", "params_end")

    def __init__(self) -> None:
        self.name: str | None = None
        self.params_at: int | None = None
        self.params_end: int | None = None
        self.call: ToolCall | None = None


def _string(literal: str) -> str | None:
    try:
        value = json.loads(literal)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


class ForcedCallText(_CallReader):
    """A reply constrained to be calls (`tool_choice` a named function, or "required";
    `forced_call_schema` made its constraint), read as it is written. For a named function
    the text is the call's arguments; for "required" it is vLLM's array of `{"name": ...,
    "parameters": ...}`, each element a call that opens once its name is read and whose
    arguments are its parameters object's text. Either way the arguments stream as they are
    written, and a reply cut short by its token budget leaves the last call unfinished, as in
    OpenAI and vLLM. A "required" reply that holds no readable call is the content."""

    __slots__ = ("_depth", "_done", "_escape", "_item", "_key", "_last_key", "_name",
                 "_quoted", "_single", "_string_at", "_text", "finish_reason")

    def __init__(self, name: str | None, single: bool = False) -> None:
        """`name`: the named function (None: "required"); `single` as for `ToolCallText`."""
        super().__init__()
        self._name = name
        self._single = single
        self._text = ""
        # Where the reader is in the JSON: nesting, inside a string (and after a backslash).
        self._depth = 0
        self._quoted = False
        self._escape = False
        self._string_at = 0  # where the string being read opened
        # "required": the array element being read, its key whose value is being read, and
        # the last key read (its value comes after a colon).
        self._item: _Item | None = None
        self._key: str | None = None
        self._last_key: str | None = None
        self._done = 0  # calls written to their end
        # A named call ends as OpenAI and vLLM end one: "stop".
        self.finish_reason = "stop" if name is not None else "tool_calls"

    @property
    def complete(self) -> int:
        return self._done

    def feed(self, text: str) -> str:
        if not text or (self._name is not None and self._done):
            return ""  # after a named call's object: blank text the grammar allowed
        at = len(self._text)
        self._text += text
        for i in range(at, len(self._text)):
            self._step(self._text[i], i)
            if self._name is not None and self._done:
                self._text = self._text[:i + 1]  # what follows is the grammar's blank
                break
        if self._name is not None:
            if self.calls:
                self.calls[0].function.arguments = self._text
            else:
                self.calls.append(ToolCall(call_id(), FunctionCall(self._name, self._text)))
        elif self._item is not None:
            self._write(self._item)
        return ""

    def _step(self, c: str, i: int) -> None:
        if self._quoted:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._quoted = False
                if self._name is None and self._depth == 2:
                    self._string_read(self._text[self._string_at:i + 1])
        elif c == '"':
            self._quoted = True
            self._string_at = i
        elif c in "{[":
            self._depth += 1
            if self._name is None:
                self._nested(c, i)
        elif c in "}]":
            self._depth -= 1
            if self._name is not None:
                self._done = int(self._depth == 0)
            else:
                self._unnested(i + 1)
        elif self._name is None and self._depth == 2:
            if c == ":":
                self._key = self._last_key
            elif c == ",":
                self._key = None

    def _string_read(self, literal: str) -> None:
        item = self._item
        if item is None:
            return
        if self._key is None:
            self._last_key = _string(literal)
        elif self._key == "name" and item.name is None:
            item.name = _string(literal)
            self._open(item)

    def _nested(self, c: str, i: int) -> None:
        if self._depth == 2 and c == "{":
            self._item = _Item()
            self._key = None
        elif self._depth == 3 and self._key == "parameters" and self._item is not None \
                and self._item.params_at is None:
            self._item.params_at = i
            self._open(self._item)

    def _unnested(self, end: int) -> None:
        item = self._item
        if item is None:
            return
        if self._depth == 2 and self._key == "parameters" and item.params_at is not None \
                and item.params_end is None:
            item.params_end = end
        elif self._depth == 1:  # the element's end
            self._write(item)
            if item.call is not None and item.params_end is not None:
                self._done = len(self.calls)
            self._item = None

    def _open(self, item: _Item) -> None:
        """An element's call opens once its name and the start of its parameters are read
        (in either order); with `single`, the first element's only."""
        if item.call is None and item.name is not None and item.params_at is not None \
                and not (self._single and self.calls):
            item.call = ToolCall(call_id(), FunctionCall(item.name, ""))
            self.calls.append(item.call)

    def _write(self, item: _Item) -> None:
        if item.call is not None and item.params_at is not None:
            item.call.function.arguments = self._text[item.params_at:item.params_end]

    def end(self) -> str:
        if self._name is not None or self.calls:
            return ""
        return self._text


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
