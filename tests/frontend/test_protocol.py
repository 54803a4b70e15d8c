"""Request validation: spec-invalid bodies, valid-but-unsupported fields, unknown fields, and the
turn of a valid body into SamplingParams. Each table is cross-checked against the OpenAI spec."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.frontend.chat_template import RenderOptions
from services.frontend.errors import ApiError
from services.frontend.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    bad_words_ids,
    chat_messages,
    check_choices,
    completion_prompts,
    parse_chat,
    parse_completion,
    render_options,
    sampling_params,
    stop_strings,
    truncate_prompts,
)
from tests.openapi_spec import is_valid

USER = {"role": "user", "content": "hello"}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": [USER]}
    body.update(fields)
    return body


def completion(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "prompt": "hello"}
    body.update(fields)
    return body


def _error(parse: Any, body: Any) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as info:
        parse(raw)
    assert info.value.status == 400
    return info.value


# --- chat: bodies the spec itself rejects -----------------------------------------------------

CHAT_SPEC_INVALID = [
    ({"messages": [USER]}, "model"),
    ({"model": "tiny"}, "messages"),
    (chat(model=5), "model"),
    (chat(messages=[]), "messages"),
    (chat(messages="hello"), "messages"),
    (chat(messages=[{"content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "bot", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": []}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [{"type": "video"}]}]),
     "messages[0].content[0].type"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
     "messages[0].content[0].text"),
    (chat(messages=[{"role": "system", "content": [IMAGE]}]), "messages[0].content[0].type"),
    (chat(messages=[USER, {"role": "tool", "content": "x"}]), "messages[1].tool_call_id"),
    (chat(temperature=3), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=1.5), "top_p"),
    (chat(top_p=-0.1), "top_p"),
    (chat(presence_penalty=2.5), "presence_penalty"),
    (chat(frequency_penalty=-3), "frequency_penalty"),
    (chat(n=0), "n"),
    (chat(n=129), "n"),
    (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat(stop=[]), "stop"),
    (chat(stop=7), "stop"),
    (chat(stream="yes"), "stream"),
    (chat(max_tokens="ten"), "max_tokens"),
    (chat(max_completion_tokens=1.5), "max_completion_tokens"),
    (chat(top_logprobs=21), "top_logprobs"),
    (chat(logit_bias={"1": "x"}), "logit_bias"),
    (chat(logit_bias={"1": 2.5}), "logit_bias"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat(service_tier="gold"), "service_tier"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     "tools[0].function.parameters"),
    (chat(metadata={"a": 1}), "metadata"),
    (chat(response_format={"type": "xml"}), "response_format.type"),
    (chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (chat(tool_choice="sometimes"), "tool_choice"),
    (chat(seed="x"), "seed"),
    (chat(user=5), "user"),
    (chat(modalities=["video"]), "modalities[0]"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_SPEC_INVALID)
def test_chat_spec_invalid(body: dict[str, Any], param: str) -> None:
    assert not is_valid("CreateChatCompletionRequest", body), "the spec accepts it"
    error = _error(parse_chat, body)
    assert error.param == param, error.message
    assert error.type == "invalid_request_error"


# --- chat: valid per spec, refused by Turnout's rules -----------------------------------------

CHAT_RULE_INVALID = [
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    # logit_bias: token ids, biases in [-100, 100], at most 1,024 of them.
    (chat(logit_bias={"x": 1}), "logit_bias"),
    (chat(logit_bias={"-1": 1}), "logit_bias"),
    (chat(logit_bias={"1": 101}), "logit_bias"),
    (chat(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias"),
    # Tools: named as functions are.
    (chat(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
     "tools[0].function.name"),
    # vLLM's bad_words: at most 128, none blank or over 1,000 characters.
    (chat(bad_words=["ok", " "]), "bad_words"),
    (chat(bad_words=["x" * 1001]), "bad_words"),
    (chat(bad_words=[f"w{i}" for i in range(129)]), "bad_words"),
    (chat(cache_salt=""), "cache_salt"),  # as vLLM: a salt, when sent, is not empty
    # Structured outputs: a schema named as OpenAI names them; one constraint at most.
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "a b"}}),
     "response_format.json_schema.name"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_RULE_INVALID)
def test_chat_rule_invalid(body: dict[str, Any], param: str) -> None:
    assert is_valid("CreateChatCompletionRequest", body)
    assert _error(parse_chat, body).param == param


CHAT_UNSUPPORTED = [
    (chat(tools=TOOLS, tool_choice={"type": "custom", "custom": {"name": "f"}}),
     "tool_choice.type"),
    (chat(tools=[{"type": "custom", "custom": {"name": "grammar"}}]), "tools[0].type"),
    (chat(functions=[{"name": "f"}]), "functions"),
    (chat(function_call={"name": "f"}), "function_call"),
    (chat(audio={"voice": "alloy", "format": "wav"}), "audio"),
    (chat(modalities=["text", "audio"]), "modalities"),
    (chat(prediction={"type": "content", "content": "x"}), "prediction"),
    (chat(web_search_options={}), "web_search_options"),
    (chat(store=True), "store"),
    (chat(verbosity="high"), "verbosity"),
    (chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "hear"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]),
     "messages[0].content[1].type"),
    (chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]),
     "messages[0].content[0].type"),
    (chat(messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "f-1"}}]}]), "messages[0].content[0].type"),
    (chat(messages=[USER, {"role": "function", "content": "42", "name": "f"}]),
     "messages[1].role"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_UNSUPPORTED)
def test_chat_unsupported_is_named(body: dict[str, Any], param: str) -> None:
    assert is_valid("CreateChatCompletionRequest", body), "not even valid per spec"
    error = _error(parse_chat, body)
    assert error.param == param
    assert error.code == "unsupported_parameter"
    assert param in error.message


@pytest.mark.parametrize(("body", "param"), [
    (chat(foo=1), "foo"),
    (chat(nvext={"x": 1}), "nvext"),
    (chat(messages=[{"role": "user", "content": "x", "foo": 1}]), "messages[0].foo"),
    (chat(stream=True, stream_options={"bar": True}), "stream_options.bar"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "z": 1}]}]),
     "messages[0].content[0].z"),
    (chat(**{"": 1}), '""'),
    (chat(messages=[{"role": "user", "content": "x", "": None}]), 'messages[0].""'),
])
def test_chat_unknown_field_is_named(body: dict[str, Any], param: str) -> None:
    error = _error(parse_chat, body)
    assert error.param == param
    assert error.code == "unknown_parameter"
    assert param.rsplit(".", 1)[-1] in error.message


def test_not_json_or_not_an_object() -> None:
    assert _error(parse_chat, b"{nope").code == "invalid_json"
    assert _error(parse_chat, b"").code == "invalid_json"
    assert _error(parse_chat, b"[1, 2]").param is None


HARMLESS = chat(
    messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Really."}], "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "refusal": None},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"},
                                          {"type": "refusal", "refusal": "no"}]},
        {"role": "user", "content": "go", "name": "bob"},
    ],
    n=1, store=False, user="u-1", metadata={"k": "v"}, service_tier="auto", seed=7,
    presence_penalty=0.5, frequency_penalty=-0.5, temperature=0.7, top_p=0.9,
    stream=True, stream_options={"include_usage": True}, logprobs=False, top_logprobs=0,
    tool_choice="none", parallel_tool_calls=True, response_format={"type": "text"},
    modalities=["text"], stop=["\n\n", "END"], max_completion_tokens=10, max_tokens=20,
    safety_identifier="s", prompt_cache_key="p", logit_bias={}, verbosity=None,
)


def test_harmless_fields_are_accepted() -> None:
    assert is_valid("CreateChatCompletionRequest", HARMLESS)
    body = parse_chat(json.dumps(HARMLESS).encode())
    assert chat_messages(body) == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Really.", "name": "ops"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "go", "name": "bob"},
    ]
    assert stop_strings(body) == ("\n\n", "END")
    params = sampling_params(body, prompt_len=10, max_model_len=100, vocab_size=300)
    assert params.max_tokens == 10  # max_completion_tokens wins over max_tokens
    assert params.temperature == 0.7 and params.top_p == 0.9 and params.seed == 7
    assert params.presence_penalty == 0.5 and params.frequency_penalty == -0.5


def test_extensions_are_passed_through() -> None:
    body = parse_chat(json.dumps(chat(ignore_eos=True, top_k=40, min_tokens=3,
                                      repetition_penalty=1.1, stop_token_ids=[5, 9],
                                      min_p=0.05)).encode())
    params = sampling_params(body, prompt_len=4, max_model_len=64, vocab_size=300)
    assert (params.ignore_eos, params.top_k, params.min_tokens, params.repetition_penalty,
            params.stop_token_ids, params.min_p) == (True, 40, 3, 1.1, [5, 9], 0.05)
    assert sampling_params(parse_chat(json.dumps(chat()).encode()), 4, 64, 300).min_p == 0.0
    for wrong in (-0.1, 1.5, "x"):
        assert _error(parse_chat, chat(min_p=wrong)).param == "min_p"
    assert params.max_tokens == 60  # no limit given: fill the context
    off = parse_chat(json.dumps(chat(top_k=-1)).encode())
    assert sampling_params(off, 4, 64, 300).top_k == 0
    # allowed_token_ids: once each, in the order given; none left out is an error, as in vLLM.
    allowed = parse_chat(json.dumps(chat(allowed_token_ids=[9, 5, 9])).encode())
    assert sampling_params(allowed, 4, 64, 300).allowed_token_ids == [9, 5]
    assert params.allowed_token_ids == []
    for wrong in ([], [300], [-1], "5"):
        with pytest.raises(ApiError) as info:
            sampling_params(parse_chat(json.dumps(chat(allowed_token_ids=wrong)).encode()), 4,
                            64, 300)
        assert (info.value.param or "").startswith("allowed_token_ids")


def test_vllms_chat_render_fields() -> None:
    """`add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`: vLLM's
    defaults, and the combinations that cannot mean anything refused."""
    def options(**fields: Any) -> RenderOptions:
        return render_options(parse_chat(json.dumps(chat(**fields)).encode()))

    assert options() == RenderOptions()
    assert options(add_generation_prompt=False) == RenderOptions(add_generation_prompt=False)
    assert options(continue_final_message=True) == RenderOptions(False, True)
    assert options(continue_final_message=True, add_generation_prompt=False) == \
        RenderOptions(False, True)
    assert options(chat_template_kwargs={"enable_thinking": False}).variables == {
        "enable_thinking": False}
    for body, param in (
            (chat(continue_final_message=True, add_generation_prompt=True),
             "continue_final_message"),
            (chat(chat_template_kwargs={"messages": []}), "chat_template_kwargs.messages"),
            (chat(chat_template_kwargs={"add_generation_prompt": False}),
             "chat_template_kwargs.add_generation_prompt"),
            (chat(chat_template_kwargs=[1]), "chat_template_kwargs"),
            (chat(add_generation_prompt="yes"), "add_generation_prompt")):
        assert _error(parse_chat, body).param == param


def test_truncate_prompt_tokens_never_cuts_an_image() -> None:
    body = parse_chat(json.dumps(chat(truncate_prompt_tokens=2)).encode())
    assert truncate_prompts(body, [([1, 2, 3], [])], 10) == [([2, 3], [])]
    assert truncate_prompts(body, [([1, 2], ["image"])], 10) == [([1, 2], ["image"])]
    with pytest.raises(ApiError) as info:
        truncate_prompts(body, [([1, 2, 3], ["image"])], 10)
    assert info.value.param == "truncate_prompt_tokens"


def test_context_and_max_tokens_limits() -> None:
    body = parse_chat(json.dumps(chat(max_tokens=50)).encode())
    with pytest.raises(ApiError) as info:
        sampling_params(body, prompt_len=64, max_model_len=64, vocab_size=300)
    assert (info.value.param, info.value.code) == ("messages", "context_length_exceeded")
    with pytest.raises(ApiError) as info:
        sampling_params(body, prompt_len=20, max_model_len=64, vocab_size=300)
    assert info.value.param == "max_tokens"
    assert sampling_params(body, prompt_len=14, max_model_len=64, vocab_size=300).max_tokens == 50

    body = parse_chat(json.dumps(chat(max_tokens=5, min_tokens=6)).encode())
    with pytest.raises(ApiError) as info:
        sampling_params(body, 4, 64, 300)
    assert info.value.param == "min_tokens"
    body = parse_chat(json.dumps(chat(stop_token_ids=[300])).encode())
    with pytest.raises(ApiError) as info:
        sampling_params(body, 4, 64, 300)
    assert info.value.param == "stop_token_ids"


# --- completions ------------------------------------------------------------------------------

COMPLETION_SPEC_INVALID = [
    ({"model": "tiny"}, "prompt"),
    ({"prompt": "x"}, "model"),
    (completion(prompt=5), "prompt"),
    (completion(prompt=[1, "a"]), "prompt"),
    (completion(prompt=[[]]), "prompt"),
    (completion(prompt=[True]), "prompt"),
    (completion(max_tokens=-1), "max_tokens"),
    (completion(logprobs=6), "logprobs"),
    (completion(best_of=21), "best_of"),
    (completion(echo="yes"), "echo"),
    (completion(suffix=5), "suffix"),
    (completion(temperature=2.5), "temperature"),
    (completion(n=0), "n"),
    (completion(stop=["a"] * 5), "stop"),
]


@pytest.mark.parametrize(("body", "param"), COMPLETION_SPEC_INVALID)
def test_completion_spec_invalid(body: dict[str, Any], param: str) -> None:
    assert not is_valid("CreateCompletionRequest", body), "the spec accepts it"
    if isinstance(body.get("prompt"), list):
        parsed = parse_completion(json.dumps(body).encode())  # the shape is checked next
        with pytest.raises(ApiError) as info:
            completion_prompts(parsed, vocab_size=300)
        assert info.value.param == param
        return
    assert _error(parse_completion, body).param == param


COMPLETION_UNSUPPORTED = [
    (completion(best_of=2), "best_of"),
    (completion(suffix="tail"), "suffix"),
]


@pytest.mark.parametrize(("body", "param"), COMPLETION_UNSUPPORTED)
def test_completion_unsupported_is_named(body: dict[str, Any], param: str) -> None:
    assert is_valid("CreateCompletionRequest", body)
    error = _error(parse_completion, body)
    assert (error.param, error.code) == (param, "unsupported_parameter")


def test_completion_prompt_shapes() -> None:
    def prompts_of(value: Any) -> list[str | list[int]]:
        body = parse_completion(json.dumps(completion(prompt=value)).encode())
        return completion_prompts(body, vocab_size=300)

    assert prompts_of("hi") == ["hi"]
    assert prompts_of(["hi"]) == ["hi"]
    assert prompts_of([1, 2, 3]) == [[1, 2, 3]]
    assert prompts_of([[4, 5]]) == [[4, 5]]
    assert prompts_of(None) == [""]
    assert prompts_of(["a", "b"]) == ["a", "b"]  # a batch: one completion each
    assert prompts_of([[1], [2, 3.0]]) == [[1], [2, 3]]
    for bad in ([[1], [300]], [[1], []], [[1], ["a"]], ["a", [1]]):
        with pytest.raises(ApiError) as info:
            prompts_of(bad)
        assert info.value.param == "prompt"
    with pytest.raises(ApiError) as info:
        prompts_of([299, 300])
    assert info.value.param == "prompt"
    with pytest.raises(ApiError):
        prompts_of([])


def test_choices_are_bounded_in_all() -> None:
    check_choices(1, 128)
    check_choices(64, 2)
    with pytest.raises(ApiError) as info:
        check_choices(65, 2)
    assert (info.value.param, info.value.code) == ("n", "too_many_choices")
    with pytest.raises(ApiError) as info:
        check_choices(129, 1)
    assert (info.value.param, info.value.code) == ("prompt", "too_many_choices")
    body = completion(n=2, best_of=1)
    assert is_valid("CreateCompletionRequest", body)
    assert _error(parse_completion, body).param == "best_of"


def test_completion_unknown_field_and_defaults() -> None:
    assert _error(parse_completion, completion(messages=[USER])).param == "messages"
    body = parse_completion(json.dumps(completion(best_of=1, echo=False, suffix="",
                                                  logprobs=None)).encode())
    params = sampling_params(body, prompt_len=3, max_model_len=100, vocab_size=300)
    assert params.max_tokens == COMPLETIONS_DEFAULT_MAX_TOKENS
    assert sampling_params(body, prompt_len=90, max_model_len=100, vocab_size=300).max_tokens == 10
    with pytest.raises(ApiError) as info:
        sampling_params(body, prompt_len=100, max_model_len=100, vocab_size=300)
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")


# --- JSON Schema integers: 1.0 is one ---------------------------------------------------------

def test_integral_floats_are_integers() -> None:
    fields = {"n": 1.0, "seed": -3.0, "max_tokens": 5.0, "max_completion_tokens": 4.0,
              "top_logprobs": 0.0}
    assert is_valid("CreateChatCompletionRequest", chat(**fields))
    body = parse_chat(json.dumps(chat(**fields)).encode())
    assert (body.n, body.seed, body.max_tokens, body.max_completion_tokens, body.top_logprobs) \
        == (1, -3, 5, 4, 0)
    assert all(type(getattr(body, name)) is int for name in fields)
    params = sampling_params(body, prompt_len=3, max_model_len=100, vocab_size=300)
    assert (params.max_tokens, params.seed) == (4, -3)

    fields = {"n": 1.0, "best_of": 1.0, "logprobs": None, "max_tokens": 7.0, "seed": 2.0}
    for prompt in ([1.0, 2.0], [[3.0, 4]]):
        raw = completion(prompt=prompt, **fields)
        assert is_valid("CreateCompletionRequest", raw)
        body = parse_completion(json.dumps(raw).encode())
        [ids] = completion_prompts(body, vocab_size=300)
        assert ids in ([1, 2], [3, 4]) and all(type(i) is int for i in ids)
        assert (body.n, body.best_of, body.max_tokens, body.seed) == (1, 1, 7, 2)


@pytest.mark.parametrize(("parse", "body", "param"), [
    (parse_chat, chat(n=1.5), "n"),
    (parse_chat, chat(max_tokens=2.25), "max_tokens"),
    (parse_chat, chat(seed=0.5), "seed"),
    (parse_chat, chat(top_logprobs=21.0), "top_logprobs"),
    (parse_completion, completion(best_of=0.5), "best_of"),
    (parse_completion, completion(max_tokens=-1.0), "max_tokens"),
])
def test_fractional_or_out_of_range_floats_are_not_integers(parse: Any, body: dict[str, Any],
                                                            param: str) -> None:
    component = "CreateChatCompletionRequest" if parse is parse_chat else "CreateCompletionRequest"
    assert not is_valid(component, body), "the spec accepts it"
    assert _error(parse, body).param == param


def test_fractional_token_ids_are_refused() -> None:
    body = parse_completion(json.dumps(completion(prompt=[1.5, 2])).encode())
    with pytest.raises(ApiError) as info:
        completion_prompts(body, vocab_size=300)
    assert info.value.param == "prompt"


# --- logprobs ---------------------------------------------------------------------------------

def test_logprobs_asked_for_reach_the_sampling_params() -> None:
    def asked(parse: Any, body: dict[str, Any]) -> int:
        parsed = parse(json.dumps(body).encode())
        return sampling_params(parsed, prompt_len=3, max_model_len=100, vocab_size=300).logprobs

    assert asked(parse_chat, chat()) == -1
    assert asked(parse_chat, chat(logprobs=False, top_logprobs=0)) == -1
    assert asked(parse_chat, chat(logprobs=True)) == 0
    assert asked(parse_chat, chat(logprobs=True, top_logprobs=20)) == 20
    assert asked(parse_completion, completion()) == -1
    assert asked(parse_completion, completion(logprobs=0)) == 0
    assert asked(parse_completion, completion(logprobs=5)) == 5
    def prompt_asked(body: dict[str, Any]) -> int:
        parsed = parse_completion(json.dumps(body).encode())
        return sampling_params(parsed, prompt_len=3, max_model_len=100,
                               vocab_size=300).prompt_logprobs

    # `echo` with logprobs: the prompt's too.
    assert prompt_asked(completion(echo=True, logprobs=2)) == 2
    # `echo` with max_tokens 0 scores the prompt: the engine computes one token (not shown);
    # max_tokens 0 without echo, or with min_tokens, is refused.
    echo_only = parse_completion(json.dumps(completion(echo=True, max_tokens=0)).encode())
    assert sampling_params(echo_only, prompt_len=3, max_model_len=100,
                           vocab_size=300).max_tokens == 1
    assert _error(parse_completion, completion(max_tokens=0)).param == "max_tokens"
    error = _error(lambda raw: sampling_params(parse_completion(raw), prompt_len=3,
                                               max_model_len=100, vocab_size=300),
                   completion(echo=True, max_tokens=0, min_tokens=1))
    assert error.param == "min_tokens"
    assert prompt_asked(completion(echo=True)) == prompt_asked(completion(logprobs=2)) == -1
    # Alternatives without the logprobs they go with: said, not silently dropped.
    error = _error(parse_chat, chat(top_logprobs=3))
    assert (error.status, error.param) == (400, "top_logprobs")


def test_bad_words_become_token_sequences_as_vllm_makes_them() -> None:
    """Each word as sent (leading spaces dropped), and after a space when that is another
    token sequence of the same length; a repeated word once; too many sequences, or a word that
    makes no token, is a 400."""
    vocab = {"Paris": [7], " Paris": [8], "New York": [3, 4], " New York": [9, 4],
             "ab": [1, 2], " ab": [5, 1, 2], "\u200b": []}

    def encode(text: str) -> list[int]:
        return vocab[text]

    assert bad_words_ids(["Paris", "New York", "ab", "ab"], encode) == [
        [7], [8], [3, 4], [9, 4], [1, 2]]
    assert bad_words_ids(["  Paris"], encode) == [[7], [8]]
    with pytest.raises(ApiError) as empty:
        bad_words_ids(["\u200b"], encode)
    assert empty.value.param == "bad_words"
    many = {f"w{i}": [i] for i in range(70)} | {f" w{i}": [100 + i] for i in range(70)}
    with pytest.raises(ApiError) as too_many:
        bad_words_ids(list(many)[:70], many.__getitem__)
    assert too_many.value.param == "bad_words" and "140" in too_many.value.message
