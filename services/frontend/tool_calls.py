"""Tool calls in a model's output: finding them in the text as it streams, and their wire shape.

A model asked to call tools writes each call in its own syntax; `--tool-call-parser` names the
syntax the served model uses. `hermes` (Hermes, Qwen2.5/Qwen3 and the many models trained on
their template) wraps each call in `<tool_call>` ... `</tool_call>` around a JSON object with
`name` and `arguments`. `ToolCallText` takes the text in pieces as they are decoded and splits
it into what the client sees as content and the calls it sees as `tool_calls`; text that only
looked like a call (a tag without a valid object) stays content, as vLLM leaves it.
`llama3_json` (Llama 3.1 and later) answers a call with nothing but its JSON object, `{"name":
..., "parameters": ...}` (several split by `;`, maybe after `<|python_tag|>`); `JsonCallText`
reads a reply that starts so as calls, any other as content. `qwen3_coder` (Qwen3-Coder,
Qwen3.5) writes `<function=NAME>` and a `<parameter=KEY>` tag per value inside the same tags,
each value plain text that the function's schema types. `glm45` and `glm47` (GLM-4.5 to 4.7)
write the function's name in the tags, then `<arg_key>` and `<arg_value>` pairs, a string
parameter as it is and any other as JSON. `deepseek_v31` (DeepSeek-V3.1 and later) writes each
call's name and JSON arguments between tags of its own, inside its calls tags; so does
`kimi_k2` (Kimi K2), with tags of its own and each call's id before its arguments. `pythonic`
(Llama 3.2, Llama 4) answers with a Python list of calls, `[f(a=1), g()]`; `PythonCallText`
reads each call once its `)` is written. A reply forced to be calls (`tool_choice` a named
function or "required") is JSON, and `ForcedCallText` reads its calls out of it without a
parser. Otherwise a call is handed over as it is written (`_JsonCalls` reads the JSON as it
comes): its name, then its arguments in pieces, as vLLM streams them.

Owns the parsing and the call objects; not the request checks (`protocol`) or the events
(`responses`).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from typing import Any, Final

import msgspec

GLM_PARSERS: Final = ("glm45", "glm47")  # GLM-4.5 to 4.7 write calls alike
PARSERS: Final = ("deepseek_v31", *GLM_PARSERS, "hermes", "kimi_k2", "llama3_json", "pythonic",
                  "qwen3_coder")
# Those whose tags some models make special tokens (GLM's, some Hermes models'): as vLLM does,
# a reply read with them keeps its special tokens' text, else the tags would not be seen.
READS_SPECIAL_TOKENS: Final = ("hermes", "kimi_k2", "qwen3_coder", *GLM_PARSERS)
TOOL_CALL_TAG: Final = "<tool_call>"  # hermes's; for qwen3 it also ends the thinking
_CLOSE: Final = "</tool_call>"
_PYTHON_TAG: Final = "<|python_tag|>"  # Llama 3's, ahead of a call (shown with its specials)
_PYTHON_START: Final = "<|python_start|>"  # Llama 4's, around its list of calls (the same)
_PYTHON_END: Final = "<|python_end|>"
_NAME: Final = re.compile(r"\s*[A-Za-z_]\w*\s*")  # a pythonic call's, before its `(`
_NAME_SO_FAR: Final = re.compile(r"\s*(?:[A-Za-z_]\w*\s*)?")


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


def tag_start(text: str, tag: str) -> int:
    """Where a possible `tag` begins at the end of `text` (len(text): nowhere), so a tag
    split across two pieces is held back, not read."""
    for keep in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def _string(literal: str) -> str | None:
    try:
        value = json.loads(literal)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


class _JsonCursor:
    """Where a reader is in JSON text written so far: how deep it is nested, and whether it is
    inside a string (and just after a backslash there)."""

    __slots__ = ("_escape", "_quoted", "depth", "string_at")

    def __init__(self) -> None:
        self.depth = 0
        self._quoted = False
        self._escape = False
        self.string_at = 0  # where the last string opened

    def step(self, c: str, i: int) -> str:
        """Moves past `c`, at `i` in the text; returns what it is to the structure: a bracket,
        a colon or comma outside strings, '"' when a string closes (from `string_at` to
        here), else ""."""
        if self._quoted:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._quoted = False
                return c
            return ""
        if c == '"':
            self._quoted = True
            self.string_at = i
        elif c in "{[":
            self.depth += 1
            return c
        elif c in "}]":
            self.depth -= 1
            return c
        elif c in ":,":
            return c
        return ""


class _Item:
    """The call one JSON object is: its name and where its arguments object lies in the text,
    once they are read."""

    __slots__ = ("args_at", "args_end", "call", "name")

    def __init__(self) -> None:
        self.name: str | None = None
        self.args_at: int | None = None
        self.args_end: int | None = None
        self.call: ToolCall | None = None


class _JsonCalls:
    """Calls read out of JSON as it is written: each object `depth` deep is one, its name the
    string under "name" and its arguments the object under one of `keys`. A call joins
    `calls` once its name and the start of its arguments are read (in either order), and its
    arguments are that object's text so far; with `single`, only while `calls` is empty."""

    __slots__ = ("_cursor", "_depth", "_item", "_key", "_keys", "_last_key", "_single",
                 "calls", "opened", "text")

    def __init__(self, calls: list[ToolCall], depth: int, keys: tuple[str, ...],
                 single: bool) -> None:
        self.calls = calls
        self._depth = depth
        self._keys = keys
        self._single = single
        self.text = ""
        self.opened = False  # whether a call was read (and joined `calls`)
        self._cursor = _JsonCursor()
        self._item: _Item | None = None  # the object being read
        self._key: str | None = None  # the key whose value is being read
        self._last_key: str | None = None  # the last key read (its value follows a colon)

    @property
    def unfinished(self) -> bool:
        """Whether the last call joined is still being written (its object is not closed)."""
        return self._item is not None and self._item.call is not None

    def feed(self, text: str) -> None:
        at = len(self.text)
        self.text += text
        for i in range(at, len(self.text)):
            if kind := self._cursor.step(self.text[i], i):
                self._structure(kind, i)
        if self._item is not None:
            self._write(self._item)

    def _structure(self, kind: str, i: int) -> None:
        depth, item = self._cursor.depth, self._item
        if kind == "{" and depth == self._depth:
            self._item, self._key = _Item(), None
        elif item is None:
            return
        elif kind == '"':
            if depth == self._depth:
                self._string_read(item, self.text[self._cursor.string_at:i + 1])
        elif kind == "{":
            if depth == self._depth + 1 and self._key in self._keys and item.args_at is None:
                item.args_at = i
                self._open(item)
        elif kind in "}]":
            if depth == self._depth and self._key in self._keys and item.args_end is None \
                    and item.args_at is not None:
                item.args_end = i + 1
            elif depth == self._depth - 1:  # the object's end
                self._write(item)
                self._item = None
        elif depth == self._depth:
            self._key = self._last_key if kind == ":" else None

    def _string_read(self, item: _Item, literal: str) -> None:
        if self._key is None:
            self._last_key = _string(literal)
        elif self._key == "name" and item.name is None:
            item.name = _string(literal)
            self._open(item)

    def _open(self, item: _Item) -> None:
        if item.call is None and item.name is not None and item.args_at is not None \
                and not (self._single and self.calls):
            item.call = ToolCall(call_id(), FunctionCall(item.name, ""))
            self.calls.append(item.call)
            self.opened = True

    def _write(self, item: _Item) -> None:
        if item.call is not None and item.args_at is not None:
            item.call.function.arguments = self.text[item.args_at:item.args_end]

    def close(self) -> None:
        """The tag closed: a JSON body says where it ends itself."""


