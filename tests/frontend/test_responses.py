"""Every body the frontend writes validates against the OpenAI spec's schemas."""

from __future__ import annotations

import json

import pytest

from common.messages import TokenLogprob
from services.frontend import responses
from services.frontend.errors import ApiError
from services.frontend.logprobs import NULL, ChoiceLogprobs, PromptLogprobs
from services.frontend.tokenizer import ByteTokenizer
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
    chat = json.loads(responses.chat_completion("chatcmpl-x", 1, "tiny", [(text, "stop", NULL)],
                                                usage))
    validate("CreateChatCompletionResponse", chat)
    assert chat["choices"][0]["message"] == {"content": text, "refusal": None,
                                             "role": "assistant"}
    assert chat["choices"][0]["logprobs"] is None
    done = json.loads(responses.completion("cmpl-x", 1, "tiny", [(text, "length", NULL)], usage))
    validate("CreateCompletionResponse", done)
    assert done["choices"][0]["text"] == text
    assert done["usage"]["total_tokens"] == 9


def test_several_choices_carry_their_index() -> None:
    usage = responses.usage(7, 5, 0)
    choices = [("one", "stop", NULL), ("two", "length", NULL), ("", "stop", NULL)]
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


def _logprobs(chat: bool) -> ChoiceLogprobs:
    lp = ChoiceLogprobs(ByteTokenizer(), chat)
    # "h", "i", then the first byte of a three-byte character (shown as U+FFFD, its bytes kept).
    lp.add([104, 105], [TokenLogprob(-0.5, [104, 120], [-0.5, -1.5]),
                        TokenLogprob(-0.25, [105, 121], [-0.25, -2.0])])
    lp.add([0xE2], [TokenLogprob(float("-inf"), [0xE2, 97], [float("-inf"), -9.0])])
    return lp


def test_logprobs_take_the_shape_the_spec_gives_them() -> None:
    usage = responses.usage(3, 3, 0)
    chat = json.loads(responses.chat_completion(
        "chatcmpl-x", 1, "tiny", [("hi", "length", _logprobs(True).take())], usage))
    validate("CreateChatCompletionResponse", chat)
    content = chat["choices"][0]["logprobs"]["content"]
    assert [(c["token"], c["logprob"], c["bytes"]) for c in content] == [
        ("h", -0.5, [104]), ("i", -0.25, [105]), ("\ufffd", -9999.0, [0xE2])]
    assert content[0]["top_logprobs"] == [{"token": "h", "logprob": -0.5, "bytes": [104]},
                                          {"token": "x", "logprob": -1.5, "bytes": [120]}]
    done = json.loads(responses.completion(
        "cmpl-x", 1, "tiny", [("hi", "length", _logprobs(False).take())], usage))
    validate("CreateCompletionResponse", done)
    assert done["choices"][0]["logprobs"] == {
        "tokens": ["h", "i", "\ufffd"], "token_logprobs": [-0.5, -0.25, -9999.0],
        "top_logprobs": [{"h": -0.5, "x": -1.5}, {"i": -0.25, "y": -2.0},
                         {"\ufffd": -9999.0, "a": -9.0}],
        "text_offset": [0, 1, 2]}


def test_streamed_logprobs_go_with_the_text_they_show() -> None:
    lp = _logprobs(False)
    enc = responses.CompletionStreamEncoder("cmpl-1", 1, "tiny", False)
    event = _event(enc.delta("hi", lp.take()))
    assert event["choices"][0]["logprobs"]["text_offset"] == [0, 1, 2]
    lp.add([106], [TokenLogprob(-1.0)])  # logprobs=0: the token alone
    event = _event(enc.ending("j", "length", lp.take()))
    validate("CreateCompletionResponse", event)
    assert event["choices"][0]["logprobs"] == {
        "tokens": ["j"], "token_logprobs": [-1.0], "top_logprobs": [{"j": -1.0}],
        "text_offset": [3]}  # counted on from where the last event left off
    chat_lp = _logprobs(True)
    chat_enc = responses.ChatStreamEncoder("chatcmpl-1", 1, "tiny", True)
    frames = [chat_enc.delta("hi", chat_lp.take()),
              *_events(chat_enc.ending("", "stop", chat_lp.take()))]
    for frame in frames:
        validate("CreateChatCompletionStreamResponse", _event(frame))
    assert len(_event(frames[0])["choices"][0]["logprobs"]["content"]) == 3
    assert _event(frames[1])["choices"][0]["logprobs"] == {"content": [], "refusal": None}


