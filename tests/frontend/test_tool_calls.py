"""The `hermes` tool-call syntax read out of text that arrives in pieces: what is content, what
is a call, whatever the pieces' boundaries."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from services.frontend.tool_calls import ToolCallText

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
    whole = before + WEATHER + " then " + TIME + "\n\n" + WEATHER + "<tool_"
    points = sorted({min(c, len(whole)) for c in cuts})
    pieces = [whole[a:b] for a, b in zip([0, *points], [*points, len(whole)], strict=True)]
    assert read(pieces) == read([whole])