_FUNCTION: Final = "<function="
_FUNCTION_END: Final = "</function>"
_PARAMETER: Final = "<parameter="
_PARAMETER_END: Final = "</parameter>"


def parameter_types(tools: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Each function's parameters' JSON types (the first named, when a list), by name: how a
    `qwen3_coder` call's values, written as plain text, are read."""
    out: dict[str, dict[str, str]] = {}
    for tool in tools:
        function = tool.get("function") or {}
        properties = (function.get("parameters") or {}).get("properties")
        kinds: dict[str, str] = {}
        for key, schema in properties.items() if isinstance(properties, dict) else ():
            kind = schema.get("type") if isinstance(schema, dict) else None
            if isinstance(kind, list):
                kind = next((k for k in kind if isinstance(k, str) and k != "null"), None)
            if isinstance(kind, str):
                kinds[key] = kind
        out[function.get("name", "")] = kinds
    return out


def _typed(value: str, kind: str | None) -> Any:
    """A parameter's text as its schema's type reads it; the text itself when it does not read
    so (or the type is a string, or unknown)."""
    word = value.strip()
    try:
        if kind == "integer":
            return int(word)
        if kind == "number":
            number = float(word)
            if math.isfinite(number):  # JSON has no NaN or infinity
                return int(number) if number.is_integer() and word.lstrip("-").isdigit() \
                    else number
        if kind == "boolean" and word.lower() in ("true", "false"):
            return word.lower() == "true"
        if kind == "null" and word.lower() == "null":
            return None
        if kind in ("object", "array"):
            parsed = json.loads(word)
            json.dumps(parsed, allow_nan=False)  # a NaN inside is no JSON either
            return parsed
    except ValueError:
        pass
    return value


class _KeyedCalls:
    """What the readers of calls written key by key in one tag's body share: the call being
    written, opened by name (it joins `calls`; with `single`, only while `calls` is empty),
    its arguments JSON text that grows a key at a time, each value typed by `types`."""

    __slots__ = ("_at", "_call", "_listed", "_single", "_types", "calls", "opened", "text")

    def __init__(self, calls: list[ToolCall], single: bool,
                 types: dict[str, dict[str, str]]) -> None:
        self.calls = calls
        self._single = single
        self._types = types
        self.text = ""
        self.opened = False  # a call was read, even one `single` drops: not the tag's text
        self._at = 0  # what is read of `text`
        self._call: ToolCall | None = None  # the function being written
        self._listed = False  # whether that call joined `calls`

    @property
    def unfinished(self) -> bool:
        return self._call is not None and self._listed

    def _open(self, name: str, id_: str | None = None) -> None:
        self._call = ToolCall(id_ or call_id(), FunctionCall(name, ""))
        self._listed = not (self._single and self.calls)
        if self._listed:
            self.calls.append(self._call)
        self.opened = True

    def _add(self, key: str, value: Any) -> None:
        assert self._call is not None
        function = self._call.function
        function.arguments += "".join((", " if function.arguments else "{",
                                       json.dumps(key, ensure_ascii=False), ": ",
                                       json.dumps(value, ensure_ascii=False)))

    def _close_call(self) -> None:
        assert self._call is not None
        function = self._call.function
        function.arguments = function.arguments + "}" if function.arguments else "{}"
        self._call = None

    def feed(self, text: str) -> None:
        self.text += text
        while self._step():
            pass

    def _step(self) -> bool:
        """Reads the next whole element after `_at`; False when none is written yet."""
        raise NotImplementedError

    def close(self) -> None:
        """The tag closed: each call was ended by its own syntax, or keeps what it wrote."""


class _XmlCalls(_KeyedCalls):
    """The `qwen3_coder` calls in one `<tool_call>` body as it is written: `<function=NAME>`
    opens a call, each `<parameter=KEY>` ... `</parameter>` adds a key to its arguments once
    its value is written (one newline around it dropped), `</function>` closes them."""

    __slots__ = ()

    def _step(self) -> bool:
        text = self.text
        if self._call is None:
            start = text.find(_FUNCTION, self._at)
            end = text.find(">", start) if start >= 0 else -1
            if end < 0:
                return False
            self._open(text[start + len(_FUNCTION):end].strip())
            self._at = end + 1
            return True
        parameter = text.find(_PARAMETER, self._at)
        closing = text.find(_FUNCTION_END, self._at)
        if parameter >= 0 and (closing < 0 or parameter < closing):
            name_end = text.find(">", parameter)
            # A value ends at its closing tag, or where the next parameter or the end begins.
            ends = [at for tag in (_PARAMETER_END, _PARAMETER, _FUNCTION_END)
                    if name_end >= 0 and (at := text.find(tag, name_end)) >= 0]
            if not ends:
                return False
            end = min(ends)
            key = text[parameter + len(_PARAMETER):name_end].strip()
            value = text[name_end + 1:end].removeprefix("\n").removesuffix("\n")
            self._add(key, _typed(value, self._types.get(self._call.function.name, {})
                                  .get(key)))
            self._at = end + len(_PARAMETER_END) if text.startswith(_PARAMETER_END, end) \
                else end
            return True
        if closing < 0:
            return False
        self._close_call()
        self._at = closing + len(_FUNCTION_END)
        return True



_ARG_KEY: Final = "<arg_key>"
_ARG_KEY_END: Final = "</arg_key>"
_ARG_VALUE: Final = "<arg_value>"
_ARG_VALUE_END: Final = "</arg_value>"


def _written_value(value: str, kind: str | None) -> Any:
    """A `glm45` value as its template writes one: a string parameter as it is, any other as
    the JSON it spells (typed by its schema when that names a type; the text when it reads as
    nothing)."""
    if kind is not None:
        return _typed(value, kind)
    try:
        parsed = json.loads(value)
        json.dumps(parsed, allow_nan=False)
        return parsed
    except ValueError:
        return value


class _KeyValueCalls(_KeyedCalls):
    """The `glm45` call in one `<tool_call>` body as it is written: the function's name first
    (it opens once a newline or its first `<arg_key>` ends it, and only if the request has
    such a tool), then `<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>` pairs, each added
    to the arguments once its value is written. The arguments close with the tag (`close`)."""

    __slots__ = ()

    def feed(self, text: str) -> None:
        self.text += text
        if self._call is None:
            ends = [at for tag in ("\n", _ARG_KEY)
                    if (at := self.text.find(tag, len(self.text) - len(self.text.lstrip())))
                    >= 0]
            if not ends or not self._name(self.text[:min(ends)]):
                return
            self._at = min(ends)
        while self._pair(closed=False):
            pass

    def _name(self, text: str) -> bool:
        """Opens the call `text` names; False when it names none of the tools."""
        name = text.strip()
        if name not in self._types:
            return False
        self._open(name)
        return True

    def _pair(self, closed: bool) -> bool:
        """Reads the next key and value after `_at`; False when none is written yet (`closed`:
        the tag closed, so a value left open runs to its end)."""
        assert self._call is not None
        text = self.text
        key_at = text.find(_ARG_KEY, self._at)
        key_end = text.find(_ARG_KEY_END, key_at) if key_at >= 0 else -1
        value_at = text.find(_ARG_VALUE, key_end) if key_end >= 0 else -1
        if value_at < 0:
            return False
        start = value_at + len(_ARG_VALUE)
        # A value ends at its closing tag, or where the next key begins.
        ends = [at for tag in (_ARG_VALUE_END, _ARG_KEY) if (at := text.find(tag, start)) >= 0]
        if not ends and not closed:
            return False
        end = min(ends) if ends else len(text)
        key = text[key_at + len(_ARG_KEY):key_end].strip()
        kind = self._types.get(self._call.function.name, {}).get(key)
        self._add(key, _written_value(text[start:end], kind))
        self._at = end + len(_ARG_VALUE_END) if text.startswith(_ARG_VALUE_END, end) else end
        return True

    def close(self) -> None:
        if self._call is None and not self._name(self.text):
            return
        while self._pair(closed=True):
            pass
        self._close_call()


def _deepseek_tag(words: str) -> str:
    """A DeepSeek tag: its words between fullwidth bars, joined by lower blocks."""
    return "<\uff5c" + words.replace(" ", "\u2581") + "\uff5c>"


_DS_CALLS: Final = _deepseek_tag("tool calls begin")  # DeepSeek-V3.1's, around its calls
_DS_CALLS_END: Final = _deepseek_tag("tool calls end")
_DS_CALL: Final = _deepseek_tag("tool call begin")
_DS_SEP: Final = _deepseek_tag("tool sep")
_DS_CALL_END: Final = _deepseek_tag("tool call end")


class _SeparatedCalls(_KeyedCalls):
    """The `deepseek_v31` calls between its calls tags as they are written: each "tool call
    begin" tag, the function's name and a "tool sep" tag open a call, whose arguments are the
    JSON written after it, handed over as it comes, until a "tool call end" tag."""

    __slots__ = ()
    _CALL: str = _DS_CALL
    _SEP: str = _DS_SEP
    _END: str = _DS_CALL_END

    def _step(self) -> bool:
        text = self.text
        if self._call is None:
            begin = text.find(self._CALL, self._at)
            sep = text.find(self._SEP, begin) if begin >= 0 else -1
            if sep < 0:
                return False
            self._named(text[begin + len(self._CALL):sep].strip())
            self._at = sep + len(self._SEP)
            return True
        end = text.find(self._END, self._at)
        upto = end if end >= 0 else max(self._at, tag_start(text, self._END))
        self._call.function.arguments = text[self._at:upto]
        if end < 0:
            return False
        self._call = None
        self._at = end + len(self._END)
        return True

    def _named(self, header: str) -> None:
        """Opens the call whose header (what comes before its arguments) is `header`."""
        self._open(header)


KIMI_CALLS_TAG: Final = "<|tool_calls_section_begin|>"  # Kimi K2's; it also ends the thinking
_KIMI_CALLS_END: Final = "<|tool_calls_section_end|>"
_KIMI_ID: Final = re.compile(r"\S+:\d+")


class _KimiCalls(_SeparatedCalls):
    """The `kimi_k2` calls in its calls section: as `deepseek_v31`'s, with Kimi's tags, and a
    header that is the call's id, `functions.NAME:INDEX` (Kimi's chat template wants it back
    as the id of the call)."""

    __slots__ = ()
    _CALL = "<|tool_call_begin|>"
    _SEP = "<|tool_call_argument_begin|>"
    _END = "<|tool_call_end|>"

    def _named(self, header: str) -> None:
        self._open(header.split(":")[0].removeprefix("functions."),
                   header if _KIMI_ID.fullmatch(header) else None)


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
    now, and each call joins `calls` as it is written (`take` hands over what is new): once
    its name and the start of its arguments object are read, the arguments growing until its
    object closes. A tag whose body is no call so far is read when it closes (arguments
    written as a JSON string, say), or shown as the text it is. `end` returns what is left
    once the text is complete."""

    __slots__ = ("_blank", "_body", "_held", "_inside", "_parser", "_reader", "_single",
                 "_tags", "_types")

    def __init__(self, single: bool = False, parser: str = "hermes",
                 types: dict[str, dict[str, str]] | None = None) -> None:
        """`single`: OpenAI's `parallel_tool_calls: false`, calls after the first dropped;
        `parser`: what the tags hold, `hermes`'s JSON, `qwen3_coder`'s `<function=...>` or
        `glm45`'s name and `<arg_key>` pairs (each read with `types`, the tools'
        `parameter_types`)."""
        super().__init__()
        self._parser = parser
        self._types = types or {}
        # What opens and closes the calls.
        self._tags = {"deepseek_v31": (_DS_CALLS, _DS_CALLS_END),
                      "kimi_k2": (KIMI_CALLS_TAG, _KIMI_CALLS_END)}.get(
            parser, (TOOL_CALL_TAG, _CLOSE))
        self._held = ""  # text not read yet: a possible tag split across pieces
        self._blank = ""  # blank text after a call: shown only if more text follows it
        self._inside = False
        self._body = ""  # the open tag's text so far
        self._reader: _JsonCalls | _KeyedCalls | None = None  # the open tag's, as it comes
        self._single = single

    @property
    def complete(self) -> int:
        return len(self.calls) - (self._reader is not None and self._reader.unfinished)

    def feed(self, text: str) -> str:
        if not text:
            return ""
        text = self._held + text
        self._held = ""
        shown: list[str] = []
        while text:
            if self._inside:
                end = text.find(self._tags[1])
                if end < 0:
                    cut = tag_start(text, self._tags[1])
                    self._read(text[:cut])
                    self._held = text[cut:]
                    break
                self._read(text[:end])
                text = text[end + len(self._tags[1]):]
                shown.append(self._close(self._tags[1]))
                continue
            start = text.find(self._tags[0])
            if start < 0:
                cut = tag_start(text, self._tags[0])
                shown.append(self._content(text[:cut]))
                self._held = text[cut:]
                break
            shown.append(self._content(text[:start]))
            text = text[start + len(self._tags[0]):]
            self._inside = True
            self._reader = self._body_reader()
        return "".join(shown)

    def _body_reader(self) -> _JsonCalls | _KeyedCalls:
        if self._parser == "qwen3_coder":
            return _XmlCalls(self.calls, self._single, self._types)
        if self._parser == "deepseek_v31":
            return _SeparatedCalls(self.calls, self._single, self._types)
        if self._parser == "kimi_k2":
            return _KimiCalls(self.calls, self._single, self._types)
        if self._parser in GLM_PARSERS:
            return _KeyValueCalls(self.calls, self._single, self._types)
        return _JsonCalls(self.calls, 1, ("arguments", "parameters"), self._single)

    def _read(self, body: str) -> None:
        if body:
            self._body += body
            assert self._reader is not None  # inside a tag
            self._reader.feed(body)

    def _close(self, tag: str) -> str:
        """The tag's body is written (`tag`: what closed it): the call read as it came, else
        the call it holds, else the text as written (content)."""
        body, self._body, self._inside = self._body, "", False
        reader, self._reader = self._reader, None
        if reader is not None and tag:
            reader.close()
        if reader is not None and reader.opened:
            if not tag and reader.unfinished:
                self._reader = reader  # cut short: its call stays unfinished
            return ""
        call = _call(body)
        if call is None:  # not a call after all: the text as written
            return self._content(self._tags[0] + body + tag)
        if not (self._single and self.calls):
            self.calls.append(call)
        return ""

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
        """The text is complete: a tag left open is a call if one was read from it (cut
        short, the last one unfinished) or its object is whole, else text."""
        held, self._held = self._held, ""
        if self._inside:
            self._read(held)  # a closing tag's start, never finished: part of the body
            return self._close("")
        return self._content(held)


def _calls_first(text: str, opener: str, tag: str) -> bool | None:
    """Whether a reply that begins with `text` is calls: it starts (after blank) with `opener`
    or the model's `tag` for calls; None while its start cannot tell yet."""
    start = text.lstrip()
    if not start or (tag.startswith(start) and start != tag):
        return None
    return start.startswith((opener, tag))


