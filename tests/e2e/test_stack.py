"""The whole stack as separate processes: frontend → router → mocker workers, through `openai`."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from typing import Any

import httpx
import msgspec
import openai
import pytest
import zmq

from common.fleet_keys import load as load_keys
from common.messages import (
    KIND_CANCEL,
    KIND_GENERATE,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    EventEnvelope,
    Heartbeat,
    encoder,
)
from tests.openapi_spec import validate
from turnout.testing.deployment import Deployment, wait_for

pytestmark = pytest.mark.e2e

FAST = ("--speedup-ratio", "0")


def client(dep: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=dep.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def worker_requests(dep: Deployment, worker_id: str) -> float:
    return dep.metrics_of(worker_id).value("turnout_worker_prompt_tokens_total")


def test_openai_sdk_chat_completions_models_and_usage(deployment: Deployment) -> None:
    deployment.start(workers=2, worker_args=FAST)
    oai = client(deployment)

    models = oai.models.list()
    assert [m.id for m in models.data] == ["mock"]
    validate("ListModelsResponse", httpx.get(deployment.url + "/v1/models").json())

    chat = oai.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "Say something."}], max_tokens=20,
        extra_body={"ignore_eos": True})
    validate("CreateChatCompletionResponse", chat.model_dump(mode="json", exclude_unset=True))
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 20
    # The built-in byte tokenizer: one printable ASCII character per generated token.
    assert len(chat.choices[0].message.content or "") == 20
    assert chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 20

    stream = oai.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "Say something."}], max_tokens=20,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json",
                                                                        exclude_unset=True))
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == len(text) == 20
    # Deterministic engine: the same prompt gives the same text on any worker.
    assert text == chat.choices[0].message.content
    # vLLM's continuous_usage_stats: each chunk's usage counts the tokens streamed so far.
    counted, running = 0, []
    for chunk in oai.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "Say something."}],
            max_tokens=20, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True,
                            "continuous_usage_stats": True}):  # type: ignore[typeddict-unknown-key]
        assert chunk.usage is not None
        if chunk.choices:
            counted += len(chunk.choices[0].delta.content or "")  # a token per character
            assert chunk.usage.completion_tokens == counted
        running.append(chunk.usage)
    assert counted == 20 and running[-1] == usage and running[0].completion_tokens == 0
    # The second identical prompt hits the prefix cache of whichever worker served it... or not,
    # with round-robin; cached_tokens is reported either way.
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None

    comp = oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=12,
                                  extra_body={"ignore_eos": True})
    validate("CreateCompletionResponse", comp.model_dump(mode="json", exclude_unset=True))
    assert comp.usage is not None and comp.usage.completion_tokens == 12
    assert comp.usage.prompt_tokens == len("Once upon a time") + 1  # + BOS
    streamed = ""
    for chunk in oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=12,
                                        stream=True, extra_body={"ignore_eos": True}):
        validate("CreateCompletionStreamResponse",
                 chunk.model_dump(mode="json", exclude_unset=True))
        streamed += chunk.choices[0].text if chunk.choices else ""
    assert streamed == comp.choices[0].text


def test_several_choices_and_batched_prompts(deployment: Deployment) -> None:
    """n and a batch of prompts: each completion a generation of its own at the engines, every
    choice numbered as vLLM numbers them (prompt i's j-th at i * n + j), one usage for all."""
    deployment.start(workers=2, worker_args=FAST)
    oai = client(deployment)
    messages = [{"role": "user", "content": "Say something."}]
    one = oai.chat.completions.create(model="mock", messages=messages, max_tokens=8,
                                      extra_body={"ignore_eos": True})
    three = oai.chat.completions.create(model="mock", messages=messages, max_tokens=8, n=3,
                                        extra_body={"ignore_eos": True})
    validate("CreateChatCompletionResponse", three.model_dump(mode="json", exclude_unset=True))
    assert [c.index for c in three.choices] == [0, 1, 2]
    # The mocker's tokens depend only on the prompt: every choice is the single request's text.
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert one.usage is not None and three.usage is not None
    assert (three.usage.prompt_tokens, three.usage.completion_tokens) == (
        one.usage.prompt_tokens, 24)

    prompts = ["Once upon a time", "In a hole in the ground"]
    singles = [oai.completions.create(model="mock", prompt=p, max_tokens=6,
                                      extra_body={"ignore_eos": True}) for p in prompts]
    workers = [w.name for w in deployment.workers()]
    before = sum(worker_requests(deployment, w) for w in workers)
    batch = oai.completions.create(model="mock", prompt=prompts, n=2, max_tokens=6,
                                   extra_body={"ignore_eos": True})
    validate("CreateCompletionResponse", batch.model_dump(mode="json", exclude_unset=True))
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [singles[0].choices[0].text] * 2 + \
        [singles[1].choices[0].text] * 2
    assert batch.usage is not None
    prompt_tokens = sum(len(p) + 1 for p in prompts)  # + BOS each
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (prompt_tokens, 24)
    # Four generations reached the engines, each with its whole prompt.
    wait_for(lambda: sum(worker_requests(deployment, w) for w in workers) - before
             == 2 * prompt_tokens, 10, "the workers to count four prompts")

    texts = ["", "", "", ""]
    finishes: dict[int, str] = {}
    usage = None
    for chunk in oai.completions.create(model="mock", prompt=prompts, n=2, max_tokens=6,
                                        stream=True, stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True}):
        validate("CreateCompletionStreamResponse",
                 chunk.model_dump(mode="json", exclude_unset=True))
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                assert choice.index not in finishes
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert texts == [c.text for c in batch.choices]
    assert finishes == {0: "length", 1: "length", 2: "length", 3: "length"}
    assert usage is not None and usage.completion_tokens == 24

    roles, contents = set(), ["", ""]
    for chunk in oai.chat.completions.create(model="mock", messages=messages, max_tokens=8, n=2,
                                             stream=True, extra_body={"ignore_eos": True}):
        validate("CreateChatCompletionStreamResponse",
                 chunk.model_dump(mode="json", exclude_unset=True))
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            contents[choice.index] += choice.delta.content or ""
    assert roles == {0, 1}
    assert contents == [one.choices[0].message.content] * 2

    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="mock", prompt=["x"] * 65, n=2, max_tokens=1)
    assert "at most 128" in str(info.value)


