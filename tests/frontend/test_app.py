"""The ASGI app under real uvicorn, driven by the real `openai` client and raw httpx, in front of
an in-process fake upstream. Every body and streamed chunk is checked against the OpenAI spec."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import tokenizers

from services.frontend.app import FALLBACK_MAX_MODEL_LEN, FrontendApp
from services.frontend.chat_template import RenderOptions
from services.frontend.metrics import FrontendMetrics
from services.frontend.tokenizer import ByteTokenizer, HfTokenizer, Tokenizer
from tests.frontend.fake_upstream import FakeUpstream, Script
from tests.frontend.live_server import LiveServer, wait_until
from tests.openapi_spec import validate
from tests.tiny_model import EOT, cached_tiny_model

REPLY = "Beautiful is better than ugly. Café 🙂 — explicit is better than implicit."
MESSAGES = [{"role": "system", "content": "Answer with the Zen."},
            {"role": "user", "content": "What is better than ugly?"}]
MAX_MODEL_LEN = 1024
TIMEOUT = 10.0


@dataclasses.dataclass
class Stack:
    fake: FakeUpstream
    server: LiveServer
    metrics: FrontendMetrics
    tokenizer: Tokenizer
    reply_ids: list[int]
    eos: int

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=TIMEOUT, **kwargs)

    def script(self, **fields: Any) -> Script:
        fields.setdefault("reply", self.reply_ids)
        fields.setdefault("stop_token", self.eos)
        self.fake.script = Script(**fields)
        return self.fake.script


@pytest.fixture(scope="module")
def tiny() -> HfTokenizer:
    return HfTokenizer(cached_tiny_model())


def _start(fake: FakeUpstream, tokenizer: Tokenizer, **kwargs: Any) -> tuple[LiveServer,
                                                                              FrontendMetrics]:
    metrics = FrontendMetrics()
    kwargs.setdefault("served_model_name", None)
    kwargs.setdefault("max_model_len", MAX_MODEL_LEN)
    app = FrontendApp(fake, tokenizer, metrics=metrics, **kwargs)
    return LiveServer(app).start(), metrics


@pytest.fixture(scope="module")
def shared(tiny: HfTokenizer) -> Iterator[Stack]:
    fake = FakeUpstream(models=["tiny"])
    server, metrics = _start(fake, tiny)
    eos = tiny._tokenizer.token_to_id(EOT)
    yield Stack(fake, server, metrics, tiny, tiny.encode(REPLY, add_special_tokens=False), eos)
    server.stop()


@pytest.fixture
def stack(shared: Stack) -> Stack:
    shared.fake.models = ["tiny"]
    shared.fake.no_workers = False
    shared.script()
    return shared


def _sse_events(response: httpx.Response) -> list[Any]:
    """Every `data:` event of a streamed response, JSON-decoded ([DONE] kept as the string)."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _metric(stack: Stack, name: str, **labels: str) -> float:
    value = stack.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- happy paths through the openai client ----------------------------------------------------

def test_models_list(stack: Stack) -> None:
    models = stack.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    raw = httpx.get(stack.url + "/v1/models", timeout=TIMEOUT)
    assert raw.status_code == 200
    validate("ListModelsResponse", raw.json())


def test_model_retrieve(stack: Stack) -> None:
    model = stack.client().models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "turnout")
    raw = httpx.get(stack.url + "/v1/models/tiny", timeout=TIMEOUT)
    validate("Model", raw.json())
    with pytest.raises(openai.NotFoundError) as missing:
        stack.client().models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"
    stack.fake.models = ["org/tiny-v2"]  # Hugging Face ids carry a slash
    assert stack.client().models.retrieve("org/tiny-v2").id == "org/tiny-v2"
    response = httpx.post(stack.url + "/v1/models/org/tiny-v2", timeout=TIMEOUT)
    assert response.status_code == 405 and response.headers["allow"] == "GET"


def test_chat_whole(stack: Stack) -> None:
    stack.script(cached_tokens=4)
    done = stack.client().chat.completions.create(model="tiny", messages=MESSAGES,
                                                  max_tokens=200)
    validate("CreateChatCompletionResponse", done.to_dict())
    assert done.choices[0].message.content == REPLY
    assert done.choices[0].finish_reason == "stop"
    prompt = stack.tokenizer.render_chat(MESSAGES)
    sent = stack.fake.opened[-1]
    assert sent.token_ids == prompt
    assert sent.sampling.max_tokens == 200
    assert sent.model == "tiny"
    assert done.usage is not None
    assert done.usage.prompt_tokens == len(prompt)
    assert done.usage.completion_tokens == len(stack.reply_ids) + 1  # + the EOS that stopped it
    assert done.usage.total_tokens == len(prompt) + len(stack.reply_ids) + 1
    assert done.usage.prompt_tokens_details.cached_tokens == 4
    assert done.id.startswith("chatcmpl-") and done.model == "tiny"