class JsonCallText(_CallReader):
    """The `llama3_json` syntax over a stream of text pieces: a reply that starts (after blank)
    with `{` or `<|python_tag|>` is calls, each object a call read as it is written, as vLLM
    reads one; any other reply is content, shown as it comes. A reply that started so but
    holds no call is the content once complete (`end`)."""

    __slots__ = ("_calls_mode", "_held", "_reader")

    def __init__(self, single: bool = False) -> None:
        super().__init__()
        self._calls_mode: bool | None = None  # None: not known until the reply starts
        self._held = ""  # the reply's start, until it says which it is
        self._reader = _JsonCalls(self.calls, 1, ("parameters", "arguments"), single)

    @property
    def complete(self) -> int:
        return len(self.calls) - self._reader.unfinished

    def feed(self, text: str) -> str:
        if self._calls_mode is None:
            text = self._held + text
            self._calls_mode = _calls_first(text, "{", _PYTHON_TAG)
            if self._calls_mode is None:
                self._held = text
                return ""
            self._held = ""
        if not self._calls_mode:
            return text
        self._reader.feed(text)  # the tag's characters are no JSON: the reader passes them
        return ""

    def end(self) -> str:
        if self._calls_mode is None:
            held, self._held = self._held, ""
            return held
        return self._reader.text if self._calls_mode and not self.calls else ""