def test_logprobs_through_the_stack(deployment: Deployment) -> None:
    """Each shown token's logprob and its top alternatives, from the engine through the
    router to the client: one entry per completion token, the same streamed or whole, for
    every choice; a stop string ends them with the token that completed it."""
    deployment.start(workers=2, worker_args=FAST)
    oai = client(deployment)
    messages = [{"role": "user", "content": "Say something."}]
    chat = oai.chat.completions.create(model="mock", messages=messages, max_tokens=12, n=2,
                                       logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    validate("CreateChatCompletionResponse", chat.model_dump(mode="json", exclude_unset=True))
    for choice in chat.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        content = choice.logprobs.content
        assert len(content) == 12
        assert "".join(c.token for c in content) == choice.message.content
        assert b"".join(bytes(c.bytes or []) for c in content).decode() == choice.message.content
        for entry in content:
            values = [t.logprob for t in entry.top_logprobs]
            assert len(values) == 3 and values == sorted(values, reverse=True)
            assert entry.logprob <= 0 and entry.top_logprobs[0].token == entry.token
    assert chat.choices[0].logprobs == chat.choices[1].logprobs  # the same text, the same
    streamed: list[object] = []
    for chunk in oai.chat.completions.create(model="mock", messages=messages, max_tokens=12,
                                             logprobs=True, top_logprobs=3, stream=True,
                                             extra_body={"ignore_eos": True}):
        validate("CreateChatCompletionStreamResponse",
                 chunk.model_dump(mode="json", exclude_unset=True))
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert streamed == chat.choices[0].logprobs.content
    per_choice: list[list[object]] = [[], []]
    for chunk in oai.chat.completions.create(model="mock", messages=messages, max_tokens=12,
                                             n=2, logprobs=True, top_logprobs=3, stream=True,
                                             extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                per_choice[choice.index] += choice.logprobs.content or []
    assert per_choice == [chat.choices[0].logprobs.content] * 2

    whole = oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=10,
                                   logprobs=0, extra_body={"ignore_eos": True})
    validate("CreateCompletionResponse", whole.model_dump(mode="json", exclude_unset=True))
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.top_logprobs is not None
    assert "".join(lp.tokens) == whole.choices[0].text and lp.text_offset == list(range(10))
    assert [list(top.values()) for top in lp.top_logprobs] == [[v] for v in lp.token_logprobs
                                                               or []]
    text = whole.choices[0].text
    stop = text[4:6]
    cut = oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=10,
                                 logprobs=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].logprobs is not None
    assert cut.choices[0].logprobs.tokens == lp.tokens[:text.index(stop) + 2]
    # vLLM's return_token_ids beside logprobs: the ids are the tokens the logprobs score (the
    # byte tokenizer's token is its byte), whole or streamed.
    ids = oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=10,
                                 logprobs=0, extra_body={"ignore_eos": True,
                                                         "return_token_ids": True})
    validate("CreateCompletionResponse", ids.model_dump(mode="json", exclude_unset=True))
    got = ids.choices[0].token_ids  # type: ignore[attr-defined]
    assert ids.choices[0].prompt_token_ids == [256, *b"Once upon a time"]  # type: ignore
    assert bytes(got).decode() == text and ids.choices[0].logprobs == lp
    streamed_ids: list[int] = []
    for chunk in oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=10,
                                        logprobs=0, stream=True,
                                        extra_body={"ignore_eos": True,
                                                    "return_token_ids": True}):
        streamed_ids += chunk.choices[0].token_ids  # type: ignore[attr-defined]
    assert streamed_ids == got
    # Without logprobs asked for: none.
    plain = oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=10,
                                   extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None and plain.choices[0].text == text

    # echo: the prompt first, text and (the engine's prompt logprobs) logprobs; the first
    # prompt token (here the byte tokenizer's BOS, which shows no text) has none.
    prompt = "Once upon a time"
    echoed = oai.completions.create(model="mock", prompt=prompt, max_tokens=10, logprobs=1,
                                    echo=True, extra_body={"ignore_eos": True})
    validate("CreateCompletionResponse", echoed.model_dump(mode="json", exclude_unset=True))
    assert echoed.choices[0].text == prompt + text
    elp = echoed.choices[0].logprobs
    assert elp is not None and elp.tokens is not None and elp.token_logprobs is not None
    assert echoed.usage is not None and echoed.usage.prompt_tokens == len(prompt) + 1
    assert len(elp.tokens) == len(prompt) + 1 + 10 and "".join(elp.tokens) == prompt + text
    assert elp.token_logprobs[0] is None and all(v is not None for v in elp.token_logprobs[1:])
    assert elp.tokens[-10:] == lp.tokens  # the completion's own, as without echo
    streamed_text, streamed_logprobs = "", []
    for chunk in oai.completions.create(model="mock", prompt=prompt, max_tokens=10, n=2,
                                        logprobs=1, echo=True, stream=True,
                                        extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            if choice.index == 1:
                streamed_text += choice.text
                if choice.logprobs is not None:
                    streamed_logprobs += choice.logprobs.token_logprobs or []
    assert streamed_text == echoed.choices[0].text
    assert streamed_logprobs == elp.token_logprobs
    # vLLM's prompt_logprobs: each prompt token's logprob (the echoed ones), rank and text,
    # with the k most likely there; echo's own alternatives stay as many as `logprobs` asks.
    scored = oai.completions.create(model="mock", prompt=prompt, max_tokens=10, logprobs=1,
                                    echo=True, extra_body={"ignore_eos": True,
                                                           "prompt_logprobs": 3})
    assert scored.choices[0].logprobs == elp and scored.choices[0].text == prompt + text
    plp = scored.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    prompt_ids = [256, *prompt.encode()]
    assert len(plp) == len(prompt_ids) and plp[0] is None
    for i, (token, entry) in enumerate(zip(prompt_ids[1:], plp[1:], strict=True), 1):
        own = entry[str(token)]
        assert own["logprob"] == elp.token_logprobs[i] and own["decoded_token"] == chr(token)
        alternatives = sorted((e for e in entry.values() if e is not own or own["rank"] <= 3),
                              key=lambda e: e["rank"])
        assert [e["rank"] for e in alternatives] == [1, 2, 3]
        values = [e["logprob"] for e in alternatives]
        assert values == sorted(values, reverse=True)
        assert own["rank"] >= 1 and (own["rank"] > 3) == (len(entry) == 4)
        assert [values[0]] == list(elp.top_logprobs[i].values())  # type: ignore[index]
    chat_scored = httpx.post(deployment.url + "/v1/chat/completions", timeout=30, json={
        "model": "mock", "messages": messages, "max_tokens": 3, "prompt_logprobs": 0}).json()
    chat_plp = chat_scored["prompt_logprobs"]
    assert len(chat_plp) == chat_scored["usage"]["prompt_tokens"] and chat_plp[0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["rank"] >= 1
               for entry in chat_plp[1:])
    for wrong in ({"stream": True, "prompt_logprobs": 1}, {"prompt_logprobs": -1},
                  {"prompt_logprobs": 21}):
        with pytest.raises(openai.BadRequestError) as refused:
            oai.completions.create(model="mock", prompt=prompt, max_tokens=2,
                                   extra_body=wrong)  # type: ignore[call-overload]
        assert refused.value.body["param"] == "prompt_logprobs"  # type: ignore[index]
    # vLLM's return_tokens_as_token_ids: each token (and alternative) named `token_id:N`, the
    # values and the text offsets as before.
    named = oai.completions.create(model="mock", prompt=prompt, max_tokens=10, logprobs=1,
                                   echo=True, extra_body={"ignore_eos": True,
                                                          "return_tokens_as_token_ids": True})
    nlp = named.choices[0].logprobs
    assert named.choices[0].text == prompt + text and nlp is not None and nlp.top_logprobs
    ids_shown = [256, *(prompt + text).encode()]
    assert nlp.tokens == [f"token_id:{t}" for t in ids_shown]
    assert nlp.token_logprobs == elp.token_logprobs and nlp.text_offset == elp.text_offset
    assert all(top is None or all(k.startswith("token_id:") for k in top)
               for top in nlp.top_logprobs)
    named_chat = oai.chat.completions.create(
        model="mock", messages=messages, max_tokens=12, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    plain_content = chat.choices[0].logprobs.content
    named_content = named_chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert named_content is not None and plain_content is not None
    assert [c.token for c in named_content] == [
        f"token_id:{b}" for b in (chat.choices[0].message.content or "").encode()]
    for entry, plain_entry in zip(named_content, plain_content, strict=True):
        assert bytes(entry.bytes or []) == entry.token.encode()
        assert entry.logprob == plain_entry.logprob
        assert [t.token for t in entry.top_logprobs] == [
            f"token_id:{ord(t.token)}" for t in plain_entry.top_logprobs]
    # echo with max_tokens 0 scores the prompt alone: its text and logprobs, nothing generated.
    only = oai.completions.create(model="mock", prompt=prompt, max_tokens=0, logprobs=1,
                                  echo=True)
    validate("CreateCompletionResponse", only.model_dump(mode="json", exclude_unset=True))
    olp = only.choices[0].logprobs
    assert only.choices[0].text == prompt and only.choices[0].finish_reason == "length"
    assert olp is not None and olp.token_logprobs == elp.token_logprobs[:len(prompt) + 1]
    assert only.usage is not None and only.usage.completion_tokens == 0
    assert only.usage.prompt_tokens == len(prompt) + 1
    streamed_only = list(oai.completions.create(model="mock", prompt=prompt, max_tokens=0,
                                                echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed_only if c.choices) == prompt
    assert streamed_only[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as refused:  # without echo: nothing to answer
        oai.completions.create(model="mock", prompt=prompt, max_tokens=0)
    assert refused.value.body["param"] == "max_tokens"  # type: ignore[index]
    bare = oai.completions.create(model="mock", prompt=[[7, 8, 9]], max_tokens=3, echo=True,
                                  extra_body={"ignore_eos": True})
    assert bare.choices[0].text.startswith("\x07\x08\t") and bare.choices[0].logprobs is None

    # lm-eval's loglikelihood request (`local-completions`): token-id prompts in a batch,
    # echo, logprobs=1, max_tokens=1; it reads token_logprobs[ctxlen:-1] and the top entries.
    contexts, continuations = [[72, 105, 32], [79, 107]], [[116, 104, 101, 114, 101], [33]]
    scored = oai.completions.create(model="mock", prompt=[c + k for c, k in zip(
        contexts, continuations, strict=True)], max_tokens=1, logprobs=1, echo=True,
        temperature=0)
    for choice, context, continuation in zip(scored.choices, contexts, continuations,
                                             strict=True):
        slp = choice.logprobs
        assert slp is not None and slp.token_logprobs is not None and slp.top_logprobs
        assert len(slp.token_logprobs) == len(context) + len(continuation) + 1
        tail = slp.token_logprobs[len(context):-1]
        assert len(tail) == len(continuation) and all(v is not None and v < 0 for v in tail)
        assert all(top is not None and len(top) == 1 for top in slp.top_logprobs[1:])


def test_chat_echo_through_the_stack(deployment: Deployment) -> None:
    """vLLM's chat `echo`: every choice starts with the assistant's unfinished message, then
    the same text the request writes without echo; logprobs and usage cover only the latter."""
    deployment.start(workers=1, worker_args=FAST)
    oai = client(deployment)
    messages = [{"role": "user", "content": "Go on."},
                {"role": "assistant", "content": "Once upon a time"}]
    asked: dict[str, Any] = {"model": "mock", "messages": messages, "max_tokens": 12,
                             "logprobs": True}
    body = {"ignore_eos": True, "continue_final_message": True, "add_generation_prompt": False}
    plain = oai.chat.completions.create(**asked, extra_body=body).choices[0].message.content
    echoed = oai.chat.completions.create(**asked, n=2, extra_body={**body, "echo": True})
    validate("CreateChatCompletionResponse", echoed.model_dump(mode="json", exclude_unset=True))
    assert echoed.usage is not None and echoed.usage.completion_tokens == 24
    for choice in echoed.choices:
        assert choice.message.content == "Once upon a time" + plain
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert "".join(entry.token for entry in choice.logprobs.content) == plain
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in oai.chat.completions.create(**asked, stream=True,
                                                 extra_body={**body, "echo": True})
        if chunk.choices)
    assert streamed == "Once upon a time" + plain


def test_logit_bias_through_the_stack(deployment: Deployment) -> None:
    """OpenAI's logit_bias reaches the engine: -100 bans tokens, 100 forces one, a bias just
    past the gap to the second most likely token makes it the pick (its logprob reported as
    the model's, before the bias), in chat and completions, streamed or whole."""
    deployment.start(workers=1, worker_args=FAST)
    oai = client(deployment)
    prompt = "Once upon a time"

    def complete(bias: dict[str, int], **extra: object) -> openai.types.Completion:
        return oai.completions.create(model="mock", prompt=prompt, max_tokens=12,
                                      logit_bias=bias, extra_body={"ignore_eos": True},
                                      **extra)  # type: ignore[call-overload]

    plain = complete({}, logprobs=2)
    text = plain.choices[0].text
    banned = complete({str(b): -100 for b in set(text.encode())}).choices[0].text
    assert len(banned) == 12 and not set(banned) & set(text)
    assert complete({"65": 100}).choices[0].text == "A" * 12
    streamed = "".join(c.choices[0].text for c in complete({"65": 100}, stream=True)
                       if c.choices)
    assert streamed == "A" * 12
    chat = oai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=5, logit_bias={"66": 100})
    assert chat.choices[0].message.content == "BBBBB"
    lp = plain.choices[0].logprobs
    assert lp is not None and lp.top_logprobs and lp.top_logprobs[0]
    (first, v0), (second, v1) = lp.top_logprobs[0].items()
    assert first == text[0] and v0 > v1
    lifted = complete({str(ord(second)): math.floor(v0 - v1) + 1}, logprobs=0)
    assert lifted.choices[0].text[0] == second
    assert lifted.choices[0].logprobs.token_logprobs[0] == v1  # type: ignore[index,union-attr]
    with pytest.raises(openai.BadRequestError) as refused:
        complete({"300": 5})  # past the byte tokenizer's vocabulary
    assert refused.value.body["param"] == "logit_bias"  # type: ignore[index]


def test_bad_words_through_the_stack(deployment: Deployment) -> None:
    """vLLM's bad_words on the mocker (byte tokenizer: a word's tokens are its bytes): a
    two-letter word never appears, and the text runs as without it up to the letter that would
    have completed it; a one-letter word bars its letter everywhere, even where logit_bias
    forces it; the letter that replaces a barred one is scored as the model's own; chat,
    streamed and whole, and a word that makes no token is a 400."""
    deployment.start(workers=1, worker_args=FAST)
    oai = client(deployment)

    def complete(**extra: Any) -> openai.types.Completion:
        body = {"ignore_eos": True, **extra.pop("extra_body", {})}
        return oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=40,
                                      extra_body=body, **extra)

    plain_choice = complete(logprobs=1).choices[0]
    plain = plain_choice.text
    word = plain[10:12]
    at = plain.index(word)
    barred = complete(extra_body={"bad_words": [word]}).choices[0].text
    assert len(barred) == 40 and word not in barred
    assert barred[:at + 1] == plain[:at + 1] and barred[at + 1] != plain[at + 1]
    # The letter drawn instead is scored where the model ranks it: below the barred one, which
    # was the most likely there (as vLLM reports logprobs: before the bar).
    scored = complete(logprobs=1, extra_body={"bad_words": [word]}).choices[0].logprobs
    before = plain_choice.logprobs
    assert scored is not None and scored.token_logprobs is not None
    assert before is not None and before.token_logprobs is not None
    assert scored.token_logprobs[:at + 1] == before.token_logprobs[:at + 1]
    assert scored.token_logprobs[at + 1] < math.log(0.5) <= before.token_logprobs[at + 1]
    streamed = "".join(c.choices[0].text for c in complete(
        stream=True, extra_body={"bad_words": [word]}) if c.choices)
    assert streamed == barred
    assert "A" not in complete(logit_bias={"65": 100},
                               extra_body={"bad_words": ["A"]}).choices[0].text
    chat = oai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=30, extra_body={"bad_words": [plain[0], "zq"]})
    assert chat.choices[0].message.content and plain[0] not in chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as refused:
        complete(extra_body={"bad_words": ["   "]})
    assert refused.value.body["param"] == "bad_words"  # type: ignore[index]


