"""Tool calling through the ASGI app under real uvicorn, driven by the real `openai` client, in
front of an in-process fake upstream whose scripted reply writes tool calls in the `hermes`
syntax (the built-in byte tokenizer: the reply's tokens are its bytes). Every body and chunk is
checked against the OpenAI spec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from services.frontend.app import FrontendApp
from services.frontend.metrics import FrontendMetrics
from services.frontend.tokenizer import ByteTokenizer
from tests.frontend.fake_upstream import FakeUpstream, Script
from tests.frontend.live_server import LiveServer
from tests.openapi_spec import RESPONSES_EVENTS, validate

REPLY = ('Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": '
         '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "now", '
         '"arguments": {}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


class Served:
    def __init__(self, parser: str | None) -> None:
        self.fake = FakeUpstream(models=["bytes"])
        self.server = LiveServer(FrontendApp(
            self.fake, ByteTokenizer(), None, 4096, FrontendMetrics(),
            tool_call_parser=parser)).start()
        self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="x",
                                    max_retries=0, timeout=10)

    def reply(self, text: str, chunk_size: int = 1) -> None:
        self.fake.script = Script(reply=list(text.encode()), stop_token=ByteTokenizer.EOS,
                                  chunk_size=chunk_size, delay_s=0.0005)

    def prompt(self) -> str:
        return bytes(t for t in self.fake.opened[-1].token_ids if t < 256).decode()


def _frontend(parser: str | None) -> Any:
    """A module-wide frontend reading calls with `parser`, as a fixture."""
    @pytest.fixture(scope="module")
    def served() -> Iterator[Served]:
        served = Served(parser)
        yield served
        served.server.stop()
    return served


hermes = _frontend("hermes")
llama = _frontend("llama3_json")
coder = _frontend("qwen3_coder")
pythonic = _frontend("pythonic")
glm = _frontend("glm45")
deepseek = _frontend("deepseek_v31")
kimi = _frontend("kimi_k2")
plain = _frontend(None)


def _calls(calls: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_the_models_calls_come_back_as_tool_calls(hermes: Served) -> None:
    hermes.reply(REPLY)
    done = hermes.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS)
    validate("CreateChatCompletionResponse", done.to_dict())
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look that up.\n"
    calls = choice.message.tool_calls or []
    assert _calls(calls) == [("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {})]
    assert len({c.id for c in calls}) == 2 and all(c.type == "function" for c in calls)
    # The template showed the model the tools (the built-in one writes them as JSON).
    assert '"name": "get_weather"' in hermes.prompt()
    assert done.usage is not None and done.usage.completion_tokens == len(REPLY.encode()) + 1


@pytest.mark.parametrize("chunk_size", [1, 7])
def test_streamed_calls_come_as_they_are_written_after_the_text_before_them(
        hermes: Served, chunk_size: int) -> None:
    """Each call opens (id, name) once its name and the start of its arguments are read, and
    its arguments follow in pieces as they are written, as vLLM streams hermes calls."""
    hermes.reply(REPLY, chunk_size)
    chunks = list(hermes.client.chat.completions.create(model="bytes", messages=ASK,
                                                        tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Let me look that up.\n"
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert len([d for d in deltas if d.index == 0]) > 2  # not the whole call at once
    streamed = _streamed_calls(chunks)
    assert [(name, json.loads(arguments)) for name, arguments in streamed] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # The SDK's own accumulation agrees, and so does the whole reply.
    with hermes.client.chat.completions.stream(model="bytes", messages=ASK,
                                               tools=TOOLS) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    done = hermes.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS)
    for calls in (final.choices[0].message.tool_calls, done.choices[0].message.tool_calls):
        assert [(c.function.name, c.function.arguments) for c in calls or ()] == streamed


def test_text_without_calls_and_calls_that_are_not_read(hermes: Served) -> None:
    hermes.reply("Sunny, 21 degrees.")
    done = hermes.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS)
    assert done.choices[0].message.content == "Sunny, 21 degrees."
    assert done.choices[0].message.tool_calls is None and done.choices[0].finish_reason == "stop"
    # A malformed call is left as the model wrote it.
    hermes.reply("<tool_call>{not json</tool_call>")
    done = hermes.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS)
    assert done.choices[0].message.content == "<tool_call>{not json</tool_call>"
    # tool_choice "none": the model is not shown the tools and its text is not read.
    hermes.reply(REPLY)
    done = hermes.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS,
                                                 tool_choice="none")
    assert done.choices[0].message.content == REPLY and "get_weather" not in hermes.prompt()
    # parallel_tool_calls: false keeps the first call.
    done = hermes.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS,
                                                 parallel_tool_calls=False)
    assert [c.function.name for c in done.choices[0].message.tool_calls or []] == ["get_weather"]


def test_a_conversation_carries_earlier_calls_and_their_results(hermes: Served) -> None:
    hermes.reply("It is sunny in Paris.")
    messages: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    done = hermes.client.chat.completions.create(model="bytes", messages=messages, tools=TOOLS)
    assert done.choices[0].message.content == "It is sunny in Paris."
    prompt = hermes.prompt()
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' \
        in prompt
    assert "<|tool|>\nsunny, 21 C" in prompt


def test_what_cannot_be_served_is_refused_by_name(hermes: Served, plain: Served) -> None:
    def refused(served: Served, **extra: Any) -> str:
        with pytest.raises(openai.BadRequestError) as info:
            served.client.chat.completions.create(model="bytes", messages=ASK, **extra)
        return info.value.body["param"]  # type: ignore[index,no-any-return]

    assert refused(plain, tools=TOOLS) == "tools"  # no --tool-call-parser
    plain.reply("fine")
    assert plain.client.chat.completions.create(
        model="bytes", messages=ASK, tools=TOOLS, tool_choice="none").choices[0].message.content \
        == "fine"
    assert refused(hermes, tool_choice="required") == "tool_choice"  # no tools to call
    assert refused(hermes, tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "later"}}) == "tool_choice.function.name"
    assert refused(hermes, tools=TOOLS, tool_choice="required",
                   response_format={"type": "json_object"}) == "tool_choice"
    assert refused(hermes, tools=TOOLS, n=2) == "n"
    assert refused(hermes, tools=TOOLS, logprobs=True) == "logprobs"
    assert refused(hermes, tools=[{"type": "function", "function": {"name": "a b"}}]) \
        == "tools[0].function.name"


def test_a_forced_call_is_constrained_to_its_schema_and_read_as_json(plain: Served) -> None:
    """`tool_choice` a named function or "required": the reply is constrained to JSON (the
    function's parameters; an array of calls) and read as calls without a parser, as vLLM
    does: a named call finishes "stop", required ones "tool_calls". A named call's arguments
    stream as they are written: its opening (id, name) once, then more arguments."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        plain.reply('{"city": "Paris"}', chunk_size=3)
        done = plain.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS,
                                                    tool_choice=named, stream=stream)
        sampling = plain.fake.opened[-1].sampling
        assert sampling.structured is not None
        assert json.loads(sampling.structured.json) == TOOLS[0]["function"]["parameters"]
        if stream:
            chunks = list(done)
            for chunk in chunks:
                validate("CreateChatCompletionStreamResponse",
                         chunk.model_dump(mode="json", exclude_unset=True))
            deltas = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or ()]
            assert len(deltas) > 2 and {d.index for d in deltas} == {0}
            assert deltas[0].id and deltas[0].function and deltas[0].function.name
            assert not any(d.id or d.type or (d.function and d.function.name)
                           for d in deltas[1:])
            calls = deltas[:1]
            calls[0].function.arguments = "".join(  # type: ignore[union-attr]
                d.function.arguments or "" for d in deltas if d.function)
            finish = chunks[-1].choices[0].finish_reason
            assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
        else:
            calls = done.choices[0].message.tool_calls or []
            finish = done.choices[0].finish_reason
            assert not done.choices[0].message.content
        assert [(c.function.name, c.function.arguments) for c in calls] == [  # type: ignore
            ("get_weather", '{"city": "Paris"}')] and finish == "stop"
    plain.reply('[{"name": "now", "parameters": {}}, '
                '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    done = plain.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS,
                                                tool_choice="required")
    schema = json.loads(plain.fake.opened[-1].sampling.structured.json)  # type: ignore[union-attr]
    assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2
    assert done.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in done.choices[0].message.tool_calls or []] == [
        ("now", {}), ("get_weather", {"city": "Oslo"})]
    plain.reply('[{"name": "now", "parameters": {}}, {"name": "now", "parameters": {}}]')
    one = plain.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS,
                                               tool_choice="required", parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls or []) == 1
    assert json.loads(plain.fake.opened[-1].sampling.structured.json)[  # type: ignore[union-attr]
        "maxItems"] == 1
    # Cut short by its budget: a named call keeps what was written of its arguments (as
    # OpenAI and vLLM do); calls that "required" left unreadable are the content.
    plain.reply('{"city": "Paris"}')
    cut = plain.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS,
                                               tool_choice=named, max_tokens=12)
    assert cut.choices[0].finish_reason == "length" and not cut.choices[0].message.content
    assert [(c.function.name, c.function.arguments)
            for c in cut.choices[0].message.tool_calls or ()] == [("get_weather",
                                                                    '{"city": "Pa')]
    plain.reply('[{"name": "now", "parameters": {}}]')
    cut = plain.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS,
                                               tool_choice="required", max_tokens=12)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == '[{"name": "n'
    assert not cut.choices[0].message.tool_calls
    # The Responses API names the function flat, and streams its arguments as they come.
    plain.reply('{"city": "Oslo"}', chunk_size=4)
    reply = plain.client.responses.create(
        model="bytes", input="Weather?", tools=RESPONSES_TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "name": "get_weather"})
    assert [(item.name, item.arguments) for item in reply.output
            if item.type == "function_call"] == [("get_weather", '{"city": "Oslo"}')]
    with plain.client.responses.stream(
            model="bytes", input="Weather?", tools=RESPONSES_TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "name": "get_weather"}) as stream:
        events = [event.model_dump(mode="json", exclude_unset=True) for event in stream]
        final = stream.get_final_response()
    for event in events:
        validate(RESPONSES_EVENTS[event["type"]], event)
    kinds = [e["type"] for e in events if "function_call" in e["type"]
             or e.get("output_index") == 1]
    pieces = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(pieces) > 2 and "".join(pieces) == '{"city": "Oslo"}'
    assert kinds == ["response.output_item.added",
                     *["response.function_call_arguments.delta"] * len(pieces),
                     "response.function_call_arguments.done", "response.output_item.done"]
    assert [(item.name, item.arguments, item.status) for item in final.output
            if item.type == "function_call"] == [("get_weather", '{"city": "Oslo"}',
                                                  "completed")]