def test_chat_streamed_with_usage(stack: Stack) -> None:
    stack.script(chunk_size=3, delay_s=0.002)
    chunks = list(stack.client().chat.completions.create(
        model="tiny", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.to_dict())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(stack.reply_ids) + 1
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_without_usage_has_no_usage_field(stack: Stack) -> None:
    with httpx.stream("POST", stack.url + "/v1/chat/completions", timeout=TIMEOUT, json={
            "model": "tiny", "messages": MESSAGES, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        validate("CreateChatCompletionStreamResponse", event)
        assert "usage" not in event
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_completions_whole_and_streamed(stack: Stack) -> None:
    client = stack.client()
    done = client.completions.create(model="tiny", prompt="The Zen of Python", max_tokens=300)
    validate("CreateCompletionResponse", done.to_dict())
    assert done.choices[0].text == REPLY
    assert done.choices[0].finish_reason == "stop"
    prompt = stack.tokenizer.encode("The Zen of Python")
    assert stack.fake.opened[-1].token_ids == prompt
    assert done.usage is not None and done.usage.prompt_tokens == len(prompt)

    stack.script(delay_s=0.001)
    chunks = list(client.completions.create(model="tiny", prompt=[prompt], max_tokens=300,
                                            stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        data = chunk.to_dict()
        validate("CreateCompletionStreamResponse", data)
        assert data["object"] == "text_completion"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(stack.reply_ids) + 1
    assert stack.fake.opened[-1].token_ids == prompt  # token-id prompts go through untouched


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_include_obfuscation_pads_every_text_event(stack: Stack, path: str) -> None:
    """OpenAI's `stream_options.include_obfuscation`: asked for, every event with text carries
    random alphanumerics in `obfuscation` that bring its size to a multiple of 32 bytes, so
    sizes say nothing of token lengths; the text is the same. Not asked (as vLLM), none."""
    body: dict[str, Any] = {"model": "tiny", "stream": True, "max_tokens": 300}
    if path == "/v1/chat/completions":
        body["messages"] = MESSAGES
    elif path == "/v1/completions":
        body["prompt"] = "Zen"
    else:
        body.update(input="Zen", max_output_tokens=body.pop("max_tokens"))

    def stream(options: dict[str, Any] | None) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
        stack.script(delay_s=0.002)
        sent = body if options is None else {**body, "stream_options": options}
        with httpx.stream("POST", stack.url + path, timeout=TIMEOUT, json=sent) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        events = [(len(line.encode()), json.loads(line[len("data: "):])) for line in lines]
        text = ""
        for _, event in events:
            if path == "/v1/responses":
                text += event.get("delta", "") if event["type"].endswith(".delta") else ""
            elif event["choices"]:
                choice = event["choices"][0]
                text += choice.get("text") or choice.get("delta", {}).get("content") or ""
        return text, events

    plain_text, plain = stream(None)
    assert not any("obfuscation" in event for _, event in plain)
    assert not any("obfuscation" in event for _, event in stream({"include_obfuscation": False})[1])
    text, events = stream({"include_obfuscation": True})
    assert text == plain_text and len(text) > 20
    padded = [(size, event) for size, event in events if "obfuscation" in event]
    assert len(padded) > 10
    for size, event in padded:
        pad = event["obfuscation"]
        assert pad.isascii() and pad.isalnum() and 1 <= len(pad) <= 32
        # The chat and completion events are padded whole (`data: ` and the blank line after
        # it included), a Responses event's JSON alone (its `event:` line is constant).
        whole = size + 2 if path != "/v1/responses" else size - len("data: ")
        assert whole % 32 == 0, (whole, event)
        text_here = event.get("delta") if path == "/v1/responses" else (
            event["choices"][0].get("text") or event["choices"][0]["delta"].get("content"))
        assert text_here
    assert len({len(event["obfuscation"]) for _, event in padded}) > 1
    if path == "/v1/chat/completions":
        chunks = list(stack.client().chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True,
            stream_options={"include_obfuscation": True}))
        assert all(c.obfuscation for c in chunks if c.choices and c.choices[0].delta.content)
        for chunk in chunks:
            validate("CreateChatCompletionStreamResponse", chunk.to_dict())


@pytest.mark.parametrize("stream", [False, True])
def test_chat_echo_starts_the_reply_with_the_assistants_last_message(stack: Stack,
                                                                     stream: bool) -> None:
    """vLLM's chat `echo`: with the conversation ending in the assistant's own start (and
    `continue_final_message`), the reply is that start and then what the model wrote; usage
    counts only what it wrote; a conversation ending with the user's turn echoes nothing."""
    client = stack.client()
    start = "Beautiful is better"

    def reply(messages: list[dict[str, Any]], **extra: Any) -> tuple[str, Any]:
        stack.script(delay_s=0.001)
        kwargs: dict[str, Any] = {"model": "tiny", "messages": messages, "stream": stream,
                                  "extra_body": {"echo": True, **extra}}
        if not stream:
            out = client.chat.completions.create(**kwargs)
            validate("CreateChatCompletionResponse", out.to_dict())
            return out.choices[0].message.content or "", out
        chunks = list(client.chat.completions.create(
            **kwargs, stream_options={"include_usage": True}))
        for chunk in chunks:
            validate("CreateChatCompletionStreamResponse", chunk.to_dict())
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1]

    continued = [*MESSAGES, {"role": "assistant", "content": start}]
    text, last = reply(continued, continue_final_message=True, add_generation_prompt=False)
    assert text == start + REPLY
    assert last.usage.completion_tokens == len(stack.reply_ids) + 1
    parts = [*MESSAGES, {"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]}]
    text, _ = reply(parts, continue_final_message=True, add_generation_prompt=False)
    assert text == "a\nb" + REPLY
    text, _ = reply(MESSAGES)
    assert text == REPLY


def test_completions_default_max_tokens_is_16(stack: Stack) -> None:
    done = stack.client().completions.create(model="tiny", prompt="Zen")
    assert stack.fake.opened[-1].sampling.max_tokens == 16
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 16
    assert done.choices[0].text == stack.tokenizer.decode(stack.reply_ids[:16])


def test_length_finish(stack: Stack) -> None:
    done = stack.client().chat.completions.create(model="tiny", messages=MESSAGES,
                                                  max_completion_tokens=5)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 5
    assert done.choices[0].message.content == stack.tokenizer.decode(stack.reply_ids[:5])


def _tokens_until(stack: Stack, stop: str) -> int:
    """How many reply tokens it takes for the text to contain `stop`."""
    detok = stack.tokenizer.new_detokenizer()
    text = ""
    for n, token in enumerate(stack.reply_ids, 1):
        text += detok.step([token])
        if stop in text:
            return n
    raise AssertionError(f"{stop!r} never appears")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_and_cancels(stack: Stack, stream: bool) -> None:
    stack.script(delay_s=0.01)  # still generating when the stop string shows up
    client = stack.client()
    stop = ["never seen", "better"]
    if stream:
        chunks = list(client.chat.completions.create(
            model="tiny", messages=MESSAGES, stop=stop, stream=True,
            stream_options={"include_usage": True}))
        for chunk in chunks:
            validate("CreateChatCompletionStreamResponse", chunk.to_dict())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        done = client.chat.completions.create(model="tiny", messages=MESSAGES, stop=stop)
        validate("CreateChatCompletionResponse", done.to_dict())
        text, finish, usage = (done.choices[0].message.content, done.choices[0].finish_reason,
                               done.usage)
    assert text == "Beautiful is "
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == _tokens_until(stack, "better")
    request_id = stack.fake.opened[-1].request_id
    wait_until(lambda: request_id in stack.fake.cancelled, TIMEOUT)


def test_stop_string_in_completions_spanning_tokens(stack: Stack) -> None:
    stack.script(chunk_size=1)
    done = stack.client().completions.create(model="tiny", prompt="Zen", max_tokens=100,
                                             stop="🙂 —")
    assert done.choices[0].text == "Beautiful is better than ugly. Café "
    assert done.choices[0].finish_reason == "stop"


def test_piled_up_tokens_go_out_as_one_chunk(stack: Stack) -> None:
    stack.script(burst=True)  # every chunk is queued before the app reads any
    with httpx.stream("POST", stack.url + "/v1/chat/completions", timeout=TIMEOUT, json={
            "model": "tiny", "messages": MESSAGES, "stream": True}) as response:
        events = _sse_events(response)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": REPLY}, {}]


def test_slow_stream_many_chunks(stack: Stack) -> None:
    stack.script(delay_s=0.005)
    with httpx.stream("POST", stack.url + "/v1/completions", timeout=TIMEOUT, json={
            "model": "tiny", "prompt": "Zen", "max_tokens": 100, "stream": True}) as response:
        events = _sse_events(response)
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == REPLY
    assert len(texts) > 10  # tokens arrived one by one and went out as they came
    assert all("\ufffd" not in t for t in texts)


def test_byte_tokenizer_stack() -> None:
    tokenizer = ByteTokenizer()
    fake = FakeUpstream(models=["bytes"], script=Script(reply=list(REPLY.encode()),
                                                        stop_token=ByteTokenizer.EOS))
    server, _ = _start(fake, tokenizer)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=TIMEOUT)
        chunks = list(client.chat.completions.create(model="bytes", messages=MESSAGES,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
        assert fake.opened[-1].token_ids == tokenizer.render_chat(MESSAGES)
    finally:
        server.stop()


def test_vllms_chat_render_fields_shape_the_prompt(stack: Stack, tmp_path: Path) -> None:
    """`continue_final_message` (an assistant prefill the model goes on with),
    `add_generation_prompt` and `chat_template_kwargs` reach the template; what cannot mean
    anything is a 400 naming the field."""
    client = stack.client()
    prefill = [*MESSAGES, {"role": "assistant", "content": "Beautiful is"}]
    client.chat.completions.create(model="tiny", messages=prefill,  # type: ignore[arg-type]
                                   max_tokens=4, extra_body={"continue_final_message": True})
    sent = stack.fake.opened[-1].token_ids
    assert sent == stack.tokenizer.render_chat(prefill, RenderOptions(False, True))
    assert stack.tokenizer.decode(sent).endswith("assistant\n\nBeautiful is")
    client.chat.completions.create(model="tiny", messages=MESSAGES,  # type: ignore[arg-type]
                                   max_tokens=4, extra_body={"add_generation_prompt": False})
    assert stack.fake.opened[-1].token_ids == stack.tokenizer.render_chat(
        MESSAGES, RenderOptions(add_generation_prompt=False))
    for extra, param in (({"continue_final_message": True, "add_generation_prompt": True},
                          "continue_final_message"),
                         ({"chat_template_kwargs": {"messages": []}},
                          "chat_template_kwargs.messages"),
                         ({"chat_template_kwargs": "x"}, "chat_template_kwargs")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=MESSAGES,  # type: ignore
                                           max_tokens=4, extra_body=extra)
        assert refused.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:  # nothing to continue
        client.chat.completions.create(
            model="tiny", messages=[*MESSAGES, {"role": "assistant", "content": " "}],
            max_tokens=4, extra_body={"continue_final_message": True})
    assert refused.value.body["code"] == "invalid_chat_template"  # type: ignore[index]

    # A template that reads a variable (Qwen3's thinking switch) gets the request's.
    model = tmp_path / "model"
    shutil.copytree(cached_tiny_model(), model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}"
        "{% if reasoning_effort is defined %}[{{ reasoning_effort }}]{% endif %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>"
        "{% else %}<think>{% endif %}{% endif %}")
    thinking = HfTokenizer(model)
    fake = FakeUpstream(models=["tiny"], script=Script(reply=stack.reply_ids,
                                                       stop_token=stack.eos))
    server, _ = _start(fake, thinking)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=TIMEOUT)
        user = [{"role": "user", "content": "hi"}]
        # vLLM's reasoning_effort: the template's too, and thinking off for "none" unless
        # the request says otherwise.
        for extra, prompt in ((None, "hi<think>"),
                              ({"chat_template_kwargs": {"enable_thinking": False}},
                               "hi<think></think>"),
                              ({"reasoning_effort": "none"}, "hi[none]<think></think>"),
                              ({"reasoning_effort": "low"}, "hi[low]<think>"),
                              ({"reasoning_effort": "none", "chat_template_kwargs": {
                                  "enable_thinking": True}}, "hi[none]<think>")):
            client.chat.completions.create(model="tiny", messages=user,  # type: ignore
                                           max_tokens=4, extra_body=extra)
            assert fake.opened[-1].token_ids == thinking.encode(prompt, False)
    finally:
        server.stop()


# --- errors -----------------------------------------------------------------------------------

def _post(stack: Stack, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(stack.url + path, content=body, timeout=TIMEOUT, **kwargs)
    return httpx.post(stack.url + path, json=body, timeout=TIMEOUT, **kwargs)


def _error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    validate("ErrorResponse", body)
    return body["error"]


def test_bad_requests_over_http(stack: Stack) -> None:
    chat = "/v1/chat/completions"
    opened = len(stack.fake.opened)
    error = _error_of(_post(stack, chat, b"{not json"), 400)
    assert error["code"] == "invalid_json"
    error = _error_of(_post(stack, chat, {"model": "tiny", "messages": MESSAGES,
                                          "tools": [{"type": "function",
                                                     "function": {"name": "f"}}]}), 400)
    assert error["param"] == "tools" and "tools" in error["message"]
    error = _error_of(_post(stack, chat, {"model": "tiny", "messages": MESSAGES, "bogus": 1}), 400)
    assert error["param"] == "bogus"
    error = _error_of(_post(stack, "/v1/completions", {"model": "tiny", "prompt": "x",
                                                        "suffix": "y"}), 400)
    assert error["param"] == "suffix"
    error = _error_of(_post(stack, chat, {"model": "gpt-4o", "messages": MESSAGES}), 404)
    assert (error["code"], error["type"], error["param"]) == ("model_not_found",
                                                              "not_found_error", "model")
    assert len(stack.fake.opened) == opened  # nothing reached the upstream
    with pytest.raises(openai.NotFoundError):
        stack.client().chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore
    with pytest.raises(openai.BadRequestError):
        stack.client().chat.completions.create(model="tiny", messages=MESSAGES, n=129)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_not_declared_json_is_415(stack: Stack, path: str) -> None:
    body = ({"model": "tiny", "messages": MESSAGES, "max_tokens": 2} if "chat" in path
            else {"model": "tiny", "prompt": "x", "max_tokens": 2})
    raw = json.dumps(body).encode()
    opened = len(stack.fake.opened)
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data"):
        error = _error_of(_post(stack, path, raw, headers={"content-type": content_type}), 415)
        assert error["code"] == "unsupported_media_type" and content_type in error["message"]
        assert error["type"] == "invalid_request_error"
    assert len(stack.fake.opened) == opened
    # JSON however declared (or not declared at all) is served.
    for headers in ({"content-type": "application/json; charset=utf-8"},
                    {"content-type": "Application/JSON"},
                    {"content-type": "application/vnd.api+json"}, {}):
        response = _post(stack, path, raw, headers=headers)
        assert response.status_code == 200, (headers, response.text)


def test_context_length_exceeded(stack: Stack) -> None:
    long_text = "Beautiful is better than ugly. " * 200
    assert len(stack.tokenizer.encode(long_text)) > MAX_MODEL_LEN
    error = _error_of(_post(stack, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": long_text}]}), 400)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    # Which limit was hit, and the flag that raises it.
    assert f"{MAX_MODEL_LEN} tokens (the frontend's --max-model-len)" in error["message"]
    error = _error_of(_post(stack, "/v1/completions", {
        "model": "tiny", "prompt": "hi", "max_tokens": MAX_MODEL_LEN}), 400)
    assert error["param"] == "max_tokens"
    assert "(the frontend's --max-model-len)" in error["message"]


def test_long_prompt_is_tokenized_off_the_loop(stack: Stack) -> None:
    long_text = "Simple is better than complex. " * 70  # > 2k characters, < 1024 tokens
    assert len(long_text) > 2048
    stack.script(reply=stack.reply_ids[:3])
    done = stack.client().completions.create(model="tiny", prompt=long_text, max_tokens=10)
    assert done.usage is not None
    assert done.usage.prompt_tokens == len(stack.tokenizer.encode(long_text))
    assert stack.fake.opened[-1].token_ids == stack.tokenizer.encode(long_text)


def test_no_workers(stack: Stack) -> None:
    stack.fake.no_workers = True
    error = _error_of(_post(stack, "/v1/chat/completions", {"model": "tiny",
                                                            "messages": MESSAGES}), 503)
    assert error["type"] == "service_unavailable"
    assert httpx.get(stack.url + "/health", timeout=TIMEOUT).status_code == 200
    stack.fake.models = []
    _error_of(_post(stack, "/v1/completions", {"model": "tiny", "prompt": "x"}), 503)
    assert httpx.get(stack.url + "/health", timeout=TIMEOUT).status_code == 503
    assert httpx.get(stack.url + "/v1/models", timeout=TIMEOUT).json()["data"] == []


def test_upstream_error_before_first_token_sets_status(stack: Stack) -> None:
    stack.script(error_at_chunk=0, error_code=503, error_message="worker died")
    for stream in (False, True):
        response = _post(stack, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES,
                                                         "stream": stream})
        error = _error_of(response, 503)
        assert error["message"] == "worker died"
    stack.script(error_at_chunk=3, error_code=400, error_message="too long for the engine")
    error = _error_of(_post(stack, "/v1/completions", {"model": "tiny", "prompt": "x",
                                                       "max_tokens": 50}), 400)
    assert error["message"] == "too long for the engine"


def test_upstream_error_mid_stream_is_an_event(stack: Stack) -> None:
    stack.script(error_at_chunk=5, error_code=500, delay_s=0.002)
    with httpx.stream("POST", stack.url + "/v1/chat/completions", timeout=TIMEOUT, json={
            "model": "tiny", "messages": MESSAGES, "stream": True}) as response:
        assert response.status_code == 200
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    validate("ErrorResponse", events[-2])
    assert events[-2]["error"]["message"] == "engine exploded"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == stack.tokenizer.decode(stack.reply_ids[:5])
    with pytest.raises(openai.APIError):
        list(stack.client().chat.completions.create(model="tiny", messages=MESSAGES,
                                                    stream=True))


def test_a_response_failing_mid_stream_ends_with_response_failed(stack: Stack) -> None:
    """The Responses API's own end of a failed stream: `response.failed` carrying the text so
    far and the error, as the openai client's event types read it."""
    stack.script(error_at_chunk=5, error_code=500, delay_s=0.002)
    with httpx.stream("POST", stack.url + "/v1/responses", timeout=TIMEOUT, json={
            "model": "tiny", "input": "Zen", "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    failed = events[-1]
    validate("ResponseFailedEvent", failed)
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error",
                                           "message": "engine exploded"}
    text = stack.tokenizer.decode(stack.reply_ids[:5])
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") \
        == text
    item = failed["response"]["output"][0]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == text
    kinds = [event.type for event in stack.client().responses.create(
        model="tiny", input="Zen", stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.failed"


@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_in_output_keeps_what_stopped_it(stack: Stack, stream: bool) -> None:
    """vLLM's `include_stop_str_in_output`: the stop string that ended the text stays in it, as
    does a `stop_token_ids` token's text (hidden without it)."""
    client = stack.client()
    stop_token = stack.reply_ids[3]

    def text(**extra: Any) -> str:
        kwargs: dict[str, Any] = {"model": "tiny", "prompt": "Zen", "max_tokens": 100}
        kwargs.update(extra)
        if not stream:
            return client.completions.create(**kwargs).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(stream=True,
                                                                            **kwargs)
                       if c.choices)

    assert text(stop=["better"]) == REPLY[:REPLY.index("better")]
    assert text(stop=["better"], extra_body={"include_stop_str_in_output": True}) == \
        REPLY[:REPLY.index("better") + len("better")]
    shown = stack.tokenizer.decode(stack.reply_ids[:4])
    assert shown != stack.tokenizer.decode(stack.reply_ids[:3])  # the stop token shows text
    stack.script(reply=stack.reply_ids[:3], stop_token=stop_token)  # the engine stops on it
    assert text(extra_body={"stop_token_ids": [stop_token]}) == \
        stack.tokenizer.decode(stack.reply_ids[:3])
    assert text(extra_body={"stop_token_ids": [stop_token],
                            "include_stop_str_in_output": True}) == shown


def test_tags_a_model_makes_special_tokens_are_still_read(tmp_path: Path) -> None:
    """Thinking and tool-call tags that the tokenizer makes special tokens (as GLM's does)
    are read as vLLM reads them, with the reply's special tokens kept in its text: the
    thinking ends and the call is one, even when the request asks to skip specials."""
    model = tmp_path / "model"
    shutil.copytree(cached_tiny_model(), model)
    raw = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    raw.add_special_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>"])
    raw.save(str(model / "tokenizer.json"))
    tokenizer = HfTokenizer(model)
    reply = tokenizer.encode('<think>Look it up.</think><tool_call>{"name": "f", "arguments": '
                             '{"x": 1}}</tool_call>', add_special_tokens=False)
    assert tokenizer._tokenizer.token_to_id("</think>") in reply
    fake = FakeUpstream(models=["tiny"], script=Script(
        reply=reply, stop_token=tokenizer._tokenizer.token_to_id(EOT)))
    server, _ = _start(fake, tokenizer, tool_call_parser="hermes", reasoning_parser="qwen3")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=TIMEOUT)
        tools: Any = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        for extra in (None, {"skip_special_tokens": True}):
            done = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                  tools=tools, extra_body=extra)
            message = done.choices[0].message
            assert (message.model_extra or {}).get("reasoning") == "Look it up."
            assert [(c.function.name, c.function.arguments)
                    for c in message.tool_calls or ()] == [("f", '{"x": 1}')]
            assert not message.content and done.choices[0].finish_reason == "tool_calls"
        # Without tools the thinking still ends at its tag; the rest is the answer.
        answer = client.chat.completions.create(model="tiny", messages=MESSAGES).choices[0]
        assert answer.message.content == tokenizer._tokenizer.decode(
            reply[reply.index(tokenizer._tokenizer.token_to_id("</think>")) + 1:],
            skip_special_tokens=False)
    finally:
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_skip_special_tokens_false_shows_generated_specials(stack: Stack, stream: bool) -> None:
    """vLLM's `skip_special_tokens: false`: a special token the model generates shows as its
    text, in chat and completions; the stop token that ended the text still does not."""
    header = stack.tokenizer._tokenizer.token_to_id("<|start_header_id|>")
    hello = stack.tokenizer.encode("Hello", add_special_tokens=False)
    world = stack.tokenizer.encode(" world 🙂", add_special_tokens=False)
    stack.script(reply=[*hello, header, *world[:-1], header, world[-1]])  # then EOT, the stop
    client = stack.client()

    def texts(**extra: Any) -> list[str]:
        if not stream:
            chat = client.chat.completions.create(model="tiny", messages=MESSAGES, **extra)
            comp = client.completions.create(model="tiny", prompt="Zen", max_tokens=100, **extra)
            return [chat.choices[0].message.content or "", comp.choices[0].text]
        chat_text = "".join(c.choices[0].delta.content or "" for c in
                            client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                           stream=True, **extra) if c.choices)
        comp_text = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="Zen", max_tokens=100, stream=True, **extra) if c.choices)
        return [chat_text, comp_text]

    plain = "Hello world 🙂"
    assert texts() == [plain] * 2
    assert texts(extra_body={"skip_special_tokens": True}) == [plain] * 2
    # The emoji's bytes were cut by a special: its first part cannot be a character.
    shown = stack.tokenizer._tokenizer.decode([*hello, header, *world[:-1], header, world[-1]],
                                              skip_special_tokens=False)
    assert shown.startswith("Hello<|start_header_id|> world ") and shown.count("<|") == 2
    assert texts(extra_body={"skip_special_tokens": False}) == [shown] * 2


def test_return_token_ids_whole_and_streamed(stack: Stack) -> None:
    """vLLM's `return_token_ids`: the prompt's ids and each choice's output ids (its stop token
    too; with a stop string, up to the token that completed it, as usage counts), whole or
    streamed (the prompt's in each choice's first event, the output's as deltas)."""
    tok, eos = stack.tokenizer, stack.eos
    reply = [*stack.reply_ids, eos]
    url = stack.url + "/v1/completions"
    whole = httpx.post(url, timeout=TIMEOUT, json={
        "model": "tiny", "prompt": ["Zen", "Python"], "n": 2, "max_tokens": 200,
        "return_token_ids": True}).json()
    validate("CreateCompletionResponse", whole)
    prompts = [tok.encode("Zen"), tok.encode("Python")]
    assert [c["prompt_token_ids"] for c in whole["choices"]] == [prompts[i // 2]
                                                                 for i in range(4)]
    assert [c["token_ids"] for c in whole["choices"]] == [reply] * 4
    assert whole["usage"]["completion_tokens"] == 4 * len(reply)
    with httpx.stream("POST", url, timeout=TIMEOUT, json={
            "model": "tiny", "prompt": ["Zen", "Python"], "n": 2, "max_tokens": 200,
            "stream": True, "return_token_ids": True}) as response:
        events = _sse_events(response)[:-1]
    for index in range(4):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert mine[0]["prompt_token_ids"] == prompts[index // 2] and mine[0]["text"] == ""
        assert all("prompt_token_ids" not in c for c in mine[1:])
        assert [t for c in mine for t in c["token_ids"]] == reply
        assert "".join(c["text"] for c in mine) == REPLY
    stopped = httpx.post(url, timeout=TIMEOUT, json={
        "model": "tiny", "prompt": "Zen", "max_tokens": 200, "stop": ["better"],
        "return_token_ids": True}).json()["choices"][0]
    assert tok.decode(stopped["token_ids"]).endswith("better")
    assert stopped["text"] == REPLY[:REPLY.index("better")]
    plain = httpx.post(url, timeout=TIMEOUT, json={"model": "tiny", "prompt": "Zen"}).json()
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]

    chat_url = stack.url + "/v1/chat/completions"
    chat = httpx.post(chat_url, timeout=TIMEOUT, json={
        "model": "tiny", "messages": MESSAGES, "n": 2, "return_token_ids": True}).json()
    validate("CreateChatCompletionResponse", chat)
    assert chat["prompt_token_ids"] == tok.render_chat(MESSAGES)
    assert [c["token_ids"] for c in chat["choices"]] == [reply] * 2
    with httpx.stream("POST", chat_url, timeout=TIMEOUT, json={
            "model": "tiny", "messages": MESSAGES, "stream": True,
            "return_token_ids": True}) as response:
        events = _sse_events(response)[:-1]
    assert events[0]["prompt_token_ids"] == tok.render_chat(MESSAGES)
    assert all("prompt_token_ids" not in e for e in events[1:])
    choices = [e["choices"][0] for e in events]
    assert [t for c in choices for t in c.get("token_ids", [])] == reply
    assert "".join(c["delta"].get("content") or "" for c in choices) == REPLY


def test_truncate_prompt_tokens_keeps_the_prompts_end(stack: Stack) -> None:
    """vLLM's `truncate_prompt_tokens`: the engine gets the prompt's last k tokens, usage and
    echo count and show those; -1 keeps what the context holds; 0 or more than the context
    is a 400 naming it."""
    tok = stack.tokenizer
    full = tok.encode("Beautiful is better than ugly. Explicit is better than implicit.")
    done = stack.client().completions.create(model="tiny", prompt=[full, full[:2]],
                                             max_tokens=4, echo=True,
                                             extra_body={"truncate_prompt_tokens": 5})
    assert [r.token_ids for r in stack.fake.opened[-2:]] == [full[-5:], full[:2]]
    assert done.usage is not None and done.usage.prompt_tokens == 5 + 2
    assert done.choices[0].text.startswith(tok.decode(full[-5:]))
    chat = stack.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4,  # type: ignore[arg-type]
        extra_body={"truncate_prompt_tokens": 3})
    assert stack.fake.opened[-1].token_ids == tok.render_chat(MESSAGES)[-3:]
    assert chat.usage is not None and chat.usage.prompt_tokens == 3
    stack.client().completions.create(model="tiny", prompt=[full], max_tokens=4,
                                      extra_body={"truncate_prompt_tokens": -1})
    assert stack.fake.opened[-1].token_ids == full
    for keep in (0, MAX_MODEL_LEN + 1, -2):
        with pytest.raises(openai.BadRequestError) as refused:
            stack.client().completions.create(model="tiny", prompt="Zen", max_tokens=4,
                                              extra_body={"truncate_prompt_tokens": keep})
        assert refused.value.body["param"] == "truncate_prompt_tokens"  # type: ignore[index]


def test_tokenize_and_detokenize_as_vllm_answers(stack: Stack) -> None:
    """POST /tokenize (a prompt, or messages through the template) and /detokenize: the ids
    a completion would send, the context length, the text back; bad bodies a 400 naming the
    field."""
    tok = stack.tokenizer
    url = stack.url
    answer = httpx.post(url + "/tokenize", timeout=TIMEOUT,
                        json={"model": "tiny", "prompt": "Beautiful is better"}).json()
    assert answer == {"count": len(tok.encode("Beautiful is better")),
                      "max_model_len": MAX_MODEL_LEN, "tokens": tok.encode("Beautiful is better")}
    bare = httpx.post(url + "/tokenize", timeout=TIMEOUT,
                      json={"prompt": "Beautiful", "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode("Beautiful", False)
    chat = httpx.post(url + "/tokenize", timeout=TIMEOUT, json={
        "model": "tiny", "messages": MESSAGES, "add_generation_prompt": False}).json()
    assert chat["tokens"] == tok.render_chat(MESSAGES, RenderOptions(add_generation_prompt=False))
    # The same ids a chat completion sends.
    stack.client().chat.completions.create(model="tiny", messages=MESSAGES,  # type: ignore
                                           max_tokens=2)
    assert httpx.post(url + "/tokenize", timeout=TIMEOUT, json={
        "messages": MESSAGES}).json()["tokens"] == stack.fake.opened[-1].token_ids
    back = httpx.post(url + "/detokenize", timeout=TIMEOUT,
                      json={"model": "tiny", "tokens": answer["tokens"]}).json()
    assert back == {"prompt": "Beautiful is better"}
    for path, body, status, param in (
            ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, "prompt"),
            ("/tokenize", {}, 400, "prompt"),
            ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, 400,
             "add_generation_prompt"),
            ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True}, 400,
             "add_special_tokens"),
            ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
            ("/tokenize", {"prompt": "x", "bogus": 1}, 400, "bogus"),
            ("/detokenize", {"tokens": [tok.vocab_size]}, 400, "tokens"),
            ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]")):
        response = httpx.post(url + path, timeout=TIMEOUT, json=body)
        assert response.status_code == status, (path, body, response.text)
        assert response.json()["error"]["param"] == param, (path, body)
    assert httpx.get(url + "/tokenize", timeout=TIMEOUT).status_code == 405


def test_choices_are_separate_generations_numbered_in_order(stack: Stack) -> None:
    opened = len(stack.fake.opened)
    finished = {"model": "tiny", "endpoint": "completions", "stream": "false", "status": "200"}
    answered = _metric(stack, "turnout_frontend_requests_total", **finished)
    done = stack.client().completions.create(model="tiny", prompt=["a", "bb"], n=2, seed=7,
                                             max_tokens=200, stop=["better"])
    validate("CreateCompletionResponse", done.to_dict())
    sent = stack.fake.opened[opened:]
    a, bb = (stack.tokenizer.encode(p, True) for p in ("a", "bb"))
    # Each prompt's first completion opens at once, its second after the first's first token.
    assert [(r.token_ids, r.sampling.seed) for r in sent[:2]] == [(a, 7), (bb, 7)]
    # Seeded choices differ from one another; the request as a whole repeats.
    assert sorted((r.token_ids, r.sampling.seed) for r in sent[2:]) == [(a, 8), (bb, 8)]
    assert len({r.request_id for r in sent}) == 4
    # Every choice stops at the stop string on its own, and its generation is aborted there.
    assert [c.text for c in done.choices] == [REPLY[:REPLY.index("better")]] * 4
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.usage is not None and done.usage.prompt_tokens == len(a) + len(bb)
    # The body can reach the client before the frontend records the request: the counters
    # below must not move under the second request's feet.
    wait_until(lambda: _metric(stack, "turnout_frontend_requests_total", **finished)
               == answered + 1)
    stack.script(cached_tokens=4)
    counters = ("turnout_frontend_input_tokens_total", "turnout_frontend_cached_tokens_total",
                "turnout_frontend_output_tokens_total")
    before = [_metric(stack, name, model="tiny") for name in counters]
    unseeded = stack.client().chat.completions.create(model="tiny", messages=MESSAGES, n=3)
    assert [r.sampling.seed for r in stack.fake.opened[-3:]] == [None] * 3
    assert len(unseeded.choices) == 3
    usage = unseeded.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 4  # the prompt's, counted once
    # The metrics count what usage reports (once the request is recorded, just after its
    # last byte left).
    expected = [usage.prompt_tokens, 4, usage.completion_tokens]
    wait_until(lambda: [_metric(stack, name, model="tiny") - b for name, b in zip(
        counters, before, strict=True)] == expected)


def test_a_cache_salt_and_a_priority_go_with_every_generation_of_the_request(stack: Stack) -> None:
    stack.script()
    opened = len(stack.fake.opened)
    stack.client().chat.completions.create(model="tiny", messages=MESSAGES, n=2,
                                           extra_body={"cache_salt": "tenant-a"})
    stack.client().completions.create(model="tiny", prompt=["a", "b"],
                                      extra_body={"cache_salt": "tenant-b"})
    stack.client().responses.create(model="tiny", input="hi",
                                    extra_body={"cache_salt": "tenant-c"})
    stack.client().completions.create(model="tiny", prompt="a", extra_body={"priority": -3})
    assert [r.cache_salt for r in stack.fake.opened[opened:]] == [
        "tenant-a", "tenant-a", "tenant-b", "tenant-b", "tenant-c", ""]
    stack.client().responses.create(model="tiny", input="hi", extra_body={"priority": 4})
    # vLLM's x-vllm-priority header, when sent, is the priority.
    stack.client().completions.create(model="tiny", prompt="a", extra_body={"priority": 4},
                                      extra_headers={"x-vllm-priority": "-7"})
    assert [r.priority for r in stack.fake.opened[opened:]] == [0] * 5 + [-3, 4, -7]
    error = _error_of(_post(stack, "/v1/completions", {"model": "tiny", "prompt": "a"},
                            headers={"x-vllm-priority": "high"}), 400)
    assert error["param"] == "x-vllm-priority"
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}),
                       ("/v1/completions", {"prompt": "a"}), ("/v1/responses", {"input": "a"})):
        error = _error_of(_post(stack, path, {"model": "tiny", "cache_salt": "", **body}), 400)
        assert error["param"] == "cache_salt", path
        error = _error_of(_post(stack, path, {"model": "tiny", "cache_salt": 7, **body}), 400)
        assert error["param"] == "cache_salt", path