def test_allowed_token_ids_through_the_stack(deployment: Deployment) -> None:
    """vLLM's allowed_token_ids on the mocker (byte tokenizer: token id = byte + offset): every
    generated token is one of them, the text runs as without them while the model's own choice
    is allowed, and an id outside the vocabulary is a 400. What this worker cannot honour (a
    priority, structured outputs) is refused, never ignored."""
    deployment.start(workers=1, worker_args=FAST)
    oai = client(deployment)

    def complete(**extra: Any) -> openai.types.Completion:
        return oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=30,
                                      extra_body={"ignore_eos": True, "return_token_ids": True,
                                                  **extra})

    plain = complete().choices[0]
    ids = plain.token_ids  # type: ignore[attr-defined]
    assert ids is not None and len(ids) == 30
    allowed = sorted(set(ids[:3]))
    limited = complete(allowed_token_ids=allowed).choices[0]
    got = limited.token_ids  # type: ignore[attr-defined]
    assert len(got) == 30 and set(got) <= set(allowed)
    assert got[0] == ids[0]  # the model's own first choice was allowed
    streamed = oai.completions.create(model="mock", prompt="Once upon a time", max_tokens=30,
                                      stream=True, extra_body={"ignore_eos": True,
                                                               "allowed_token_ids": allowed})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == limited.text
    with pytest.raises(openai.BadRequestError) as refused:
        complete(allowed_token_ids=[10**6])
    assert refused.value.body["param"] == "allowed_token_ids"  # type: ignore[index]
    # This worker schedules first come, first served: a priority is refused, not ignored, by
    # the router, or by the worker when the client names it.
    with pytest.raises(openai.BadRequestError) as refused:
        complete(priority=1)
    assert "--scheduling-policy priority" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model="mock", prompt="x", max_tokens=2,
                               extra_body={"priority": 1},
                               extra_headers={"x-worker-instance-id": "w1"})
    assert "w1 schedules first come, first served" in refused.value.message
    # Nor does the mocker apply structured outputs: the router refuses them, and so does the
    # worker when the client names it (a request is never run unconstrained).
    shaped = {"response_format": {"type": "json_object"}}
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model="mock", prompt="x", max_tokens=2, extra_body=shaped)
    assert "need a worker whose engine applies them" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model="mock", prompt="x", max_tokens=2, extra_body=shaped,
                               extra_headers={"x-worker-instance-id": "w1"})
    assert "worker w1's engine does not apply them" in refused.value.message