REQUIRED = ('[{"name": "now", "parameters": {}}, '
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}]')


def _streamed_calls(chunks: list[Any]) -> list[tuple[str, str]]:
    """The calls a chat stream's deltas make, each checked to open once (id, name) and then
    only add arguments, in order."""
    calls: list[tuple[str, str]] = []
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse",
                 chunk.model_dump(mode="json", exclude_unset=True))
        for d in chunk.choices[0].delta.tool_calls or ():
            if d.id is not None:
                assert d.index == len(calls) and d.function and d.function.name
                calls.append((d.function.name, d.function.arguments or ""))
            else:
                assert d.index == len(calls) - 1 and d.function and not d.function.name
                calls[-1] = (calls[-1][0], calls[-1][1] + (d.function.arguments or ""))
    return calls


def test_required_calls_stream_as_they_are_written(plain: Served) -> None:
    """`tool_choice: "required"`: each call of the array opens as soon as its name is read
    and its arguments (its parameters' text) follow as they are written, as vLLM streams
    them; cut short by its budget, the calls written so far stay, the last one unfinished."""
    plain.reply(REQUIRED, chunk_size=3)
    chunks = list(plain.client.chat.completions.create(
        model="bytes", messages=ASK, tools=TOOLS, tool_choice="required", stream=True))
    pieces = [d for chunk in chunks for d in chunk.choices[0].delta.tool_calls or ()]
    assert len([d for d in pieces if d.index == 1]) > 2  # not one piece at the end
    first = next(i for i, chunk in enumerate(chunks) if chunk.choices[0].delta.tool_calls)
    assert first < len(chunks) // 2
    assert _streamed_calls(chunks) == [("now", "{}"), ("get_weather", '{"city": "Oslo"}')]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    cut_at = REQUIRED.index("Oslo") + 2
    for stream in (False, True):
        plain.reply(REQUIRED, chunk_size=3)
        done = plain.client.chat.completions.create(
            model="bytes", messages=ASK, tools=TOOLS, tool_choice="required",
            max_tokens=cut_at, stream=stream)
        if stream:
            chunks = list(done)
            calls, finish = _streamed_calls(chunks), chunks[-1].choices[0].finish_reason
        else:
            calls = [(c.function.name, c.function.arguments)  # type: ignore[union-attr]
                     for c in done.choices[0].message.tool_calls or ()]
            finish = done.choices[0].finish_reason
            assert not done.choices[0].message.content
        assert calls == [("now", "{}"), ("get_weather", '{"city": "Os')]
        assert finish == "length"
    # The Responses API: the call cut short is an incomplete item, ended with the response.
    plain.reply(REQUIRED, chunk_size=3)
    with plain.client.responses.stream(
            model="bytes", input="Weather?", tools=RESPONSES_TOOLS,  # type: ignore[arg-type]
            tool_choice="required", max_output_tokens=cut_at) as events_stream:
        events = [event.model_dump(mode="json", exclude_unset=True) for event in events_stream]
    for event in events:
        validate(RESPONSES_EVENTS[event["type"]], event)
    ended = [(e["output_index"], e["item"]["status"]) for e in events
             if e["type"] == "response.output_item.done"]
    assert ended == [(1, "completed"), (2, "incomplete"), (0, "incomplete")]
    assert events[-1]["type"] == "response.incomplete"
    plain.reply(REQUIRED)
    reply = plain.client.responses.create(
        model="bytes", input="Weather?", tools=RESPONSES_TOOLS,  # type: ignore[arg-type]
        tool_choice="required", max_output_tokens=cut_at)
    for response in (events[-1]["response"], reply.model_dump(mode="json", exclude_unset=True)):
        validate("Response", response)
        assert response["status"] == "incomplete"
        assert [(item["name"], item["arguments"], item["status"]) for item in response["output"]
                if item["type"] == "function_call"] == [
            ("now", "{}", "completed"), ("get_weather", '{"city": "Os', "incomplete")]


RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "strict": False},
                   {"type": "function", "name": "now", "parameters": {"type": "object"},
                    "strict": False}]


def test_the_responses_api_returns_calls_as_function_call_items(hermes: Served) -> None:
    hermes.reply(REPLY)
    done = hermes.client.responses.create(model="bytes", input="Weather in Paris?",
                                          tools=RESPONSES_TOOLS)  # type: ignore[arg-type]
    validate("Response", done.model_dump(mode="json", exclude_unset=True))
    assert done.output_text == "Let me look that up.\n"
    calls = [item for item in done.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {})]
    assert all(c.call_id.startswith("call_") and c.status == "completed" for c in calls)
    assert [t.name for t in done.tools] == ["get_weather", "now"]  # type: ignore[union-attr]

    with hermes.client.responses.stream(model="bytes", input="Weather in Paris?",
                                        tools=RESPONSES_TOOLS) as stream:  # type: ignore[arg-type]
        events = [event.model_dump(mode="json", exclude_unset=True) for event in stream]
        final = stream.get_final_response()
    for event in events:
        validate(RESPONSES_EVENTS[event["type"]], event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    streamed = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == [0, 1, 2]

    # The next turn sends the calls and their outputs back as input items.
    hermes.reply("Sunny.")
    turn = hermes.client.responses.create(model="bytes", tools=RESPONSES_TOOLS,  # type: ignore
                                          input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_9", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_9", "output": "sunny, 21 C"}])
    assert turn.output_text == "Sunny."
    prompt = hermes.prompt()
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' \
        in prompt and "<|tool|>\nsunny, 21 C" in prompt
    # The earlier output as the client got it (its message, then its calls): one assistant
    # turn, as its chat completion would be, the calls after the message's text.
    hermes.reply("Sunny.")
    hermes.client.responses.create(model="bytes", tools=RESPONSES_TOOLS, input=[  # type: ignore
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump(mode="json", exclude_none=True) for item in done.output],
        *[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
          for call in calls]])
    prompt = hermes.prompt()
    assert prompt.count("<|assistant|>") == 2  # the earlier turn's, and the reply's
    assert '<|assistant|>\nLet me look that up.\n<tool_call>{"name": "get_weather", ' in prompt
    assert prompt.count("<|tool|>\nsunny") == 2