def test_one_failing_choice_fails_the_request_and_aborts_the_others(stack: Stack) -> None:
    stack.script(reply=stack.reply_ids * 20, delay_s=0.01, error_at_chunk=4, failing_request=1)
    opened = len(stack.fake.opened)
    with httpx.stream("POST", stack.url + "/v1/chat/completions", timeout=TIMEOUT, json={
            "model": "tiny", "messages": MESSAGES, "stream": True, "n": 3}) as response:
        assert response.status_code == 200
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    validate("ErrorResponse", events[-2])
    assert {e["choices"][0]["index"] for e in events[:-2]} == {0, 1, 2}
    others = [stack.fake.opened[opened].request_id, stack.fake.opened[opened + 2].request_id]
    wait_until(lambda: all(r in stack.fake.cancelled for r in others), TIMEOUT)

    # A prompt's other completions wait for its first one's first token: it never comes here.
    stack.script(error_at_chunk=0, failing_request=0, error_code=503, error_message="no way")
    opened = len(stack.fake.opened)
    _error_of(_post(stack, "/v1/completions", {"model": "tiny", "prompt": "x", "n": 3}), 503)
    assert len(stack.fake.opened) == opened + 1

    stack.script(reply=stack.reply_ids * 20, delay_s=0.01, error_at_chunk=4, failing_request=2,
                 error_code=503, error_message="worker died")
    opened = len(stack.fake.opened)
    error = _error_of(_post(stack, "/v1/completions", {"model": "tiny", "prompt": "x", "n": 3,
                                                       "max_tokens": 300}), 503)
    assert error["message"] == "worker died"
    others = [r.request_id for r in stack.fake.opened[opened:opened + 2]]
    wait_until(lambda: all(r in stack.fake.cancelled for r in others), TIMEOUT)