def test_priority_scheduling_through_the_stack(deployment: Deployment) -> None:
    """A worker started with --scheduling-policy priority and one seat: the requests queued
    behind the running one start by their `priority`, lowest first, not in arrival order. A
    priority with no worker scheduling by it is a 400 that says how to get one."""
    deployment.start(workers=1, worker_args=("--speedup-ratio", "1", "--max-num-seqs", "1",
                                             "--scheduling-policy", "priority"))
    started: list[str] = []

    async def one(oai: openai.AsyncOpenAI, name: str, priority: int, tokens: int) -> None:
        stream = await oai.completions.create(
            model="mock", prompt=name, max_tokens=tokens, stream=True,
            extra_body={"ignore_eos": True, "priority": priority})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and name not in started:
                started.append(name)

    async def until(done: Any, what: str) -> None:
        """Polls (a metric scrape is no event to wait on), bounded."""
        for _ in range(1500):
            if await asyncio.to_thread(done):
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"timed out waiting for {what}")

    def waiting() -> float:
        return deployment.metrics_of("w1").value("turnout_worker_waiting_requests")

    async def run() -> None:
        oai = openai.AsyncOpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                                 timeout=60)
        hold = asyncio.create_task(one(oai, "hold", 0, 5000))
        await until(lambda: started == ["hold"], "the first request to run")
        queued = []
        for n, (name, priority) in enumerate((("late", 5), ("normal", 0), ("urgent", -1))):
            queued.append(asyncio.create_task(one(oai, name, priority, 4)))
            await until(lambda n=n: waiting() == n + 1, f"{name} to wait in the engine")
        hold.cancel()  # its seat frees: the waiting ones take it in turn
        await asyncio.gather(*queued)

    asyncio.run(run())
    assert started == ["hold", "urgent", "normal", "late"]


