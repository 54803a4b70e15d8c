"""Every body the frontend writes validates against the OpenAI spec's schemas."""

from __future__ import annotations

import json

import pytest

from services.frontend import responses
from services.frontend.errors import ApiError
from tests.openapi_spec import validate

TEXTS = ["", "plain", 'quotes " and \\ and \n newlines', "unicode é 🙂 \u2028"]


def _event(frame: bytes) -> dict:
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    return json.loads(frame[6:-2])


def _events(frames: bytes) -> list[bytes]:
    parts = frames.split(b"\n\n")
    assert parts[-1] == b""
    return [p + b"\n\n" for p in parts[:-1]]


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_chunks(include_usage: bool) -> None:
    enc = responses.ChatStreamEncoder("chatcmpl-1", 1700000000, "tiny", include_usage)
    first = _event(enc.opening())
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for text in TEXTS:
        event = _event(enc.delta(text))
        validate("CreateChatCompletionStreamResponse", event)
        assert event["choices"][0]["delta"] == {"content": text}
        assert ("usage" in event) is include_usage
        if include_usage:
            assert event["usage"] is None
    closing = _events(enc.closing("last", "length", responses.usage(5, 3, 2)))
    assert closing[-1] == responses.DONE
    events = [_event(f) for f in closing[:-1]]
    for event in [first, *events]:
        validate("CreateChatCompletionStreamResponse", event)
    assert events[0]["choices"][0]["delta"] == {"content": "last"}
    assert events[1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                       "finish_reason": "length"}
    if include_usage:
        assert events[2]["choices"] == []
        assert events[2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                      "total_tokens": 8, "prompt_tokens_details":
                                          {"cached_tokens": 2}}
    else:
        assert len(events) == 2


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_stream_chunks(include_usage: bool) -> None:
    enc = responses.CompletionStreamEncoder("cmpl-1", 1700000000, "tiny", include_usage)
    assert enc.opening() == b""
    for text in TEXTS:
        event = _event(enc.delta(text))
        validate("CreateCompletionStreamResponse", event)
        assert event["object"] == "text_completion"
        assert event["choices"][0]["text"] == text
    closing = _events(enc.closing("", "stop", responses.usage(1, 1, 0)))
    assert closing[-1] == responses.DONE
    final = _event(closing[0])
    validate("CreateCompletionResponse", final)  # the last chunk also fits the plain schema
    assert final["choices"][0]["finish_reason"] == "stop"
    assert len(closing) == (3 if include_usage else 2)
    if include_usage:
        validate("CreateCompletionStreamResponse", _event(closing[1]))


@pytest.mark.parametrize("text", TEXTS)
def test_whole_bodies(text: str) -> None:
    usage = responses.usage(7, 2, 4)
    chat = json.loads(responses.chat_completion("chatcmpl-x", 1, "tiny", [(text, "stop")], usage))
    validate("CreateChatCompletionResponse", chat)
    assert chat["choices"][0]["message"] == {"content": text, "refusal": None,
                                             "role": "assistant"}
    assert chat["choices"][0]["logprobs"] is None
    done = json.loads(responses.completion("cmpl-x", 1, "tiny", [(text, "length")], usage))
    validate("CreateCompletionResponse", done)
    assert done["choices"][0]["text"] == text
    assert done["usage"]["total_tokens"] == 9


def test_several_choices_carry_their_index() -> None:
    usage = responses.usage(7, 5, 0)
    choices = [("one", "stop"), ("two", "length"), ("", "stop")]
    chat = json.loads(responses.chat_completion("chatcmpl-x", 1, "tiny", choices, usage))
    validate("CreateChatCompletionResponse", chat)
    assert [(c["index"], c["message"]["content"], c["finish_reason"])
            for c in chat["choices"]] == [(0, "one", "stop"), (1, "two", "length"),
                                          (2, "", "stop")]
    done = json.loads(responses.completion("cmpl-x", 1, "tiny", choices, usage))
    validate("CreateCompletionResponse", done)
    assert [(c["index"], c["text"]) for c in done["choices"]] == [(0, "one"), (1, "two"),
                                                                   (2, "")]
    chat_enc = responses.ChatStreamEncoder("chatcmpl-1", 1, "tiny", True, index=3)
    comp_enc = responses.CompletionStreamEncoder("cmpl-1", 1, "tiny", False, index=3)
    frames = [chat_enc.opening(), chat_enc.delta("x"), *_events(chat_enc.ending("y", "stop"))]
    for frame in frames:
        event = _event(frame)
        validate("CreateChatCompletionStreamResponse", event)
        assert event["choices"][0]["index"] == 3 and event["usage"] is None
    for frame in (comp_enc.delta("x"), comp_enc.ending("y", "length")):
        event = _event(frame)
        validate("CreateCompletionStreamResponse", event)
        assert event["choices"][0]["index"] == 3


def test_model_list_and_errors() -> None:
    models = json.loads(responses.model_list(["a", "b"], 1700000000))
    validate("ListModelsResponse", models)
    assert [m["id"] for m in models["data"]] == ["a", "b"]
    assert all(m["owned_by"] == "turnout" for m in models["data"])
    error = ApiError(404, "nope", param="model", code="model_not_found")
    body = json.loads(error.body())
    validate("ErrorResponse", body)
    assert body["error"]["type"] == "not_found_error"
    validate("ErrorResponse", _event(responses.sse_error(ApiError(503, "busy"))))