def test_disconnect_cancels_every_choice(stack: Stack) -> None:
    stack.script(reply=stack.reply_ids * 20, delay_s=0.02)
    opened = len(stack.fake.opened)
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
            "POST", stack.url + "/v1/completions",
            json={"model": "tiny", "prompt": ["x", "y"], "stream": True,
                  "max_tokens": 1000}) as response:
        assert next(response.iter_lines()).startswith("data: ")
    ids = [r.request_id for r in stack.fake.opened[opened:]]
    assert len(ids) == 2
    wait_until(lambda: all(r in stack.fake.cancelled for r in ids), TIMEOUT)


def test_routes(stack: Stack) -> None:
    get = lambda path: httpx.get(stack.url + path, timeout=TIMEOUT)  # noqa: E731
    assert get("/health").json() == {"status": "ok"}
    assert get("/live").status_code == 200
    response = get("/nope")
    assert response.status_code == 404 and "error" in response.json()
    response = get("/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert httpx.delete(stack.url + "/v1/models", timeout=TIMEOUT).status_code == 405


def test_direct_routing_header(stack: Stack) -> None:
    _post(stack, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2},
          headers={"x-worker-instance-id": "worker-7"}).raise_for_status()
    assert stack.fake.opened[-1].target_worker == "worker-7"
    _post(stack, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert stack.fake.opened[-1].target_worker is None


# --- client disconnects -----------------------------------------------------------------------

def test_disconnect_mid_stream_cancels(stack: Stack) -> None:
    stack.script(reply=stack.reply_ids * 20, delay_s=0.02)
    before = _metric(stack, "turnout_frontend_client_disconnects_total", model="tiny")
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
            "POST", stack.url + "/v1/chat/completions",
            json={"model": "tiny", "messages": MESSAGES, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        request_id = stack.fake.opened[-1].request_id
    # Leaving both blocks closed the connection.
    wait_until(lambda: request_id in stack.fake.cancelled, TIMEOUT)
    wait_until(lambda: _metric(stack, "turnout_frontend_client_disconnects_total",
                               model="tiny") == before + 1, TIMEOUT)


def test_disconnect_while_waiting_for_whole_answer_cancels(stack: Stack) -> None:
    stack.script(reply=stack.reply_ids, delay_s=1.0)  # the answer would take over a minute
    opened = len(stack.fake.opened)
    body = json.dumps({"model": "tiny", "messages": MESSAGES}).encode()
    with socket.create_connection(("127.0.0.1", stack.server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: len(stack.fake.opened) > opened, TIMEOUT)
    request_id = stack.fake.opened[-1].request_id
    wait_until(lambda: request_id in stack.fake.cancelled, TIMEOUT)


def test_metrics_after_traffic(stack: Stack) -> None:
    stack.script()
    rejected = _metric(stack, "turnout_frontend_rejections_total", reason="model_not_found")
    _error_of(_post(stack, "/v1/chat/completions", {"model": "x", "messages": MESSAGES}), 404)
    stack.client().chat.completions.create(model="tiny", messages=MESSAGES)
    text = httpx.get(stack.url + "/metrics", timeout=TIMEOUT).text
    for name in ("turnout_frontend_requests_total", "turnout_frontend_time_to_first_token_seconds",
                 "turnout_frontend_inter_token_latency_seconds",
                 "turnout_frontend_request_duration_seconds", "turnout_frontend_input_tokens_total",
                 "turnout_frontend_output_tokens_total", "turnout_frontend_cached_tokens_total",
                 "turnout_frontend_active_requests", "turnout_frontend_client_disconnects_total",
                 "turnout_frontend_rejections_total"):
        assert name in text
    ok = _metric(stack, "turnout_frontend_requests_total", model="tiny", endpoint="chat",
                 stream="false", status="200")
    assert ok >= 1
    assert _metric(stack, "turnout_frontend_time_to_first_token_seconds_count", model="tiny") >= 1
    assert _metric(stack, "turnout_frontend_output_tokens_total", model="tiny") >= len(
        stack.reply_ids)
    assert _metric(stack, "turnout_frontend_rejections_total",
                   reason="model_not_found") == rejected + 1
    wait_until(lambda: _metric(stack, "turnout_frontend_active_requests", model="tiny") == 0,
               TIMEOUT)


# --- configurations ---------------------------------------------------------------------------

def test_served_model_name_alias(tiny: HfTokenizer) -> None:
    fake = FakeUpstream(models=["/models/tiny"], script=Script(reply=[40, 41]))
    server, _ = _start(fake, tiny, served_model_name="public-tiny")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=TIMEOUT)
        assert [m.id for m in client.models.list().data] == ["public-tiny"]
        done = client.completions.create(model="public-tiny", prompt="x", max_tokens=5)
        assert done.model == "public-tiny"
        assert fake.opened[-1].model == "/models/tiny"
    finally:
        server.stop()


def test_api_key(tiny: HfTokenizer) -> None:
    fake = FakeUpstream(models=["tiny"], script=Script(reply=[40, 41]))
    server, _ = _start(fake, tiny, api_key="sekrit")
    try:
        url = server.url
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0,
                               timeout=TIMEOUT)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
        _error_of(httpx.get(url + "/v1/models", timeout=TIMEOUT), 401)
    finally:
        server.stop()


def test_context_length_from_upstream(tiny: HfTokenizer) -> None:
    fake = FakeUpstream(models=["tiny"])
    app = FrontendApp(fake, tiny, None, 0, FrontendMetrics())
    assert app.context_length("tiny") == FALLBACK_MAX_MODEL_LEN
    assert "no worker reports one" in app.context_length_source("tiny")
    fake.max_model_len_by_model["tiny"] = 64
    assert app.context_length("tiny") == 64
    assert "workers' --max-model-len" in app.context_length_source("tiny")
    assert FrontendApp(fake, tiny, None, 128, FrontendMetrics()).context_length("tiny") == 128


def test_many_concurrent_streams(stack: Stack) -> None:
    import asyncio

    stack.script(chunk_size=2, delay_s=0.001)

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"question {i}"}], stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0,
                                    timeout=TIMEOUT)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(32)))
        finally:
            await client.close()

    started = time.monotonic()
    assert asyncio.run(main()) == [REPLY] * 32
    assert time.monotonic() - started < TIMEOUT