def test_tool_call_and_reasoning_parsers_reach_the_frontend_through_up(
        deployment: Deployment) -> None:
    """`turnout up --tool-call-parser hermes --reasoning-parser deepseek_r1` hands the flags
    to its frontend: chat takes tools (without the flag they get a 400), and the mocker's text,
    which never closes a thinking, is all reasoning; streamed, each reasoning chunk carries
    its tokens' logprobs."""
    tools: Any = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    deployment.start_up(["--speedup-ratio", "0", "--tool-call-parser", "hermes",
                         "--reasoning-parser", "deepseek_r1"], workers=1)
    oai = client(deployment)
    ask: Any = [{"role": "user", "content": "x"}]
    done = oai.chat.completions.create(model="mock", messages=ask, tools=tools, max_tokens=5,
                                       extra_body={"ignore_eos": True})
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "length" and message.tool_calls is None
    assert (message.model_extra or {})["reasoning"] and not message.content
    chunks = list(oai.chat.completions.create(model="mock", messages=ask, max_tokens=8,
                                              logprobs=True, stream=True,
                                              extra_body={"ignore_eos": True}))
    thought = [c for c in chunks if c.choices and (c.choices[0].delta.model_extra or {}).get(
        "reasoning")]
    assert thought and not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert sum(len(c.choices[0].logprobs.content or ()) for c in chunks
               if c.choices and c.choices[0].logprobs) == 8


