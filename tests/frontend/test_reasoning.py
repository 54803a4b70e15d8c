"""Reasoning split from the answer (`--reasoning-parser`): the splitter over text in pieces,
and chat and the Responses API under real uvicorn, driven by the real `openai` client, in front
of an in-process fake upstream whose scripted reply thinks first (the built-in byte tokenizer:
the reply's tokens are its bytes). Bodies and events are checked against the OpenAI spec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.frontend import protocol, responses_api
from services.frontend.app import FrontendApp
from services.frontend.metrics import FrontendMetrics
from services.frontend.reasoning import ReasoningText, thinks
from services.frontend.tokenizer import ByteTokenizer
from tests.frontend.fake_upstream import FakeUpstream, Script
from tests.frontend.live_server import LiveServer
from tests.openapi_spec import RESPONSES_EVENTS, validate

THOUGHT = "The user wants 2 < 3 <thinking> checked.\nYes."
ANSWER = "2 is less than 3."
REPLY = f"<think>{THOUGHT}</think>\n\n{ANSWER}"
ASK = [{"role": "user", "content": "Is 2 < 3?"}]


def split(parser: str, pieces: list[str], thinking: bool = True,
          keep: bool = True) -> tuple[str | None, str]:
    reader = ReasoningText(parser, thinking, keep)
    streamed: list[str] = []
    answer = ""
    for piece in pieces:
        answer += reader.feed(piece)
        streamed.append(reader.take())
    reader.end()
    streamed.append(reader.take())
    assert ("".join(streamed) or None) == reader.whole  # handed over as it was read
    return reader.whole, answer


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(REPLY)), max_size=12),
       st.sampled_from(["deepseek_r1", "deepseek_v3", "glm45", "kimi_k2", "qwen3"]))
def test_any_cut_into_pieces_splits_as_the_whole(cuts: list[int], parser: str) -> None:
    """Whatever the pieces: the thinking up to `</think>` is the reasoning (its `<think>` tag
    dropped, a tag-like text inside it kept), the rest the answer."""
    points = sorted(set(cuts))
    pieces = [REPLY[a:b] for a, b in zip([0, *points], [*points, len(REPLY)], strict=True)]
    assert split(parser, pieces) == (THOUGHT, "\n\n" + ANSWER)


def test_how_each_parser_reads_a_reply() -> None:
    # The template opened the thinking in the prompt: the reply starts inside it.
    assert split("deepseek_r1", [f"{THOUGHT}</think>{ANSWER}"]) == (THOUGHT, ANSWER)
    # Thinking never closed (cut short, say): all reasoning.
    assert split("qwen3", [f"<think>{THOUGHT}"]) == (THOUGHT, "")
    assert split("deepseek_r1", ["<thi"]) == ("<thi", "")  # never a tag: the text
    # qwen3: a tool call ends the thinking and is the answer's; turned off, all is answer.
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert split("qwen3", [THOUGHT + call]) == (THOUGHT, call)
    assert split("deepseek_r1", [THOUGHT + call]) == (THOUGHT + call, "")
    assert not thinks("qwen3", {"enable_thinking": False}) and thinks("qwen3", None)
    assert thinks("deepseek_r1", {"enable_thinking": False})
    # glm45 (and glm47) as qwen3, off by either name.
    assert split("glm45", [THOUGHT + call]) == (THOUGHT, call)
    assert thinks("glm45", None) and thinks("glm47", {"thinking": False, "enable_thinking": True})
    assert not thinks("glm45", {"thinking": False}) \
        and not thinks("glm47", {"enable_thinking": False})
    # kimi_k2: its calls section ends the thinking.
    calls = "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
    assert split("kimi_k2", [THOUGHT + calls]) == (THOUGHT, calls)
    assert thinks("kimi_k2", None) and not thinks("kimi_k2", {"thinking": False})
    # deepseek_v3 thinks only when the request asks for it.
    assert not thinks("deepseek_v3", None) and not thinks("deepseek_v3", {"thinking": False})
    assert thinks("deepseek_v3", {"thinking": True}) and thinks("deepseek_v3",
                                                                {"enable_thinking": True})
    assert split("deepseek_v3", [f"{THOUGHT}</think>{ANSWER}"]) == (THOUGHT, ANSWER)
    assert split("qwen3", [REPLY], thinking=False) == (None, REPLY)
    # include_reasoning false: the same answer, the reasoning not kept.
    assert split("qwen3", [REPLY], keep=False) == (None, "\n\n" + ANSWER)
    # After the thinking, its markers are the answer's text.
    assert split("qwen3", [REPLY + "</think>"]) == (THOUGHT, f"\n\n{ANSWER}</think>")


class Served:
    def __init__(self, parser: str = "qwen3") -> None:
        self.fake = FakeUpstream(models=["bytes"])
        self.server = LiveServer(FrontendApp(
            self.fake, ByteTokenizer(), None, 4096, FrontendMetrics(),
            tool_call_parser="hermes", reasoning_parser=parser)).start()
        self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="x",
                                    max_retries=0, timeout=10)

    def reply(self, text: str, chunk_size: int = 1) -> None:
        self.fake.script = Script(reply=list(text.encode()), stop_token=ByteTokenizer.EOS,
                                  chunk_size=chunk_size, delay_s=0.0005)

    def chat(self, **kwargs: Any) -> Any:
        return self.client.chat.completions.create(model="bytes", messages=kwargs.pop(
            "messages", ASK), **kwargs)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    served = Served()
    yield served
    served.server.stop()


def _streamed(chunks: list[Any]) -> tuple[list[str], list[str]]:
    """Each chunk's reasoning and content, in order (checked against the spec)."""
    reasoning, content = [], []
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse",
                 chunk.model_dump(mode="json", exclude_unset=True))
        delta = chunk.choices[0].delta if chunk.choices else None
        reasoning.append((delta.model_extra or {}).get("reasoning") or "" if delta else "")
        content.append(delta.content or "" if delta else "")
    return reasoning, content


