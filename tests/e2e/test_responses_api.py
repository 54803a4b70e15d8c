"""OpenAI's Responses API through the whole stack, driven by the real `openai` client: the
response object and every streamed event validate against the spec, the text is the chat
completion's for the same conversation, a multi-turn input carries a previous output back, and
what is not supported is refused by name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.images import data_uri, png
from tests.openapi_spec import RESPONSES_EVENTS, validate
from turnout.testing.deployment import Deployment, reaped

pytestmark = pytest.mark.e2e

# The byte tokenizer's EOS, drawn about once in 6 tokens: responses end by themselves.
WORKER_ARGS = ("--speedup-ratio", "0", "--eos-token-id", "257", "--mean-output-tokens", "6")


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("responses"))
    deployment.start(workers=1, worker_args=WORKER_ARGS)
    yield from reaped(deployment)


def client(dep: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=dep.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_a_response_is_the_chat_completion_of_its_conversation(dep: Deployment) -> None:
    oai = client(dep)
    response = oai.responses.create(model="mock", instructions="Be brief.",
                                    input="Say something.", max_output_tokens=200)
    validate("Response", response.model_dump(mode="json", exclude_unset=True))
    chat = oai.chat.completions.create(
        model="mock", max_completion_tokens=200,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Say something."}])
    assert response.status == "completed" and response.incomplete_details is None
    assert response.output_text == chat.choices[0].message.content
    assert response.instructions == "Be brief." and response.max_output_tokens == 200
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == chat.usage.total_tokens
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.id.startswith("resp_") and message.id.startswith("msg_")

    # Cut by max_output_tokens: incomplete, and why.
    cut = oai.responses.create(model="mock", input="Say something else.", max_output_tokens=1)
    validate("Response", cut.model_dump(mode="json", exclude_unset=True))
    if cut.status == "incomplete":  # (unless its one token was EOS)
        assert cut.incomplete_details is not None
        assert cut.incomplete_details.reason == "max_output_tokens"
        assert cut.usage is not None and cut.usage.output_tokens == 1

    # Multi-turn: the previous output goes back as input, as the SDK hands it out.
    follow = oai.responses.create(model="mock", max_output_tokens=200, input=[
        {"role": "user", "content": "Say something."},
        *[item.model_dump(mode="json", exclude_none=True) for item in response.output],
        {"role": "user", "content": [{"type": "input_text", "text": "And then?"}]}])
    again = oai.chat.completions.create(model="mock", max_completion_tokens=200, messages=[
        {"role": "user", "content": "Say something."},
        {"role": "assistant", "content": response.output_text},
        {"role": "user", "content": "And then?"}])
    assert follow.output_text == again.choices[0].message.content


def test_an_input_image_is_the_chat_image_part(dep: Deployment) -> None:
    """`input_image` by data URL runs as chat's `image_url` part: the same answer and prompt
    size as chat gives for the same image, and another image changes the answer."""
    oai = client(dep)

    def ask(color: tuple[int, int, int]) -> tuple[str, int]:
        done = oai.responses.create(model="mock", max_output_tokens=200, input=[
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                         {"type": "input_image", "detail": "auto",
                                          "image_url": data_uri(png(color))}]}])
        assert done.usage is not None
        return done.output_text, done.usage.input_tokens

    red = ask((200, 10, 10))
    chat = oai.chat.completions.create(model="mock", max_completion_tokens=200, messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": data_uri(png((200, 10, 10)))}}]}])
    assert chat.usage is not None
    assert red == (chat.choices[0].message.content, chat.usage.prompt_tokens)
    assert red[1] > 16  # the image's placeholder tokens, on top of the text
    blue = ask((10, 10, 200))
    assert blue[1] == red[1] and blue[0] != red[0]


def test_a_streamed_response_sends_each_event_in_order(dep: Deployment) -> None:
    oai = client(dep)
    whole = oai.responses.create(model="mock", input="Tell me more.", max_output_tokens=200)
    with httpx.stream("POST", dep.url + "/v1/responses", timeout=30, json={
            "model": "mock", "input": "Tell me more.", "max_output_tokens": 200,
            "stream": True}) as raw:
        assert raw.status_code == 200
        blocks = raw.read().decode().strip().split("\n\n")
    assert blocks[-1] == "data: [DONE]"
    events = []
    for block in blocks[:-1]:
        kind_line, data_line = block.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert kind_line == f"event: {event['type']}"
        validate(RESPONSES_EVENTS[event["type"]], event)
        events.append(event)
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == whole.output_text == events[-4]["text"]
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] == whole.usage.output_tokens  # type: ignore[union-attr]
    # The SDK's stream helper reads the same events into the same response.
    with oai.responses.stream(model="mock", input="Tell me more.",
                              max_output_tokens=200) as stream:
        streamed = [event.type for event in stream]
        assert stream.get_final_response().output_text == text
    assert streamed[-1] == "response.completed"


@pytest.mark.parametrize(("fields", "param"), [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"reasoning": {"summary": "detailed"}}, "reasoning.summary"),
    ({"reasoning": {"effort": "huge"}}, "reasoning.effort"),
    # The mocker draws ids without their text: it refuses a constraint on the text.
    ({"text": {"format": {"type": "json_object"}}}, None),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "a b"}}}, "text.format.name"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]},
     "input[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0]"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"max_output_tokens": 10_000_000}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
])
def test_what_is_not_supported_is_refused_by_name(dep: Deployment, fields: dict[str, Any],
                                                  param: str | None) -> None:
    body = {"model": "mock", "input": "x", **fields}
    answer = httpx.post(dep.url + "/v1/responses", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    validate("ErrorResponse", answer.json())
    assert answer.json()["error"]["param"] == param, answer.json()
    if param is None:  # the engine's refusal says what it is
        assert "structured outputs" in answer.json()["error"]["message"]