def test_repeated_prompt_reports_cached_tokens(deployment: Deployment) -> None:
    deployment.start(workers=1, worker_args=FAST)
    oai = client(deployment)
    prompt = "The quick brown fox jumps over the lazy dog. " * 10  # 450 bytes: 7 full blocks
    first = oai.completions.create(model="mock", prompt=prompt, max_tokens=4)
    second = oai.completions.create(model="mock", prompt=prompt, max_tokens=4)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is None or \
        not first.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == 7 * 64


def test_worker_started_after_frontend_is_used(deployment: Deployment) -> None:
    deployment.start_router()
    deployment.start_frontend()
    assert httpx.get(deployment.url + "/health").status_code == 503
    resp = httpx.post(deployment.url + "/v1/completions",
                      json={"model": "mock", "prompt": "hi", "max_tokens": 3})
    assert resp.status_code in (404, 503)
    assert "error" in resp.json()
    deployment.start_worker(*FAST)
    deployment.wait_healthy()
    out = client(deployment).completions.create(model="mock", prompt="hi", max_tokens=3)
    assert out.usage is not None and out.usage.completion_tokens == 3
    assert worker_requests(deployment, "w1") == len("hi") + 1  # + BOS


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopped_worker_is_no_longer_routed_to(deployment: Deployment, sig: int) -> None:
    deployment.start(workers=2, worker_args=FAST)
    oai = client(deployment)
    for _ in range(4):
        oai.completions.create(model="mock", prompt="warm up", max_tokens=2)
    assert worker_requests(deployment, "w1") > 0 and worker_requests(deployment, "w2") > 0
    w1 = deployment.service("w1")
    w1.signal(sig)
    wait_for(lambda: not w1.alive(), 10, "w1 to exit")
    before = worker_requests(deployment, "w2")
    for i in range(10):
        out = oai.completions.create(model="mock", prompt=f"after {i}", max_tokens=2)
        assert out.choices[0].finish_reason == "length"
    assert worker_requests(deployment, "w2") == before + (len("after 0") + 1) * 10  # + BOS