def test_llama3_json_calls_come_back_as_tool_calls(llama: Served) -> None:
    """`--tool-call-parser llama3_json`: a reply that is a JSON call object is a call (streamed
    as it is written); a reply in words is content, streamed as it comes."""
    reply = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    llama.reply(reply, chunk_size=4)
    done = llama.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS)
    validate("CreateChatCompletionResponse", done.to_dict())
    assert done.choices[0].finish_reason == "tool_calls" and not done.choices[0].message.content
    calls = done.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}')]
    chunks = list(llama.client.chat.completions.create(model="bytes", messages=ASK,
                                                       tools=TOOLS, stream=True))
    assert _streamed_calls(chunks) == [("get_weather", '{"city": "Paris"}')]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.tool_calls]) > 2
    llama.reply("It is sunny in Paris.", chunk_size=4)
    chunks = list(llama.client.chat.completions.create(model="bytes", messages=ASK,
                                                       tools=TOOLS, stream=True))
    assert _streamed_calls(chunks) == [] and chunks[-1].choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "It is sunny in Paris." and len(pieces) > 2


def test_pythonic_calls_come_back_as_tool_calls(pythonic: Served) -> None:
    """`--tool-call-parser pythonic`: a reply that is a Python list of calls comes back as
    calls (each streamed once its `)` is read, its keywords as JSON); a reply in words is
    content, streamed as it comes."""
    pythonic.reply('[get_weather(city="Paris"), now()]', chunk_size=4)
    done = pythonic.client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS)
    validate("CreateChatCompletionResponse", done.to_dict())
    assert done.choices[0].finish_reason == "tool_calls" and not done.choices[0].message.content
    expected = [("get_weather", '{"city": "Paris"}'), ("now", "{}")]
    assert [(c.function.name, c.function.arguments)
            for c in done.choices[0].message.tool_calls or ()] == expected
    chunks = list(pythonic.client.chat.completions.create(model="bytes", messages=ASK,
                                                          tools=TOOLS, stream=True))
    assert _streamed_calls(chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.tool_calls]) == 2
    pythonic.reply("[Paris] is sunny, (says the forecast).", chunk_size=4)
    chunks = list(pythonic.client.chat.completions.create(model="bytes", messages=ASK,
                                                          tools=TOOLS, stream=True))
    assert _streamed_calls(chunks) == [] and chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices
                   and c.choices[0].delta.content) == "[Paris] is sunny, (says the forecast)."