class PythonCallText(_CallReader):
    """The `pythonic` syntax (Llama 3.2, Llama 4 and others) over a stream of text pieces: a
    reply that starts (after blank) with `[` is a Python list of calls, `[get_weather(city=
    "Paris"), now()]`, each argument a keyword whose value is a Python literal; any other
    reply is content, shown as it comes. A call joins `calls` once its closing parenthesis
    is read, its arguments the keywords as a JSON object (a literal has no JSON text before
    it is whole). From what is no such call on, the text is content (all of it when no call
    came before); so is text after the list. A call cut short before its `)` is none."""

    __slots__ = ("_at", "_closed", "_depth", "_element", "_held", "_lead", "_mode", "_quote",
                 "_single", "_text")

    def __init__(self, single: bool = False) -> None:
        super().__init__()
        self._single = single
        # None until the reply's start tells; "calls", then "after" the list or "content" once
        # what follows is no call.
        self._mode: str | None = None
        self._held = ""  # the reply's start, until it says which it is
        self._lead = ""  # what came before the list's `[` (blank, Llama 4's tag)
        self._text = ""  # the list's text, from its `[`
        self._at = 1  # where reading goes on in `_text`
        self._depth = 1  # of brackets of any kind, the list's own counted
        self._quote = ""  # the quote of the string being read ("": none)
        self._element = 1  # where the list's current element starts
        self._closed = False  # the current element is a call that closed

    def feed(self, text: str) -> str:
        if self._mode is None:
            text = self._held + text
            calls = _calls_first(text, "[", _PYTHON_START)
            if calls is None:
                self._held = text
                return ""
            bracket = text.find("[")
            if calls and bracket < 0 and not text.lstrip().removeprefix(_PYTHON_START).strip():
                self._held = text  # Llama 4's tag, its list not begun
                return ""
            self._held = ""
            if not calls or bracket < 0 or text[:bracket].strip() not in ("", _PYTHON_START):
                self._mode = "content"
                return text
            self._mode = "calls"
            self._lead, text = text[:bracket], text[bracket:]
        if self._mode == "content":
            return text
        if self._mode == "after":
            return self._after(text)
        self._text += text
        return self._read()

    def _after(self, text: str) -> str:
        """Text after the list: held while it may be blank and Llama 4's closing tag (dropped
        then), else content."""
        self._held += text
        if _PYTHON_END.startswith(self._held.strip()):
            return ""
        held, self._held, self._mode = self._held, "", "content"
        return held

    def _read(self) -> str:
        """Reads on through the list; the text that turned out to be content, if any."""
        text = self._text
        while self._at < len(text):
            at, c = self._at, text[self._at]
            if self._quote:
                if c == "\\":
                    self._at += 2  # past what it escapes, written yet or not
                    continue
                if text.startswith(self._quote, at):
                    self._at += len(self._quote)
                    self._quote = ""
                    continue
                if len(self._quote) == 3 and len(text) - at < 3 \
                        and self._quote.startswith(text[at:]):
                    break  # maybe the string's end, in pieces
                self._at += 1
                continue
            if self._depth == 1 and not self._may_be_call(at, c):
                return self._stop()  # shown at once: no wait for the list's end
            if c in "'\"":
                if text.startswith(c * 3, at):
                    self._quote = c * 3
                elif len(text) - at < 3 and (c * 3).startswith(text[at:]):
                    break  # an empty string or a triple quote's start: not known yet
                else:
                    self._quote = c
                self._at += len(self._quote)
                continue
            self._at += 1
            if c in "([{":
                self._depth += 1
            elif c in ")]}":
                self._depth -= 1
                if self._depth == 1 and c == ")":
                    if not self._call(text[self._element:at + 1]):
                        return self._stop()
                    self._element, self._closed = at + 1, True
                elif self._depth == 0:  # the list's end
                    if c != "]" or not self._ends_element(at):
                        return self._stop()
                    self._mode = "after"
                    return self._after(text[at + 1:])
            elif c == "," and self._depth == 1:
                if not self._ends_element(at):
                    return self._stop()
                self._element, self._closed = at + 1, False
        return ""

    def _may_be_call(self, at: int, c: str) -> bool:
        """Whether the list's element, `c` at `at` next, may still be a call: a name, then
        its `(`; after the call, blank up to a comma or the list's end."""
        if c in ",])":
            return True  # the structure's to judge
        if self._closed:
            return c.isspace()
        written = self._text[self._element:at]
        return bool(_NAME.fullmatch(written) if c == "(" else _NAME_SO_FAR.fullmatch(written + c))

    def _ends_element(self, at: int) -> bool:
        """Whether the element ending at `at` (a comma or the list's end) was a call and
        nothing more (or, after a trailing comma, nothing)."""
        blank = not self._text[self._element:at].strip()
        return blank and (self._closed or (self._text[self._element - 1] == "," and
                                           self._depth == 0 and bool(self.calls)))

    def _call(self, source: str) -> bool:
        """Reads one call's text; False when it is no call with literal keywords."""
        try:
            node = ast.parse(source.strip(), mode="eval").body
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) \
                    or node.args or any(kw.arg is None for kw in node.keywords):
                return False
            arguments = json.dumps({kw.arg: ast.literal_eval(kw.value) for kw in node.keywords},
                                   ensure_ascii=False, allow_nan=False)
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return False
        if not (self._single and self.calls):
            self.calls.append(ToolCall(call_id(), FunctionCall(node.func.id, arguments)))
        return True

    def _stop(self) -> str:
        """What is no call: from it on the text is content (from the start when no call came
        before)."""
        self._mode = "content"
        return self._text[self._element:] if self.calls else self._lead + self._text

    def end(self) -> str:
        if self._mode in (None, "after"):
            held, self._held = self._held, ""
            return "" if self._mode == "after" and held.strip() in ("", _PYTHON_END) else held
        if self._mode == "calls" and not self.calls:
            self._mode = "content"
            return self._lead + self._text
        return ""