def test_chat_carries_the_reasoning_apart_from_the_answer(served: Served) -> None:
    served.reply(REPLY)
    done = served.chat()
    validate("CreateChatCompletionResponse", done.model_dump(mode="json", exclude_unset=True))
    message = done.choices[0].message
    assert (message.model_extra or {})["reasoning"] == THOUGHT
    assert message.content == "\n\n" + ANSWER and done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == len(REPLY.encode()) + 1
    # The thinking's tokens (the byte tokenizer's: its bytes, with its markers' here).
    details = done.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens is not None
    assert len(THOUGHT.encode()) <= details.reasoning_tokens <= len(THOUGHT.encode()) + 15
    # Streamed: the reasoning as it is written, every piece of it before the answer's (also
    # when both arrive at once).
    for chunk_size in (3, len(REPLY)):
        served.reply(REPLY, chunk_size)
        reasoning, content = _streamed(list(served.chat(stream=True)))
        assert "".join(reasoning) == THOUGHT and "".join(content) == "\n\n" + ANSWER
        thinking = [i for i, piece in enumerate(reasoning) if piece]
        answering = [i for i, piece in enumerate(content) if piece]
        assert max(thinking) < min(answering)
        assert len(thinking) > 5 or chunk_size == len(REPLY)
    # include_reasoning false (vLLM's): the same answer, no reasoning.
    for stream in (False, True):
        served.reply(REPLY)
        out = served.chat(stream=stream, extra_body={"include_reasoning": False})
        if stream:
            reasoning, content = _streamed(list(out))
            assert not any(reasoning) and "".join(content) == "\n\n" + ANSWER
        else:
            assert out.choices[0].message.content == "\n\n" + ANSWER
            assert (out.choices[0].message.model_extra or {}).get("reasoning") is None