KEYED_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.mark.parametrize(("frontend", "reply"), [
    ("coder", "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
              "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"),
    ("glm", "Checking.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
            "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"),
    ("deepseek",
     "Checking.\n<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin"
     "\uff5c>get_weather<\uff5ctool\u2581sep\uff5c>{\"city\": \"Paris\", \"days\": 3}"
     "<\uff5ctool\u2581call\u2581end\uff5c><\uff5ctool\u2581calls\u2581end\uff5c>"),
    ("kimi", "Checking.\n<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
             '<|tool_call_argument_begin|>{"city": "Paris", "days": 3}<|tool_call_end|>'
             "<|tool_calls_section_end|>")])
def test_calls_in_tags_come_back_as_tool_calls(frontend: str, reply: str,
                                               request: pytest.FixtureRequest) -> None:
    """`--tool-call-parser qwen3_coder` (`<function=...>` with a `<parameter=...>` tag per
    value) and `glm45` (the tool's name, then `<arg_key>`/`<arg_value>` pairs), their values
    typed by the tool's schema, and `deepseek_v31` and `kimi_k2` (each call's name and JSON
    arguments between tags of their own): calls streamed in pieces after the text before
    them."""
    served: Served = request.getfixturevalue(frontend)
    served.reply(reply, chunk_size=5)
    tools: Any = KEYED_TOOLS
    done = served.client.chat.completions.create(model="bytes", messages=ASK, tools=tools)
    validate("CreateChatCompletionResponse", done.to_dict())
    assert done.choices[0].message.content == "Checking.\n"
    expected = [("get_weather", '{"city": "Paris", "days": 3}')]
    assert [(c.function.name, c.function.arguments)
            for c in done.choices[0].message.tool_calls or ()] == expected
    assert done.choices[0].finish_reason == "tool_calls"
    chunks = list(served.client.chat.completions.create(model="bytes", messages=ASK,
                                                        tools=tools, stream=True))
    assert _streamed_calls(chunks) == expected
    assert len([c for c in chunks if c.choices and c.choices[0].delta.tool_calls]) > 1