class _Fragile(ByteTokenizer):
    """A tokenizer whose detokenizer breaks on its third step: a bug inside the frontend."""

    def new_detokenizer(self, skip_special: bool = True) -> Any:
        inner = super().new_detokenizer(skip_special)
        steps = [0]

        class Broken:
            def step(self, ids: list[int]) -> str:
                steps[0] += 1
                if steps[0] == 3:
                    raise RuntimeError("boom")
                return inner.step(ids)

            def flush(self) -> str:
                return inner.flush()

        return Broken()


def test_internal_failure_is_reported_and_cancels() -> None:
    fake = FakeUpstream(models=["bytes"], script=Script(reply=list(REPLY.encode()),
                                                        delay_s=0.005))
    server, _ = _start(fake, _Fragile())
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=TIMEOUT, json={
                "model": "bytes", "messages": MESSAGES, "stream": True}) as response:
            assert response.status_code == 200
            events = _sse_events(response)
        assert events[-1] == "[DONE]"
        validate("ErrorResponse", events[-2])
        assert events[-2]["error"]["type"] == "internal_error"
        wait_until(lambda: fake.opened[-1].request_id in fake.cancelled, TIMEOUT)

        response = httpx.post(server.url + "/v1/completions", timeout=TIMEOUT, json={
            "model": "bytes", "prompt": "x", "max_tokens": 50})
        assert _error_of(response, 500)["type"] == "internal_error"
        wait_until(lambda: fake.opened[-1].request_id in fake.cancelled, TIMEOUT)
    finally:
        server.stop()


def test_stop_token_ids_are_counted_not_shown(stack: Stack) -> None:
    bang = stack.tokenizer.encode("!", add_special_tokens=False)
    assert len(bang) == 1
    stack.script(stop_token=bang[0])  # the engine stops on it, as asked below
    done = stack.client().chat.completions.create(
        model="tiny", messages=MESSAGES, extra_body={"stop_token_ids": bang})
    assert stack.fake.opened[-1].sampling.stop_token_ids == bang
    assert done.choices[0].message.content == REPLY
    assert done.usage is not None and done.usage.completion_tokens == len(stack.reply_ids) + 1