def test_what_the_request_turns_off_or_constrains_is_all_answer(served: Served) -> None:
    served.reply(REPLY)
    off = served.chat(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content == REPLY
    assert (off.choices[0].message.model_extra or {}).get("reasoning") is None
    # A constrained reply (JSON here) has no thinking: its constraint holds from the start.
    served.reply('{"a": 1}')
    constrained = served.chat(response_format={"type": "json_object"})
    assert constrained.choices[0].message.content == '{"a": 1}'


def test_reasoning_effort_none_turns_the_thinking_off(served: Served) -> None:
    """vLLM's `reasoning_effort` (the Responses API's `reasoning.effort`) reaches the chat
    template with `enable_thinking` on unless it is "none": then the reply is all answer."""
    served.reply(REPLY)
    chat = served.chat(reasoning_effort="none")
    assert chat.choices[0].message.content == REPLY
    assert (chat.choices[0].message.model_extra or {}).get("reasoning") is None
    assert (served.chat(reasoning_effort="low").choices[0].message.model_extra or {}).get(
        "reasoning") == THOUGHT
    done = served.client.responses.create(model="bytes", input="Is 2 < 3?",
                                          reasoning={"effort": "none", "summary": "auto"})
    validate("Response", done.model_dump(mode="json", exclude_unset=True))
    assert [item.type for item in done.output] == ["message"] and done.output_text == REPLY
    assert done.reasoning is not None and (done.reasoning.effort, done.reasoning.summary) == (
        "none", "auto")
    thought = served.client.responses.create(model="bytes", input="Is 2 < 3?",
                                             reasoning={"effort": "high"})
    assert [item.type for item in thought.output] == ["reasoning", "message"]


def test_deepseek_v3_thinks_only_when_the_request_asks() -> None:
    served = Served("deepseek_v3")
    try:
        served.reply(f"{THOUGHT}</think>{ANSWER}")
        plain = served.chat()
        assert plain.choices[0].message.content == f"{THOUGHT}</think>{ANSWER}"
        assert (plain.choices[0].message.model_extra or {}).get("reasoning") is None
        chunks = list(served.chat(stream=True, extra_body={
            "chat_template_kwargs": {"thinking": True}}))
        reasoning, content = _streamed(chunks)
        assert ("".join(reasoning), "".join(content)) == (THOUGHT, ANSWER)
    finally:
        served.server.stop()


def test_reasoning_then_tool_calls_and_an_earlier_turn(served: Served) -> None:
    """A tool call after the thinking is read as one; an earlier reply's reasoning may come
    back with the conversation, as a client sends its messages back."""
    tools: Any = [{"type": "function", "function": {"name": "now", "parameters": {}}}]
    served.reply(f'{THOUGHT}\n<tool_call>{{"name": "now", "arguments": {{}}}}</tool_call>')
    done = served.chat(tools=tools)
    message = done.choices[0].message
    assert (message.model_extra or {})["reasoning"] == THOUGHT + "\n"
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls or ()] == [
        ("now", "{}")] and not message.content and done.choices[0].finish_reason == "tool_calls"
    served.reply(REPLY)
    turn = served.chat(messages=[*ASK, {"role": "assistant", "content": ANSWER,
                                        "reasoning": THOUGHT},
                                 {"role": "user", "content": "And 3 < 2?"}])
    assert turn.choices[0].message.content == "\n\n" + ANSWER


def test_each_choice_is_split_on_its_own(served: Served) -> None:
    """With `n`, every choice carries its own reasoning and answer, streamed or not."""
    served.reply(REPLY, chunk_size=3)
    done = served.chat(n=3)
    assert [((c.message.model_extra or {})["reasoning"], c.message.content)
            for c in done.choices] == [(THOUGHT, "\n\n" + ANSWER)] * 3
    assert done.usage is not None and done.usage.completion_tokens_details is not None
    reasoning_tokens = done.usage.completion_tokens_details.reasoning_tokens or 0
    assert 3 * len(THOUGHT.encode()) <= reasoning_tokens <= 3 * (len(THOUGHT.encode()) + 15)
    chunks = list(served.chat(n=2, stream=True))
    for index in (0, 1):
        mine = [c for c in chunks if c.choices and c.choices[0].index == index]
        reasoning, content = _streamed(mine)
        assert "".join(reasoning) == THOUGHT and "".join(content) == "\n\n" + ANSWER
        assert max(i for i, piece in enumerate(reasoning) if piece) < \
            min(i for i, piece in enumerate(content) if piece)