def test_an_echoed_prompts_logprobs_come_first_its_first_null() -> None:
    lp = ChoiceLogprobs(ByteTokenizer(), chat=False)
    lp.add_prompt([104, 105], [TokenLogprob(-3.0, [120], [-0.5])])
    lp.add([33], [TokenLogprob(-0.1, [33], [-0.1])])
    done = json.loads(responses.completion("cmpl-x", 1, "tiny", [("hi!", "length", lp.take())],
                                           responses.usage(2, 1, 0)))
    validate("CreateCompletionResponse", done)
    assert done["choices"][0]["logprobs"] == {
        "tokens": ["h", "i", "!"], "token_logprobs": [None, -3.0, -0.1],
        "top_logprobs": [None, {"x": -0.5}, {"!": -0.1}], "text_offset": [0, 1, 2]}


def test_prompt_logprobs_take_vllms_shape() -> None:
    """vLLM's `prompt_logprobs`: null first; then the prompt token's own entry (its rank, None
    when the engine did not say) and the k most likely, listed once each; null where the
    engine scored nothing. The body still validates."""
    scores = PromptLogprobs(ByteTokenizer(), top=2)
    scores.scores = [TokenLogprob(-0.5, [105, 120, 121], [-0.5, -1.5, -2.0], 1),
                     TokenLogprob(float("-inf"), [97, 98], [-0.1, -0.2])]
    body = json.loads(responses.completion(
        "cmpl-x", 1, "tiny", [("!", "length", NULL)], responses.usage(4, 1, 0),
        prompt_logprobs=[scores.json([104, 105, 33, 34])]))
    validate("CreateCompletionResponse", body)
    assert body["choices"][0]["prompt_logprobs"] == [
        None,
        {"105": {"logprob": -0.5, "rank": 1, "decoded_token": "i"},
         "120": {"logprob": -1.5, "rank": 2, "decoded_token": "x"}},
        {"33": {"logprob": -9999.0, "rank": None, "decoded_token": "!"},
         "97": {"logprob": -0.1, "rank": 1, "decoded_token": "a"},
         "98": {"logprob": -0.2, "rank": 2, "decoded_token": "b"}},
        None]
    named = PromptLogprobs(ByteTokenizer(), top=0, as_ids=True)
    named.scores = [TokenLogprob(-0.5, [], [], 3)]
    chat = json.loads(responses.chat_completion(
        "chatcmpl-x", 1, "tiny", [("!", "length", NULL)], responses.usage(2, 1, 0),
        prompt_logprobs=[named.json([104, 105])]))
    validate("CreateChatCompletionResponse", chat)
    assert chat["prompt_logprobs"] == [
        None, {"105": {"logprob": -0.5, "rank": 3, "decoded_token": "token_id:105"}}]


@pytest.mark.parametrize("chat", [True, False])
def test_continuous_usage_goes_in_every_chunk(chat: bool) -> None:
    """vLLM's `continuous_usage_stats`: every event carries the usage so far (the spec allows a
    usage object there); the final usage chunk is as without it."""
    counts = [0]

    def running() -> responses.Usage:
        return responses.usage(5, counts[0], 2)

    kind = "CreateChatCompletionStreamResponse" if chat else "CreateCompletionResponse"
    enc = (responses.ChatStreamEncoder("chatcmpl-1", 1, "tiny", True, running_usage=running,
                                       token_ids=True, prompt_ids=[1, 2])
           if chat else responses.CompletionStreamEncoder(
               "cmpl-1", 1, "tiny", True, token_ids=True, prompt_ids=[1, 2],
               running_usage=running))
    frames = [enc.opening()]
    counts[0] = 2
    frames.append(enc.delta("hi"))
    counts[0] = 3
    frames += _events(enc.closing("!", "stop", responses.usage(5, 3, 2)))
    events = [_event(frame) for frame in frames[:-1]]
    for event in events:
        # (The spec's completion object wants a finish reason: only the last event has one.)
        if chat or (event["choices"] and event["choices"][0]["finish_reason"]):
            validate(kind, event)
    assert [e["usage"]["completion_tokens"] for e in events] == [0, 2, *[3] * (len(events) - 2)]
    assert all(e["usage"]["prompt_tokens"] == 5 for e in events)
    assert events[-1]["choices"] == [] and frames[-1] == responses.DONE
