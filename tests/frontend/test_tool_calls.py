"""Tool calls read out of text that arrives in pieces, whatever the pieces' boundaries: the
`hermes` syntax (what is content, what is a call), and a reply forced to be calls (`tool_choice`
a named function or "required"), streamed as written."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from services.frontend.tool_calls import (
    ForcedCallText,
    JsonCallText,
    PythonCallText,
    ToolCallText,
    call_reader,
    parameter_types,
)

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>{"name": "now", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>'


def read(pieces: list[str], single: bool = False) -> tuple[str, list[tuple[str, object]]]:
    text = ToolCallText(single)
    content = "".join(text.feed(piece) for piece in pieces) + text.end()
    return content, [(call.function.name, json.loads(call.function.arguments))
                     for call in text.calls]


def test_calls_come_out_of_the_text_and_the_rest_is_content() -> None:
    assert read(["Let me look.\n" + WEATHER]) == (
        "Let me look.\n", [("get_weather", {"city": "Paris"})])
    # Arguments written as JSON text are read as the object they spell; newlines between and
    # after calls are not content.
    assert read([WEATHER + "\n" + TIME + "\n"]) == (
        "", [("get_weather", {"city": "Paris"}), ("now", {"tz": "UTC"})])
    assert read(["no calls < here <tool at all"]) == ("no calls < here <tool at all", [])
    # parallel_tool_calls: false keeps the first.
    assert read([WEATHER + TIME], single=True) == ("", [("get_weather", {"city": "Paris"})])


def test_what_only_looks_like_a_call_stays_text() -> None:
    for body in ("{oops", '["a list"]', '{"arguments": {}}', '{"name": "f", "arguments": 3}'):
        text = f"<tool_call>{body}</tool_call>"
        assert read([text]) == (text, [])
    # Cut off before its closing tag: a call if its object is whole, else the text as written.
    assert read([WEATHER.removesuffix("</tool_call>")])[1] == [("get_weather", {"city": "Paris"})]
    assert read(['<tool_call>{"name": "f", "argu']) == ('<tool_call>{"name": "f", "argu', [])
    assert read(["ends with <tool_"]) == ("ends with <tool_", [])


def test_a_tag_split_between_pieces_is_held_back_not_shown() -> None:
    text = ToolCallText()
    assert text.feed("Sure.<tool") == "Sure."
    assert text.feed("_call>{\"name\": \"f\", ") == ""
    assert text.take() == []
    assert text.feed('"arguments": {}}</tool_call>') == ""
    taken = text.take()
    assert [(c.index, c.function.name, c.function.arguments) for c in taken] == [(0, "f", "{}")]
    assert taken[0].id.startswith("call_") and text.take() == []
    assert text.feed(TIME) == "" and [c.index for c in text.take()] == [1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=12),
       st.sampled_from(["", "\n", "Checking.\n", "a < b but <tool_call"]))
def test_any_cut_into_pieces_reads_as_the_whole(cuts: list[int], before: str) -> None:
    """Whatever the pieces: the same content and calls, each call handed over as it is
    written (an object's arguments as the model wrote them; arguments written as a JSON
    string once read whole)."""
    whole = before + WEATHER + " then " + TIME + "\n\n" + WEATHER + "<tool_"
    points = sorted({min(c, len(whole)) for c in cuts})
    pieces = [whole[a:b] for a, b in zip([0, *points], [*points, len(whole)], strict=True)]
    assert read(pieces) == read([whole])
    reader = ToolCallText()
    calls, content = stream(reader, pieces)
    assert (content, calls) == (read([whole])[0], [
        ("get_weather", '{"city": "Paris"}'), ("now", '{"tz": "UTC"}'),
        ("get_weather", '{"city": "Paris"}')])
    assert reader.complete == 3


def test_a_call_cut_short_keeps_what_it_wrote() -> None:
    """Text that ends inside a call: the call as far as its arguments were written (not
    complete); before its arguments began, the text as written."""
    text = "Sure." + WEATHER
    cut = ToolCallText()
    assert stream(cut, [text[:text.index("Paris") + 2]]) == ([("get_weather", '{"city": "Pa')],
                                                              "Sure.")
    assert cut.complete == 0
    early = text[:text.index('"arguments"')]
    assert stream(ToolCallText(), [early]) == ([], early)
    whole = ToolCallText()  # written whole, only its closing tag missing
    assert stream(whole, [text.removesuffix("</tool_call>")])[0] == [
        ("get_weather", '{"city": "Paris"}')] and whole.complete == 1


PARAMS = ('{"q": "a \\"}\\" ]{", "nested": {"list": [1, {"x": "}"}], "e": {}}}',
          '{}', ' { "city" : "Oslo" } ')
REQUIRED = (f'[ {{"name": "search", "parameters": {PARAMS[0]}}},\n'
            f'{{"note": {{"a": "{{"}}, "parameters": {PARAMS[1]}, "name": "now"}}, '
            f'{{ "name" : "get_weather" , "parameters" :{PARAMS[2]}}} ]')


def stream(reader: ToolCallText | JsonCallText | PythonCallText | ForcedCallText,
           pieces: list[str]) -> tuple[list[tuple[str, str]], str]:
    """The calls as a client rebuilds them from what `take` hands over piece by piece (each
    opens once, in order, then only grows), and the content left at the end."""
    calls: list[tuple[str, str]] = []
    content = ""
    for i, piece in enumerate([*pieces, None]):
        content += reader.feed(piece) if piece is not None else reader.end()
        for delta in reader.take():
            if delta.id is not None:
                assert delta.index == len(calls) and delta.function.name, (i, delta)
                calls.append((delta.function.name, delta.function.arguments))
            else:
                assert delta.index == len(calls) - 1 and delta.function.name is None
                calls[-1] = (calls[-1][0], calls[-1][1] + delta.function.arguments)
    assert calls == [(c.function.name, c.function.arguments) for c in reader.calls]
    return calls, content


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(REQUIRED)), max_size=20))
def test_required_calls_stream_whatever_the_pieces(cuts: list[int]) -> None:
    """Each element of the array is a call with its parameters' text as written (strings
    holding braces and quotes, nested objects, "parameters" before "name", without the blank
    around it; an object under another key is not one), handed over as
    it is written; `complete` counts the elements read to their end."""
    points = sorted(set(cuts))
    pieces = [REQUIRED[a:b] for a, b in zip([0, *points], [*points, len(REQUIRED)], strict=True)]
    reader = ForcedCallText(None)
    assert stream(reader, pieces) == ([("search", PARAMS[0]), ("now", PARAMS[1]),
                                       ("get_weather", PARAMS[2].strip())], "")
    assert reader.complete == 3 and reader.finish_reason == "tool_calls"
    for parameters in PARAMS:
        json.loads(parameters)
    single = ForcedCallText(None, single=True)
    assert stream(single, pieces)[0] == [("search", PARAMS[0])] and single.complete == 1


def test_a_forced_reply_cut_short_keeps_what_it_wrote() -> None:
    """At every length: the calls whose name and parameters began, the last one's arguments
    as far as written; `complete` only those read to their element's end; a "required"
    reply with no call begun is the content."""
    whole = [("search", PARAMS[0]), ("now", PARAMS[1]), ("get_weather", PARAMS[2].strip())]
    ends = (REQUIRED.index(PARAMS[0]) + len(PARAMS[0]) + 1,  # where each element closes
            REQUIRED.index('"now"}') + len('"now"}'), REQUIRED.rindex("}") + 1)
    seen = set()
    for n in range(len(REQUIRED) + 1):
        reader = ForcedCallText(None)
        calls, content = stream(reader, [REQUIRED[:n]])
        assert content == ("" if calls else REQUIRED[:n])
        assert [name for name, _ in calls] == [name for name, _ in whole[:len(calls)]]
        if calls:
            assert calls[:-1] == whole[:len(calls) - 1]
            assert whole[len(calls) - 1][1].startswith(calls[-1][1])
        assert reader.complete == sum(n >= end for end in ends), REQUIRED[:n]
        seen.add(len(calls))
    assert seen == {0, 1, 2, 3}
    # A named function's reply is its arguments: complete once its object closes, and the
    # blank the grammar allows after it is not part of them.
    named = ForcedCallText("f")
    assert stream(named, ['{"a": "}', '"} \n']) == ([("f", '{"a": "}"}')], "")
    assert named.complete == 1 and named.finish_reason == "stop"
    assert named.feed("\n \n") == "" and named.calls[0].function.arguments == '{"a": "}"}'
    cut = ForcedCallText("f")
    assert stream(cut, ['{"a": [{', '"b": 1}']) == ([("f", '{"a": [{"b": 1}')], "")
    assert cut.complete == 0


LLAMA = ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
         '{"name": "now", "arguments": {}}')


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(LLAMA) + 20), max_size=10),
       st.sampled_from(["", " \n", "<|python_tag|>"]))
def test_llama3_json_calls_stream_whatever_the_pieces(cuts: list[int], before: str) -> None:
    """A reply that starts with a JSON object (maybe after blank or `<|python_tag|>`) is
    calls, one per object (split by `;`), each handed over as written."""
    whole = before + LLAMA
    points = sorted({min(c, len(whole)) for c in cuts})
    pieces = [whole[a:b] for a, b in zip([0, *points], [*points, len(whole)], strict=True)]
    reader = JsonCallText()
    assert stream(reader, pieces) == ([("get_weather", '{"city": "Paris"}'), ("now", "{}")], "")
    assert reader.complete == 2 and reader.finish_reason == "tool_calls"
    single = JsonCallText(single=True)
    assert stream(single, pieces)[0] == [("get_weather", '{"city": "Paris"}')]


def test_llama3_json_text_that_is_no_call_is_content() -> None:
    # Shown as it comes once the reply's start says it is text.
    reader = JsonCallText()
    assert reader.feed("  <") == "" and reader.feed("b>Sunny") == "  <b>Sunny"
    assert reader.feed(", 21 C.") == ", 21 C." and reader.end() == "" and not reader.calls
    # JSON that holds no call: the content, once complete.
    assert stream(JsonCallText(), ['{"a": ', '1}']) == ([], '{"a": 1}')
    assert stream(JsonCallText(), ["<|python"]) == ([], "<|python")
    # Cut short: the call as far as written, not complete.
    cut = JsonCallText()
    assert stream(cut, ['{"name": "f", "parameters": {"x": "ab']) == ([("f", '{"x": "ab')], "")
    assert cut.complete == 0


CODER_TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"},
        "score": {"type": ["number", "null"]}, "exact": {"type": "boolean"},
        "filters": {"type": "object"}}}}}]
CODER = ("Let me search.\n<tool_call>\n<function=search>\n<parameter=query>\nred < blue\n"
         "</parameter>\n<parameter=limit>\n5\n</parameter>\n<parameter=score>\n0.5\n"
         "</parameter>\n<parameter=exact>\nTrue\n</parameter>\n<parameter=filters>\n"
         '{"lang": "en"}\n</parameter>\n<parameter=note>\n7\n</parameter>\n</function>\n'
         "</tool_call>\n<tool_call>\n<function=now>\n</function>\n</tool_call>")
CODER_ARGS = ('{"query": "red < blue", "limit": 5, "score": 0.5, "exact": true, '
              '"filters": {"lang": "en"}, "note": "7"}')


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(CODER)), max_size=12))
def test_qwen3_coder_calls_stream_a_parameter_at_a_time(cuts: list[int]) -> None:
    """`qwen3_coder`: each `<function=...>` a call, opened once its name is read; each value
    typed by the function's schema (a parameter it does not name stays text) and added to
    the arguments once written; whatever the pieces."""
    points = sorted(set(cuts))
    pieces = [CODER[a:b] for a, b in zip([0, *points], [*points, len(CODER)], strict=True)]
    reader = call_reader("qwen3_coder", CODER_TOOLS)
    assert stream(reader, pieces) == ([("search", CODER_ARGS), ("now", "{}")],
                                      "Let me search.\n")
    assert json.loads(CODER_ARGS) and reader.complete == 2
    single = call_reader("qwen3_coder", CODER_TOOLS, single=True)
    assert stream(single, pieces) == ([("search", CODER_ARGS)], "Let me search.\n")


def test_a_qwen3_coder_call_cut_short_and_a_tag_that_is_no_call() -> None:
    cut = call_reader("qwen3_coder", CODER_TOOLS)
    upto = CODER.index("<parameter=score>")
    assert stream(cut, [CODER[:upto + 20]]) == (
        [("search", '{"query": "red < blue", "limit": 5')], "Let me search.\n")
    assert cut.complete == 0
    # A value that never says it ended ends where the next parameter or the function does.
    loose = call_reader("qwen3_coder", CODER_TOOLS)
    assert stream(loose, ["<tool_call><function=search><parameter=limit>3<parameter=query>x"
                          "</function></tool_call>"])[0] == [
        ("search", '{"limit": 3, "query": "x"}')]
    text = "<tool_call>no function here</tool_call>"
    assert stream(call_reader("qwen3_coder", CODER_TOOLS), [text]) == ([], text)
    # What no JSON value spells stays text.
    odd = call_reader("qwen3_coder", [{"type": "function", "function": {"name": "f", "parameters": {
        "properties": {"x": {"type": "number"}, "y": {"type": "object"}}}}}])
    assert stream(odd, ["<tool_call><function=f><parameter=x>nan</parameter><parameter=y>"
                        '{"a": NaN}</parameter></function></tool_call>'])[0] == [
        ("f", '{"x": "nan", "y": "{\\"a\\": NaN}"}')]
    # Schemas it cannot read type nothing (values stay text), and break nothing.
    assert parameter_types([
        {"type": "function", "function": {"name": "f", "parameters": {"properties": [1]}}},
        {"type": "function", "function": {"name": "g", "parameters": {"properties": {
            "a": {"type": ["null", "integer"]}, "b": 3}}}}]) == {"f": {}, "g": {"a": "integer"}}


PYTHONIC = ("<|python_start|>[get_weather(city='Paris', days=3, opts={\"units\": [\"C\", None], "
            "'exact': True}), now(), say(text='it\\'s [a] (b), \"c\"', doc=\"\"\"x \" )\n]\"\"\"),]"
            "<|python_end|>\n")
PYTHONIC_CALLS = [
    ("get_weather", '{"city": "Paris", "days": 3, "opts": {"units": ["C", null], "exact": true}}'),
    ("now", "{}"), ("say", '{"text": "it\'s [a] (b), \\"c\\"", "doc": "x \\" )\\n]"}')]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(PYTHONIC)), max_size=14))
def test_pythonic_calls_are_read_whatever_the_pieces(cuts: list[int]) -> None:
    """`pythonic`: a reply that is a Python list of calls gives each call once its `)` is read,
    its keywords as JSON; brackets, commas and quotes inside strings (escaped, triple-quoted)
    are text; Llama 4's tags around the list are no one's."""
    points = sorted(set(cuts))
    pieces = [PYTHONIC[a:b] for a, b in zip([0, *points], [*points, len(PYTHONIC)], strict=True)]
    reader = PythonCallText()
    assert stream(reader, pieces) == (PYTHONIC_CALLS, "")
    assert reader.complete == 3
    assert stream(PythonCallText(single=True), pieces) == (PYTHONIC_CALLS[:1], "")
    # What is no call is content, from where it starts: all of it when no call came first.
    text = PYTHONIC.replace("now()", "now(1)")
    assert stream(PythonCallText(), [text[a:b] for a, b in zip(
        [0, *points], [*points, len(text)], strict=True)]) == (
        PYTHONIC_CALLS[:1], text[text.index(" now(1)"):])


def test_what_is_no_pythonic_call_list_is_content() -> None:
    for text in ("It is sunny.", "[a link](http://x) says so", "[1, 2, 3]", "[]",
                 "[f(x)]", "[f(**kw)]", "[f(a=g())]", "[f(a=1e999)]", "[obj.f(a=1)]",
                 "<|python_start|> no list", "  [f(a=1"):
        assert stream(PythonCallText(), [text]) == ([], text), text
    # Shown as soon as it cannot be a call, not held to the end.
    early = PythonCallText()
    assert early.feed("  [Note: a long") == "  [Note: a long" and early.feed(" aside") == " aside"
    assert PythonCallText().feed('["a", ') == '["a", '
    # Text after the list, or cut short in a call: the calls read stay.
    assert stream(PythonCallText(), ["[f(a=1)] and then"]) == ([("f", '{"a": 1}')], " and then")
    assert stream(PythonCallText(), ["[f(a=1), g(b="]) == ([("f", '{"a": 1}')], "")


GLM = ("Checking.\n<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>42 < x</arg_value>\n"
       "<arg_key>limit</arg_key>\n<arg_value>5</arg_value>\n<arg_key>filters</arg_key>\n"
       '<arg_value>{"lang": "en"}</arg_value>\n<arg_key>note</arg_key>\n<arg_value>[1, 2]'
       "</arg_value>\n<arg_key>text</arg_key>\n<arg_value>hi</arg_value>\n</tool_call>\n"
       "<tool_call>now</tool_call>")
GLM_ARGS = ('{"query": "42 < x", "limit": 5, "filters": {"lang": "en"}, "note": [1, 2], '
            '"text": "hi"}')
GLM_TOOLS = [*CODER_TOOLS, {"type": "function", "function": {"name": "now"}}]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(GLM)), max_size=12))
def test_glm45_calls_stream_a_pair_at_a_time(cuts: list[int]) -> None:
    """`glm45`: each `<tool_call>` a call, opened once its name (one of the tools) is read;
    each key and value added once written, a string parameter as written and any other as
    the JSON it spells (a value that spells none stays text); whatever the pieces."""
    points = sorted(set(cuts))
    pieces = [GLM[a:b] for a, b in zip([0, *points], [*points, len(GLM)], strict=True)]
    reader = call_reader("glm45", GLM_TOOLS)
    assert stream(reader, pieces) == ([("search", GLM_ARGS), ("now", "{}")], "Checking.\n")
    assert reader.complete == 2
    single = call_reader("glm47", GLM_TOOLS, single=True)
    assert stream(single, pieces) == ([("search", GLM_ARGS)], "Checking.\n")


def test_a_glm45_call_cut_short_and_a_tag_that_is_no_call() -> None:
    cut = call_reader("glm45", GLM_TOOLS)
    assert stream(cut, [GLM[:GLM.index("<arg_key>filters")]]) == (
        [("search", '{"query": "42 < x", "limit": 5')], "Checking.\n")
    assert cut.complete == 0
    # GLM-4.7 writes the first key right after the name; a value left open ends where the
    # next key or the tag does.
    assert stream(call_reader("glm47", GLM_TOOLS), [
        "<tool_call>search<arg_key>limit</arg_key><arg_value>3<arg_key>query</arg_key>"
        "<arg_value>x</tool_call>"]) == ([("search", '{"limit": 3, "query": "x"}')], "")
    for text in ("<tool_call>unknown\n<arg_key>a</arg_key></tool_call>",
                 "<tool_call>tell me</tool_call>"):
        assert stream(call_reader("glm45", GLM_TOOLS), [text]) == ([], text)


def _deepseek(words: str) -> str:
    return "<\uff5c" + words.replace(" ", "\u2581") + "\uff5c>"


DEEPSEEK = ("Let me check. " + _deepseek("tool calls begin") + _deepseek("tool call begin")
            + "get_weather" + _deepseek("tool sep") + '{"city": "Paris", "note": "a < b"}'
            + _deepseek("tool call end") + _deepseek("tool call begin") + "now"
            + _deepseek("tool sep") + "{}" + _deepseek("tool call end")
            + _deepseek("tool calls end"))
DEEPSEEK_CALLS = [("get_weather", '{"city": "Paris", "note": "a < b"}'), ("now", "{}")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(DEEPSEEK)), max_size=12))
def test_deepseek_v31_calls_stream_as_written(cuts: list[int]) -> None:
    """`deepseek_v31`: between its calls tags, each call's name, then its JSON arguments
    handed over as they are written; the text before the calls is content."""
    points = sorted(set(cuts))
    pieces = [DEEPSEEK[a:b] for a, b in zip([0, *points], [*points, len(DEEPSEEK)],
                                            strict=True)]
    reader = call_reader("deepseek_v31", [])
    assert stream(reader, pieces) == (DEEPSEEK_CALLS, "Let me check. ")
    assert reader.complete == 2
    single = call_reader("deepseek_v31", [], single=True)
    assert stream(single, pieces) == (DEEPSEEK_CALLS[:1], "Let me check. ")


def test_a_deepseek_v31_call_cut_short_and_calls_tags_around_no_call() -> None:
    cut = call_reader("deepseek_v31", [])
    upto = DEEPSEEK.index("Paris") + 3
    assert stream(cut, [DEEPSEEK[:upto]]) == ([("get_weather", '{"city": "Par')],
                                              "Let me check. ")
    assert cut.complete == 0
    # The calls tag closing ends a call left open.
    unended = call_reader("deepseek_v31", [])
    assert stream(unended, [_deepseek("tool calls begin") + _deepseek("tool call begin") + "now"
                            + _deepseek("tool sep") + "{}" + _deepseek("tool calls end")]) == (
        [("now", "{}")], "")
    assert unended.complete == 1
    text = _deepseek("tool calls begin") + "nothing here" + _deepseek("tool calls end")
    assert stream(call_reader("deepseek_v31", []), [text]) == ([], text)


KIMI = ("Let me check.<|tool_calls_section_begin|>\n<|tool_call_begin|>functions.get_weather:0\n"
        '<|tool_call_argument_begin|>{"city": "Tokyo"}<|tool_call_end|>\n'
        "<|tool_call_begin|>functions.now:1<|tool_call_argument_begin|>{}<|tool_call_end|>\n"
        "<|tool_calls_section_end|>")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(KIMI)), max_size=12))
def test_kimi_k2_calls_keep_their_ids_whatever_the_pieces(cuts: list[int]) -> None:
    """`kimi_k2`: in its calls section, each call's header is its id (`functions.NAME:N`, as
    Kimi's chat template wants it back) and names it; its JSON arguments stream as written."""
    points = sorted(set(cuts))
    pieces = [KIMI[a:b] for a, b in zip([0, *points], [*points, len(KIMI)], strict=True)]
    reader = call_reader("kimi_k2", [])
    assert stream(reader, pieces) == (
        [("get_weather", '{"city": "Tokyo"}'), ("now", "{}")], "Let me check.")
    assert [call.id for call in reader.calls] == ["functions.get_weather:0", "functions.now:1"]
    odd = call_reader("kimi_k2", [])
    stream(odd, ["<|tool_calls_section_begin|><|tool_call_begin|>lookup"
                 "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>"])
    assert odd.calls[0].function.name == "lookup" and odd.calls[0].id.startswith("call_")