def test_what_it_cannot_split_is_refused_by_name(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        served.chat(extra_body={"echo": True})
    assert info.value.body["param"] == "echo"  # type: ignore[index]
    # Completions are not chat: their text is the model's as written.
    served.reply(REPLY)
    text = served.client.completions.create(model="bytes", prompt="x",
                                            max_tokens=200).choices[0].text
    assert text == REPLY


def test_the_responses_api_gives_the_reasoning_its_own_item(served: Served) -> None:
    served.reply(REPLY)
    done = served.client.responses.create(model="bytes", input="Is 2 < 3?")
    body = done.model_dump(mode="json", exclude_unset=True)
    validate("Response", body)
    assert [item["type"] for item in body["output"]] == ["reasoning", "message"]
    assert body["output"][0]["content"] == [{"type": "reasoning_text", "text": THOUGHT}]
    assert done.output_text == "\n\n" + ANSWER
    assert done.usage is not None
    assert len(THOUGHT.encode()) <= done.usage.output_tokens_details.reasoning_tokens \
        <= len(THOUGHT.encode()) + 15
    served.reply(REPLY, chunk_size=4)
    with served.client.responses.stream(model="bytes", input="Is 2 < 3?") as stream:
        events = [event.model_dump(mode="json", exclude_unset=True) for event in stream]
        final = stream.get_final_response()
    for event in events:
        validate(RESPONSES_EVENTS[event["type"]], event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    pieces = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert len(pieces) > 2 and "".join(pieces) == THOUGHT
    items = [(e["type"], e["output_index"]) for e in events if "output_item" in e["type"]]
    assert items == [("response.output_item.added", 0), ("response.output_item.done", 0),
                     ("response.output_item.added", 1), ("response.output_item.done", 1)]
    assert {e["output_index"] for e in events if e["type"] == "response.output_text.delta"} \
        == {1}
    thought = json.loads(final.model_dump_json())["output"][0]
    assert (thought["type"], thought["content"], thought["status"]) == (
        "reasoning", [{"type": "reasoning_text", "text": THOUGHT}], "completed")
    assert final.output_text == done.output_text
    # Without reasoning (a constrained reply), the message is the only item, as before.
    served.reply('{"a": 1}', chunk_size=3)
    fmt: Any = {"type": "json_schema", "name": "a", "schema": {"type": "object"}}
    with served.client.responses.stream(model="bytes", input="x", text={"format": fmt}) \
            as stream:
        events = [event.model_dump(mode="json", exclude_unset=True) for event in stream]
        plain = stream.get_final_response()
    assert [item.type for item in plain.output] == ["message"]
    assert plain.output_text == '{"a": 1}'
    assert {e.get("output_index") for e in events} == {None, 0}


def test_a_responses_conversation_sends_its_reasoning_back(served: Served) -> None:
    """The next turn's input holds the earlier output as the client got it, reasoning item
    included (its text is that turn's `reasoning_content` for the template)."""
    served.reply(REPLY)
    first = served.client.responses.create(model="bytes", input="Is 2 < 3?")
    earlier = [item.model_dump(mode="json", exclude_none=True) for item in first.output]
    served.reply(ANSWER)
    turn = served.client.responses.create(model="bytes", input=[  # type: ignore[arg-type]
        {"role": "user", "content": "Is 2 < 3?"}, *earlier,
        {"role": "user", "content": "And 3 < 2?"}])
    assert turn.status == "completed"
    prompt = bytes(t for t in served.fake.opened[-1].token_ids if t < 256).decode()
    assert prompt.count(ANSWER) == 1 and "And 3 < 2?" in prompt
    with pytest.raises(openai.BadRequestError) as info:
        served.client.responses.create(model="bytes", input=[  # type: ignore[arg-type]
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": "not a list"}])
    assert info.value.body["param"] == "input[0].content"  # type: ignore[index]


def test_earlier_reasoning_reaches_the_template_as_reasoning_content() -> None:
    """As vLLM hands it over: chat's `reasoning` (or `reasoning_content`) on an assistant
    message, and the Responses API's reasoning item with the message after it, are one
    assistant turn whose `reasoning_content` the template may write."""
    turn = {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}
    for name in ("reasoning", "reasoning_content"):
        chat = protocol.parse_chat(json.dumps({"model": "m", "messages": [
            *ASK, {"role": "assistant", "content": ANSWER, name: THOUGHT}]}).encode())
        assert protocol.chat_messages(chat)[1] == turn
    _, chat = responses_api.parse(json.dumps({"model": "m", "input": [
        *ASK, {"type": "reasoning", "id": "rs_1", "summary": [],
               "content": [{"type": "reasoning_text", "text": THOUGHT}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": ANSWER}]},
        {"role": "user", "content": "And 3 < 2?"}]}).encode())
    assert [m["role"] for m in protocol.chat_messages(chat)] == ["user", "assistant", "user"]
    assert protocol.chat_messages(chat)[1] == turn


def test_a_response_cut_short_or_failing_in_its_thinking_says_so(served: Served) -> None:
    """Out of tokens inside the thinking: an incomplete reasoning item and no message, as
    OpenAI's; a stream that fails marks each item it opened by whether it was done."""
    served.reply(REPLY, chunk_size=3)
    done = served.client.responses.create(model="bytes", input="Is 2 < 3?", max_output_tokens=20)
    with served.client.responses.stream(model="bytes", input="Is 2 < 3?",
                                        max_output_tokens=20) as stream:
        events = [event.model_dump(mode="json", exclude_unset=True) for event in stream]
    for event in events:
        validate(RESPONSES_EVENTS[event["type"]], event)
    assert [e["type"] for e in events if "output_item" in e["type"]] == [
        "response.output_item.added", "response.output_item.done"]
    for response in (done.model_dump(mode="json", exclude_unset=True), events[-1]["response"]):
        validate("Response", response)
        assert (response["status"], response["incomplete_details"]) == (
            "incomplete", {"reason": "max_output_tokens"})
        assert [(item["type"], item["status"]) for item in response["output"]] == [
            ("reasoning", "incomplete")]
        thought = response["output"][0]["content"][0]["text"]
        assert thought and THOUGHT.startswith(thought) and len(thought) < len(THOUGHT)
    assert done.output_text == ""

    # A reply cut in its answer: the reasoning was done.
    served.reply(REPLY)
    cut = served.client.responses.create(model="bytes", input="x",
                                         max_output_tokens=len(REPLY.encode()) - 3)
    assert [(item.type, item.status) for item in cut.output] == [
        ("reasoning", "completed"), ("message", "incomplete")]

    for at, items in ((20, [("reasoning", "incomplete")]),
                      (len(REPLY.encode()) - 3,
                       [("reasoning", "completed"), ("message", "incomplete")])):
        served.fake.script = Script(reply=list(REPLY.encode()), stop_token=ByteTokenizer.EOS,
                                    delay_s=0.0005, error_at_chunk=at)
        with served.client.responses.stream(model="bytes", input="x") as stream:
            failed = [event.model_dump(mode="json", exclude_unset=True)
                      for event in stream][-1]
        validate(RESPONSES_EVENTS[failed["type"]], failed)
        assert failed["type"] == "response.failed"
        assert [(item["type"], item["status"]) for item in failed["response"]["output"]] \
            == items
        assert THOUGHT.startswith(failed["response"]["output"][0]["content"][0]["text"])