def test_client_disconnect_cancels_in_engine(deployment: Deployment) -> None:
    deployment.start(workers=1, worker_args=("--speedup-ratio", "1"))
    body = {"model": "mock", "prompt": "tell me a long story", "max_tokens": 2000,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=10) as http, http.stream("POST", deployment.url + "/v1/completions",
                                                       json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: {"):
                got += 1
                if got >= 3:
                    break
        # Leaving the block closes the connection mid-stream.
    wait_for(lambda: deployment.metrics_of("w1").value("turnout_worker_running_requests") == 0
             and deployment.metrics_of("w1").value("turnout_worker_waiting_requests") == 0,
             10, "the worker to drop the request")
    m = deployment.metrics_of("w1")
    assert m.value("turnout_worker_requests_total", model="mock", outcome="cancelled",
                   worker="w1") == 1
    assert m.value("turnout_worker_decode_tokens_total") < 2000


def test_non_streaming_disconnect_cancels_too(deployment: Deployment) -> None:
    deployment.start(workers=1, worker_args=("--speedup-ratio", "1"))
    body = {"model": "mock", "prompt": "tell me a long story", "max_tokens": 2000,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(deployment.url + "/v1/completions", json=body, timeout=1.0)
    wait_for(lambda: deployment.metrics_of("w1").value("turnout_worker_running_requests") == 0,
             10, "the worker to drop the request")
    assert deployment.metrics_of("w1").value("turnout_worker_decode_tokens_total") < 2000


REFUSED_HANDSHAKE = "dropped malformed plane handshake (not a fleet key)"
GARBAGE = ([b"garbage"], [KIND_GENERATE, b"\xc1\xc1"], [b"\x7f", b"x"],
           [KIND_CANCEL, b"\x93\x01\x02\x03"], [KIND_GENERATE, b"", b""])


def test_garbage_frames_do_not_stop_service(deployment: Deployment) -> None:
    """Garbage on both planes from a peer the planes admit (any peer without keys; with keys,
    a fleet member gone wrong) is counted and dropped, and the fleet serves on. With keys, the
    same garbage from a peer without the fleet's keys never gets that far: refused at the
    handshake, logged, not counted as a frame."""
    deployment.start(workers=1, worker_args=FAST)
    oai = client(deployment)
    ctx = zmq.Context()
    try:
        router = next(r for r in deployment.records() if r["role"] == "router")
        worker = deployment.record("w1")
        assert worker is not None
        request_endpoints = (router["endpoints"]["request"], worker["endpoints"]["request"])

        def malformed() -> tuple[float, float, float]:
            routers = deployment.metrics_of(router["id"])
            return (routers.value("turnout_router_malformed_frames_total", plane="request"),
                    routers.value("turnout_router_malformed_frames_total", plane="event"),
                    deployment.metrics_of("w1").value("turnout_worker_malformed_frames_total"))

        if deployment.keys_dir is not None:
            # Outsiders: a plain peer (refused on the mechanism) and one with a key pair of its
            # own that knows the fleet's public key (refused by the ZAP handler, which logs it).
            public, secret = zmq.curve_keypair()
            fleet_public = load_keys(deployment.keys_dir).public
            for endpoint in request_endpoints:
                for keyed in (False, True):
                    sock = ctx.socket(zmq.DEALER)
                    if keyed:
                        sock.curve_serverkey = fleet_public
                        sock.curve_publickey, sock.curve_secretkey = public, secret
                    sock.connect(endpoint)
                    for frames in GARBAGE:
                        sock.send_multipart(frames)
                    sock.close(linger=1000)
            wait_for(lambda: all(REFUSED_HANDSHAKE in s.output() for s in
                                 (deployment.router, deployment.service("w1"))), 10,
                     "the router and the worker to log the refused handshake")
            assert malformed() == (0, 0, 0), "nothing of an outsider's reached a decoder"

        # Request plane: garbage at the router and at the worker, framed and unframed.
        for endpoint in request_endpoints:
            sock = deployment.fleet_socket(ctx, zmq.DEALER)
            sock.connect(endpoint)
            for frames in GARBAGE:
                sock.send_multipart(frames)
            sock.close(linger=1000)
        # Event plane: a publisher the router discovers, sending garbage on every topic.
        pub = deployment.fleet_socket(ctx, zmq.PUB)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        metadata: dict[str, object] = {"started": 1.0}
        if deployment.keys_dir is not None:
            metadata["curve_key"] = load_keys(deployment.keys_dir).public_text
        fake = {"id": "fake", "role": "worker", "model": "other-model",
                "endpoints": {"request": "tcp://127.0.0.1:1", "events": f"tcp://127.0.0.1:{port}"},
                "metadata": metadata}
        (deployment.discovery / "fake.json").write_text(json.dumps(fake))
        deadline = time.monotonic() + 5
        steps = 0
        while time.monotonic() < deadline:
            steps += 1  # valid heartbeats keep the fake worker from being declared dead
            pub.send_multipart([TOPIC_HEARTBEAT, encoder.encode(EventEnvelope(
                "fake", steps, time.time(), msgspec.Raw(encoder.encode(Heartbeat("fake", 0, 0)))))])
            for topic in (TOPIC_HEARTBEAT, TOPIC_KV):
                pub.send_multipart([topic, b"\xc1 not msgpack"])
                pub.send_multipart([topic])
            time.sleep(0.05)
            if malformed()[1] >= 3:
                break
        pub.close(0)
        request, event, at_worker = malformed()
        assert request >= 1
        assert event >= 3
        assert at_worker >= 1
        out = oai.completions.create(model="mock", prompt="still here?", max_tokens=5)
        assert out.usage is not None and out.usage.completion_tokens == 5
        assert all(s.alive() for s in deployment.services)
    finally:
        ctx.destroy(linger=0)


def test_a_lone_router_crash_fails_streams_after_the_resume_wait_not_a_lease(
        deployment: Deployment) -> None:
    """No router comes back within --router-resume-wait-ms: the stream ends with an error
    then, not before (a restarted router could have taken it) and not at a lease."""
    deployment.start(workers=1, worker_args=("--speedup-ratio", "1"),
                     frontend_args=("--router-resume-wait-ms", "1000"))
    router = deployment.router
    oai = client(deployment)
    stream = oai.completions.create(model="mock", prompt="long one", max_tokens=2000,
                                    stream=True, extra_body={"ignore_eos": True})
    killed = 0.0
    with pytest.raises(openai.APIError, match="router"):
        for i, _ in enumerate(stream):
            if i == 3:
                router.signal(signal.SIGKILL)
                killed = time.monotonic()
    waited = time.monotonic() - killed
    assert 1.0 <= waited < 5, f"the stream ended {waited:.2f} s after the crash"
    resp = httpx.post(deployment.url + "/v1/completions",
                      json={"model": "mock", "prompt": "hi", "max_tokens": 3})
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "service_unavailable"
    assert deployment.frontend.alive(), "the frontend keeps running"