def call_reader(parser: str, tools: list[dict[str, Any]],
                single: bool = False) -> ToolCallText | JsonCallText | PythonCallText:
    """The reader of the calls to `tools` a reply in `parser`'s syntax makes."""
    if parser == "llama3_json":
        return JsonCallText(single)
    if parser == "pythonic":
        return PythonCallText(single)
    return ToolCallText(single, parser, parameter_types(tools))


class ForcedCallText(_CallReader):
    """A reply constrained to be calls (`tool_choice` a named function, or "required";
    `forced_call_schema` made its constraint), read as it is written. For a named function
    the text is the call's arguments; for "required" it is vLLM's array of `{"name": ...,
    "parameters": ...}`, each element a call. Either way the arguments stream as they are
    written, and a reply cut short by its token budget leaves the last call unfinished, as in
    OpenAI and vLLM. A "required" reply that holds no call is the content."""

    __slots__ = ("_cursor", "_done", "_name", "_reader", "_text", "finish_reason")

    def __init__(self, name: str | None, single: bool = False) -> None:
        """`name`: the named function (None: "required"); `single` as for `ToolCallText`."""
        super().__init__()
        self._name = name
        self._reader = _JsonCalls(self.calls, 2, ("parameters",), single) \
            if name is None else None
        self._cursor = _JsonCursor()  # a named call's: where its object closes
        self._text = ""
        self._done = False  # a named call's object closed
        # A named call ends as OpenAI and vLLM end one: "stop".
        self.finish_reason = "stop" if name is not None else "tool_calls"

    @property
    def complete(self) -> int:
        if self._reader is not None:
            return len(self.calls) - self._reader.unfinished
        return int(self._done)

    def feed(self, text: str) -> str:
        if self._reader is not None:
            self._reader.feed(text)
            return ""
        if not text or self._done:
            return ""  # after a named call's object: blank text the grammar allowed
        at = len(self._text)
        self._text += text
        for i in range(at, len(self._text)):
            if self._cursor.step(self._text[i], i) in ("}", "]") and self._cursor.depth == 0:
                self._text = self._text[:i + 1]  # what follows is the grammar's blank
                self._done = True
                break
        if self.calls:
            self.calls[0].function.arguments = self._text
        else:
            assert self._name is not None
            self.calls.append(ToolCall(call_id(), FunctionCall(self._name, self._text)))
        return ""

    def end(self) -> str:
        if self._reader is None or self.calls:
            return ""
        return self._reader.text


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
