"""Request bodies of POST /v1/chat/completions and /v1/completions, checked against the OpenAI spec.

Owns the msgspec Structs that mirror the spec's `CreateChatCompletionRequest` and
`CreateCompletionRequest` (decoding and validating in one pass, unknown fields refused), the
rules for fields Turnout accepts but cannot honour (refused with the field named), and the turn of
a valid body into chat messages / a prompt, stop strings and `SamplingParams`. Every problem
becomes an `ApiError` naming the offending `param`.

Does not own tokenization, model lookup or responses.
"""

from __future__ import annotations

import functools
import json
import random
import re
import typing
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from common.messages import SamplingParams, StructuredOutput
from services.frontend.chat_template import DEFAULT_RENDER, RenderOptions
from services.frontend.errors import ApiError, invalid, unknown_field, unsupported
from services.frontend.structured_outputs import (
    ResponseFormat,
    StructuredOutputsOption,
    structured_output,
)
from services.frontend.tool_calls import forced_call_schema

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def _json_integer(kind: Any) -> Any:
    """An int type as JSON Schema's "integer" reads it: also a float with no fractional part
    (`1.0`), which `_integral` then turns into the int. Bounds apply to both."""
    metas = typing.get_args(kind)[1:]
    return kind | (Annotated[float, *metas] if metas else float)


Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
NonNegative = Annotated[int, Meta(ge=0)]
StopList = Annotated[list[str], Meta(min_length=1, max_length=4)]
# The spec's integer fields.
Int = _json_integer(int)
Int64 = _json_integer(Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)])
Tokens = _json_integer(NonNegative)
# The spec's bound on `n`; also the most completions one request may ask for in all (a batch
# of prompts times n), since each is a generation of its own.
MAX_CHOICES: Final = 128
# The most tokens one `logit_bias` may name.
MAX_LOGIT_BIAS: Final = 1024
# The most token sequences `bad_words` may become (vLLM's VLLM_MAX_NUM_BAD_WORDS default), and
# the longest word: each is tokenized twice per request.
MAX_BAD_WORDS: Final = 128
MAX_BAD_WORD_CHARS: Final = 1000
Choices = _json_integer(Annotated[int, Meta(ge=1, le=MAX_CHOICES)])
TopLogprobs = _json_integer(Annotated[int, Meta(ge=0, le=20)])
BestOf = _json_integer(Annotated[int, Meta(ge=0, le=20)])
Logprobs = _json_integer(Annotated[int, Meta(ge=0, le=5)])
# Where a request body may carry an integral float for an int.
_INTEGER_FIELDS: Final = ("max_completion_tokens", "max_tokens", "seed", "n", "top_logprobs",
                          "best_of", "logprobs")

# /v1/completions without max_tokens: the spec's default.
COMPLETIONS_DEFAULT_MAX_TOKENS: Final = 16


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# --- content parts (tagged by "type") ---------------------------------------------------------

class TextPart(_Strict, tag_field="type", tag="text"):
    text: str


class ImageUrlPart(_Strict, tag_field="type", tag="image_url"):
    image_url: dict[str, Any]


class InputAudioPart(_Strict, tag_field="type", tag="input_audio"):
    input_audio: dict[str, Any]


class FilePart(_Strict, tag_field="type", tag="file"):
    file: dict[str, Any]


class RefusalPart(_Strict, tag_field="type", tag="refusal"):
    refusal: str


ContentPart = TextPart | ImageUrlPart | InputAudioPart | FilePart | RefusalPart
Content = str | Annotated[list[ContentPart], Meta(min_length=1)]


# --- messages (tagged by "role") --------------------------------------------------------------

class DeveloperMessage(_Strict, tag_field="role", tag="developer"):
    content: Content
    name: str = ""


class SystemMessage(_Strict, tag_field="role", tag="system"):
    content: Content
    name: str = ""


class UserMessage(_Strict, tag_field="role", tag="user"):
    content: Content
    name: str = ""


class AssistantMessage(_Strict, tag_field="role", tag="assistant"):
    content: Content | None = None
    refusal: str | None = None
    name: str = ""
    audio: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | UnsetType = UNSET  # not nullable in the spec
    function_call: dict[str, Any] | None = None
    # vLLM's: an earlier reply's reasoning, as a client sends its messages back (the older name
    # too); the chat template reads it as `reasoning_content`.
    reasoning: str | None = None
    reasoning_content: str | None = None


class ToolMessage(_Strict, tag_field="role", tag="tool"):
    content: Content
    tool_call_id: str


class FunctionMessage(_Strict, tag_field="role", tag="function"):
    content: str | None
    name: str


Message = (DeveloperMessage | SystemMessage | UserMessage | AssistantMessage | ToolMessage
           | FunctionMessage)

# Part types each role may carry per the spec; anything else there is simply invalid.
_SPEC_PARTS: Final = {
    "developer": ("text",), "system": ("text",), "tool": ("text",),
    "user": ("text", "image_url", "input_audio", "file"), "assistant": ("text", "refusal"),
}


# --- shared option objects --------------------------------------------------------------------

class StreamOptions(_Strict):
    include_usage: bool | UnsetType = UNSET
    include_obfuscation: bool | UnsetType = UNSET
    # vLLM's: with include_usage, every chunk carries the usage so far.
    continuous_usage_stats: bool | None = None


class _Extensions(_Strict):
    """Fields beyond the OpenAI spec that vLLM-style clients send; Turnout honours them."""

    ignore_eos: bool | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    min_tokens: NonNegative | None = None
    repetition_penalty: Annotated[float, Meta(gt=0, le=10)] | None = None
    stop_token_ids: list[NonNegative] | None = None
    # The stop string (or a stop token's text) that ended the output stays in it.
    include_stop_str_in_output: bool | None = None
    # The prompt's and each choice's token ids, in the response.
    return_token_ids: bool | None = None
    # False: special tokens the model generates show in the text (a stop token still does not).
    skip_special_tokens: bool | None = None
    # Logprobs name each token `token_id:N`, not by its text (for tokens that are no text alone).
    return_tokens_as_token_ids: bool | None = None
    # Keep only the prompt's last k tokens (-1: as many as the context holds).
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None
    # Each prompt token's logprob and rank, with its k most likely alternatives (not streamed).
    prompt_logprobs: Annotated[int, Meta(ge=-1, le=20)] | None = None
    # Words the output must not contain (`bad_words_ids` says how they become tokens).
    bad_words: list[str] | None = None
    # Only these tokens may be generated.
    allowed_token_ids: list[NonNegative] | None = None
    # On workers scheduling by priority: lower first (then arrival). 0 is the default.
    priority: Int64 | None = None
    # The request reuses only KV cached for requests with the same salt (none: the unsalted):
    # one tenant cannot time another's prompts through the prefix cache.
    cache_salt: str | None = None
    # One constraint on the output's text (vLLM's): a JSON schema, a regex, a choice, a grammar.
    structured_outputs: StructuredOutputsOption | None = None


# A field typed `X | UnsetType = UNSET` may be left out but not sent as null: the spec does not let
# it be null, and OpenAI answers a null there with a 400 naming the field.


class ChatCompletionRequest(_Extensions, kw_only=True):
    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    # Sampling.
    max_completion_tokens: Int | None = None
    max_tokens: Int | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    seed: Int64 | None = None
    stop: str | StopList | None = None
    n: Choices | None = None
    logit_bias: dict[str, int] | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | UnsetType = UNSET
    # Streaming.
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Output shape.
    response_format: ResponseFormat | UnsetType = UNSET
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    web_search_options: dict[str, Any] | UnsetType = UNSET
    # Tools.
    tools: list[dict[str, Any]] | UnsetType = UNSET
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | UnsetType = UNSET
    parallel_tool_calls: bool | UnsetType = UNSET
    functions: Annotated[list[dict[str, Any]], Meta(min_length=1, max_length=128)] | UnsetType \
        = UNSET
    function_call: Literal["none", "auto"] | dict[str, Any] | UnsetType = UNSET
    # Bookkeeping that changes nothing here.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | UnsetType = UNSET
    safety_identifier: Annotated[str, Meta(max_length=64)] | UnsetType = UNSET
    prompt_cache_key: str | UnsetType = UNSET
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    # vLLM's: how the chat template renders the conversation.
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: the reply starts with the last message's text when that is the assistant's.
    echo: bool | None = None
    # vLLM's: whether a reply's reasoning (`--reasoning-parser`) is sent; false drops it.
    include_reasoning: bool | None = None


class CompletionRequest(_Extensions, kw_only=True):
    model: str
    # Required, nullable. Left undecoded here: its shape is checked by `completion_prompts`, which
    # decodes a token-id array straight into checked ints (the long prompts' fast path).
    prompt: msgspec.Raw
    max_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    seed: Int64 | None = None
    stop: str | StopList | None = None
    n: Choices | None = None
    best_of: BestOf | None = None
    echo: bool | None = None
    suffix: str | None = None
    logit_bias: dict[str, int] | None = None
    logprobs: Logprobs | None = None
    response_format: ResponseFormat | None = None  # vLLM's, as on chat
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | UnsetType = UNSET


class TokenizeRequest(_Strict):
    """vLLM's POST /tokenize: a `prompt`, or chat `messages` through the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Meta(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # a prompt's BOS (default: yes; messages: no)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Strict):
    """vLLM's POST /detokenize: token ids back to text."""

    tokens: list[NonNegative]
    model: str | None = None


_chat_decoder: Final = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder: Final = msgspec.json.Decoder(CompletionRequest)
_tokenize_decoder: Final = msgspec.json.Decoder(TokenizeRequest)
_detokenize_decoder: Final = msgspec.json.Decoder(DetokenizeRequest)
# What `prompt` may be per the spec, before its array's items are checked.
_prompt_decoder: Final = msgspec.json.Decoder(str | list[Any] | None)

_AT_PATH = re.compile(r" - at `\$\.?(.*)`$")
_FIELD = re.compile(r"field `([^`]*)`")


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _schema_error(exc: msgspec.ValidationError) -> ApiError:
    """msgspec's message ("... - at `$.messages[0].role`") → an error naming the param."""
    text = str(exc)
    match = _AT_PATH.search(text)
    path = match.group(1).replace("[...]", "") if match else ""  # "[...]": some dict key
    detail = text[: match.start()] if match else text
    field = _FIELD.search(detail)
    if detail.startswith("Object contains unknown field") and field:
        return unknown_field(_join(path, field.group(1) or '""'))  # "" is a key too
    if detail.startswith("Object missing required field") and field:
        param = _join(path, field.group(1))
        return invalid(f"Missing required parameter: '{param}'", param,
                       "missing_required_parameter")
    if not path:
        return invalid(f"Invalid request body: {detail}")
    return invalid(f"Invalid value for '{path}': {detail}", path, "invalid_value")


def decode_body(decoder: msgspec.json.Decoder[Any], raw: bytes) -> Any:
    """A request body through `decoder`, its errors as OpenAI's."""
    try:
        return _integral(decoder.decode(raw))
    except msgspec.ValidationError as exc:
        raise _schema_error(exc) from None
    except msgspec.DecodeError as exc:
        raise invalid(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # JSON nested deeper than msgspec follows, inside a free-form field
        raise too_deep() from None


def _integral(body: Any) -> Any:
    """`body` with the integral floats its integer fields may hold (`"n": 1.0`) as ints."""
    for name in _INTEGER_FIELDS:
        value = getattr(body, name, None)
        if type(value) is not float:
            continue
        if not value.is_integer() or not INT64_MIN <= value < 2.0**63:
            raise invalid(f"Invalid value for '{name}': expected an integer, got {value!r}",
                          name, "invalid_type")
        setattr(body, name, int(value))
    return body


def too_deep() -> ApiError:
    return invalid("Request body is nested too deeply", code="invalid_json")


# --- checks shared by both endpoints ----------------------------------------------------------

def _check_common(body: ChatCompletionRequest | CompletionRequest) -> None:
    structured_output(body.response_format or None, body.structured_outputs)
    if body.logit_bias:
        _check_logit_bias(body.logit_bias)
    if body.bad_words:
        _check_bad_words(body.bad_words)
    if body.cache_salt is not None and not body.cache_salt:
        raise invalid("Parameter 'cache_salt' must be a non-empty string if provided.",
                      "cache_salt", "invalid_value")
    if body.stream_options is not None and not body.stream:
        raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                      "stream_options")
    if body.prompt_logprobs is not None:
        if body.prompt_logprobs < 0:
            raise unsupported("prompt_logprobs", "-1 (the whole vocabulary) is not supported; "
                              "ask for at most 20 alternatives")
        if body.stream:
            raise invalid("'prompt_logprobs' is not available when 'stream' is true",
                          "prompt_logprobs")


def _check_tools(tools: list[dict[str, Any]], choice: Any) -> None:
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise unsupported(f"tools[{i}].type", "only function tools are supported")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not _FUNCTION_NAME.fullmatch(function["name"]):
            raise invalid(f"Invalid 'tools[{i}].function.name': a function name is 1-64 "
                          "letters, digits, underscores and dashes", f"tools[{i}].function.name",
                          "invalid_value")
        if not isinstance(function.get("parameters", {}), dict):
            raise invalid(f"Invalid 'tools[{i}].function.parameters': expected a JSON schema "
                          "object", f"tools[{i}].function.parameters", "invalid_value")
    if (choice == "required" or isinstance(choice, dict)) and not tools:
        raise invalid("Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                      "'tools' are specified.", "tool_choice", "invalid_value")
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise unsupported("tool_choice.type", "only a named function is supported")
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise invalid("Invalid 'tool_choice': expected {'type': 'function', 'function': "
                          "{'name': ...}}", "tool_choice.function.name", "invalid_value")
        if name not in {tool["function"]["name"] for tool in tools}:
            raise invalid(f"Invalid 'tool_choice': no tool is named {name!r}",
                          "tool_choice.function.name", "invalid_value")


def forced_calls(body: ChatCompletionRequest) -> tuple[bool, str | None]:
    """Whether `tool_choice` forces the reply to be calls ("required" or a named function),
    and the named function's name (None for "required")."""
    choice = body.tool_choice
    if not body.tools:
        return False, None
    if isinstance(choice, dict):
        return True, choice["function"]["name"]
    return choice == "required", None


def tools_asked(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the model is shown and may call (`tool_choice` "auto", the default); None
    without tools or with "none" (then, as in vLLM, the template does not see them)."""
    if not body.tools or body.tool_choice == "none":
        return None
    return body.tools


def _check_chat(body: ChatCompletionRequest) -> None:
    _check_common(body)
    _check_tools(body.tools or [], body.tool_choice)
    if forced_calls(body)[0] and structured_output(body.response_format or None,
                                                   body.structured_outputs) is not None:
        raise invalid("A 'tool_choice' of 'required' or a named function constrains the reply "
                      "to calls already; it cannot take 'response_format' or "
                      "'structured_outputs' too", "tool_choice", "invalid_value")
    if body.functions is not UNSET:
        raise unsupported("functions", "function calling is not supported")
    if isinstance(body.function_call, dict):
        raise unsupported("function_call", "function calling is not supported")
    if body.top_logprobs and not body.logprobs:
        raise invalid("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    if body.audio is not None:
        raise unsupported("audio", "audio output is not supported")
    if body.modalities is not None and "audio" in body.modalities:
        raise unsupported("modalities", "only text output is supported")
    if body.prediction is not None:
        raise unsupported("prediction")
    if body.web_search_options is not UNSET:
        raise unsupported("web_search_options")
    if body.verbosity is not None:
        raise unsupported("verbosity")
    if body.store:
        raise unsupported("store", "responses are not stored")
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(body, name)
        if value is not None and value < 1:
            raise invalid(f"'{name}' must be at least 1, got {value}", name, "invalid_value")
    for i, message in enumerate(body.messages):
        _check_message(i, message)
    _check_render(body)


def _check_render(body: ChatCompletionRequest | TokenizeRequest) -> None:
    if body.continue_final_message and body.add_generation_prompt:
        raise invalid("'continue_final_message' leaves the final message open for the model to "
                      "go on with; it cannot be set with 'add_generation_prompt'",
                      "continue_final_message", "invalid_value")
    for name in _RENDER_FIELDS.intersection(body.chat_template_kwargs or ()):
        raise invalid(f"'{name}' is set by the request's own field or by Turnout, not in "
                      "'chat_template_kwargs'", f"chat_template_kwargs.{name}", "invalid_value")


# Template variables a request sets with its own fields (or Turnout with its messages).
_RENDER_FIELDS: Final = frozenset(("messages", "add_generation_prompt",
                                   "continue_final_message", "tools"))
_FUNCTION_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def truncate_prompts(body: ChatCompletionRequest | CompletionRequest,
                     prompts: list[tuple[list[int], list[Any]]], max_model_len: int,
                     ) -> list[tuple[list[int], list[Any]]]:
    """vLLM's `truncate_prompt_tokens`: each prompt (token ids, images) cut to its last k
    tokens, as a tokenizer truncating on the left does."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return prompts
    if keep == 0:
        raise invalid("'truncate_prompt_tokens' must be -1 (the context length) or at least 1",
                      "truncate_prompt_tokens", "invalid_value")
    if keep > max_model_len:
        raise invalid(f"'truncate_prompt_tokens' ({keep}) is more than this model's context "
                      f"length ({max_model_len})", "truncate_prompt_tokens", "invalid_value")
    keep = max_model_len if keep == -1 else keep
    out = []
    for ids, images in prompts:
        if len(ids) > keep:
            if images:  # a cut could fall inside an image's placeholders
                raise invalid("'truncate_prompt_tokens' cannot cut a prompt with images",
                              "truncate_prompt_tokens", "invalid_value")
            ids = ids[-keep:]
        out.append((ids, images))
    return out


def template_variables(body: ChatCompletionRequest | TokenizeRequest) -> dict[str, Any]:
    """The chat template's variables: the request's `chat_template_kwargs`, and, as vLLM sets
    them, its `reasoning_effort` and, unless the request sets it, `enable_thinking` (off for
    an effort of "none", else on)."""
    variables = dict(body.chat_template_kwargs or {})
    effort = body.reasoning_effort if isinstance(body, ChatCompletionRequest) else None
    if effort is not None:
        variables["reasoning_effort"] = effort
        variables.setdefault("enable_thinking", effort != "none")
    return variables


def render_options(body: ChatCompletionRequest | TokenizeRequest) -> RenderOptions:
    """How `body` asks for its conversation rendered (vLLM's defaults: the assistant's header
    appended, unless the final message is continued)."""
    tools = tools_asked(body) if isinstance(body, ChatCompletionRequest) else None
    variables = template_variables(body)
    if body.add_generation_prompt is None and not body.continue_final_message \
            and not variables and tools is None:
        return DEFAULT_RENDER
    continued = bool(body.continue_final_message)
    return RenderOptions(
        add_generation_prompt=not continued if body.add_generation_prompt is None
        else body.add_generation_prompt,
        continue_final_message=continued, variables=variables, tools=tools)


def _check_message(i: int, message: Any) -> None:
    role = message.__struct_config__.tag
    if role == "function":
        raise unsupported(f"messages[{i}].role", "'function' messages are the deprecated form "
                                                 "of 'tool' messages; send those")
    if role == "assistant":
        for j, call in enumerate(message.tool_calls or ()):
            function = call.get("function")
            if call.get("type", "function") != "function" or not isinstance(function, dict) \
                    or not isinstance(function.get("name"), str) \
                    or not isinstance(function.get("arguments"), str):
                raise invalid(f"Invalid 'messages[{i}].tool_calls[{j}]': expected a function "
                              "call with a name and arguments", f"messages[{i}].tool_calls[{j}]",
                              "invalid_value")
        if message.function_call is not None:
            raise unsupported(f"messages[{i}].function_call", "function calling is not supported")
        if message.audio is not None:
            raise unsupported(f"messages[{i}].audio", "audio is not supported")
    if isinstance(message.content, list):
        allowed = _SPEC_PARTS[role]
        for j, part in enumerate(message.content):
            kind = part.__struct_config__.tag
            param = f"messages[{i}].content[{j}].type"
            if kind not in allowed:
                raise invalid(f"'{role}' messages cannot hold '{kind}' content parts", param,
                              "invalid_value")
            if kind not in ("text", "refusal", "image_url"):
                raise unsupported(param, f"'{kind}' content parts are not supported; "
                                         "only text and image_url are")


def _check_completion(body: CompletionRequest) -> None:
    _check_common(body)
    if _kind(body.prompt) not in (b'"', b"[", b"n"):  # a string, an array or null; else:
        _decode_prompt(body.prompt)  # raises
    if body.best_of is not None and body.best_of > 1:
        raise unsupported("best_of", "only best_of <= 1 is supported")
    if body.best_of is not None and body.n is not None and 1 < body.n and body.best_of < body.n:
        raise invalid(f"'best_of' ({body.best_of}) must be at least 'n' ({body.n})", "best_of",
                      "invalid_value")
    if body.suffix:
        raise unsupported("suffix")
    # `echo` with `max_tokens: 0` scores a prompt without generating (OpenAI's legacy API).
    least = 0 if body.echo else 1
    if body.max_tokens is not None and body.max_tokens < least:
        raise invalid(f"'max_tokens' must be at least {least}"
                      f"{'' if least else ' (0 only with echo)'}, got {body.max_tokens}",
                      "max_tokens", "invalid_value")


# --- public entry points ----------------------------------------------------------------------

def parse_chat(raw: bytes) -> ChatCompletionRequest:
    """Decode and validate a chat completions body; raises `ApiError`."""
    body: ChatCompletionRequest = decode_body(_chat_decoder, raw)
    _check_chat(body)
    return body


def parse_tokenize(raw: bytes) -> TokenizeRequest:
    """Decode and validate a /tokenize body; raises `ApiError`."""
    body: TokenizeRequest = decode_body(_tokenize_decoder, raw)
    if (body.prompt is None) == (body.messages is None):
        raise invalid("send either 'prompt' or 'messages'", "prompt", "invalid_value")
    if body.messages is None:
        for name in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs"):
            if getattr(body, name) is not None:
                raise invalid(f"'{name}' goes with 'messages'", name, "invalid_value")
        return body
    for i, message in enumerate(body.messages):
        _check_message(i, message)
    _check_render(body)
    if body.add_special_tokens:
        raise invalid("the chat template places the special tokens of 'messages'",
                      "add_special_tokens", "invalid_value")
    if has_images(body):
        raise unsupported("messages", "images are not tokenized here")
    return body


def parse_detokenize(raw: bytes, vocab_size: int) -> DetokenizeRequest:
    """Decode and validate a /detokenize body; raises `ApiError`."""
    body: DetokenizeRequest = decode_body(_detokenize_decoder, raw)
    _check_ids(body.tokens, vocab_size, "tokens")
    return body


def parse_completion(raw: bytes) -> CompletionRequest:
    """Decode and validate a completions body; raises `ApiError`."""
    body: CompletionRequest = decode_body(_completion_decoder, raw)
    _check_completion(body)
    return body


def _text_of(content: Any, image_marker: str | None = None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if image_marker is None:
        return "\n".join(part.text for part in content if isinstance(part, TextPart))
    return "\n".join(part.text if isinstance(part, TextPart) else image_marker
                     for part in content if isinstance(part, TextPart | ImageUrlPart))


def has_images(body: ChatCompletionRequest | TokenizeRequest) -> bool:
    return any(isinstance(part, ImageUrlPart) for message in body.messages
               if isinstance(getattr(message, "content", None), list)
               for part in message.content)


def chat_messages(body: ChatCompletionRequest | TokenizeRequest,
                  image_marker: str | None = None) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: role + plain-text content (+ name, a tool
    message's `tool_call_id`, an assistant's `tool_calls` and `reasoning_content`); with
    `image_marker`, each image part is that marker in the text (`images.py` splits there)."""
    out = []
    for message in body.messages:
        role = message.__struct_config__.tag
        # Developer messages are the newer name for system messages.
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                 "content": _text_of(message.content, image_marker)}
        if getattr(message, "name", ""):
            entry["name"] = message.name
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
        elif isinstance(message, AssistantMessage):
            if message.tool_calls:
                entry["tool_calls"] = [_template_call(call) for call in message.tool_calls]
            reasoning = message.reasoning or message.reasoning_content
            if reasoning:
                entry["reasoning_content"] = reasoning
        out.append(entry)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier tool call as chat templates read it: its arguments an object, not JSON text
    (templates write `arguments | tojson`), as vLLM hands them over."""
    function = dict(call["function"])
    try:
        function["arguments"] = json.loads(function["arguments"])
    except ValueError:
        pass  # the template gets the text as sent
    return {**call, "function": function}


def chat_text_length(body: ChatCompletionRequest) -> int:
    """Characters the template will see: decides whether tokenizing may block the loop."""
    total = 0
    for message in body.messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            total += sum(len(part.text) for part in content if isinstance(part, TextPart))
        for call in getattr(message, "tool_calls", None) or ():
            total += len(call["function"]["arguments"])
    if isinstance(body, ChatCompletionRequest) and body.tools:
        total += len(msgspec.json.encode(body.tools))  # the template writes them out too
    return total


@functools.lru_cache(maxsize=8)
def _token_ids_decoder(vocab_size: int) -> msgspec.json.Decoder[list[int]]:
    return msgspec.json.Decoder(list[Annotated[int, Meta(ge=0, lt=vocab_size)]])


def _kind(raw: msgspec.Raw) -> bytes:
    """The first byte of a raw JSON value: what kind of value it is."""
    return bytes(memoryview(raw)[:1])


def _decode_prompt(raw: msgspec.Raw) -> str | list[Any] | None:
    try:
        decoded: str | list[Any] | None = _prompt_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        detail = _AT_PATH.sub("", str(exc))
        raise invalid(f"Invalid value for 'prompt': {detail}", "prompt", "invalid_value") from None
    return decoded


def completion_prompts(body: CompletionRequest, vocab_size: int) -> list[str | list[int]]:
    """The prompts of a completions body, in order (a batch gives several): each text, or token
    ids checked against the vocab. At least one; `null` is one empty prompt."""
    raw = body.prompt
    if _kind(raw) == b"[":
        # The common long case first: one pass in C decodes the ids and checks their range.
        # Anything else (nested, strings, a bad id) takes the general path for its error.
        try:
            ids = _token_ids_decoder(vocab_size).decode(raw)
        except msgspec.ValidationError:
            pass
        else:
            if ids:
                return [ids]
    prompt = _decode_prompt(raw)
    if prompt is None:
        return [""]
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise invalid("'prompt' must not be an empty array", "prompt", "invalid_value")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    ids = _integers(prompt)
    if ids is not None:
        return [_check_ids(ids, vocab_size, "prompt")]
    if all(isinstance(p, list) for p in prompt):
        batch: list[str | list[int]] = []
        for item in prompt:
            ids = _integers(item)
            if not ids:
                break
            batch.append(_check_ids(ids, vocab_size, "prompt"))
        else:
            return batch
    raise invalid("'prompt' must be a string, an array of strings, an array of token ids or an "
                  "array of token id arrays", "prompt", "invalid_type")


def check_choices(prompts: int, n: int) -> None:
    """400 when a request asks for more than `MAX_CHOICES` completions in all (prompts x n)."""
    if prompts * n > MAX_CHOICES:
        param = "prompt" if n == 1 else "n"
        raise invalid(f"A request may ask for at most {MAX_CHOICES} completions in all; this one "
                      f"asks for {prompts * n} ({prompts} prompt(s) x n={n})", param,
                      "too_many_choices")


def _integers(items: list[Any]) -> list[int] | None:
    """`items` as ints if each is a JSON Schema integer (an int, or an integral float such as
    `5.0`), else None."""
    out = []
    for item in items:
        if type(item) is int:
            out.append(item)
        elif type(item) is float and item.is_integer():
            out.append(int(item))
        else:
            return None
    return out


def _check_logit_bias(bias: dict[str, int]) -> None:
    if len(bias) > MAX_LOGIT_BIAS:
        raise invalid(f"Invalid 'logit_bias': at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}",
                      "logit_bias", "invalid_value")
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise invalid(f"Invalid 'logit_bias': {key!r} is not a token id", "logit_bias",
                          "invalid_value")
        if not -100 <= value <= 100:
            raise invalid(f"Invalid 'logit_bias': the bias of token {key} is {value}, not in "
                          "[-100, 100]", "logit_bias", "invalid_value")


def _check_bad_words(words: list[str]) -> None:
    if len(words) > MAX_BAD_WORDS:
        raise invalid(f"Invalid 'bad_words': at most {MAX_BAD_WORDS} words, got {len(words)}",
                      "bad_words", "invalid_value")
    for word in words:
        if not word.strip() or len(word) > MAX_BAD_WORD_CHARS:
            raise invalid(f"Invalid 'bad_words': {word[:40]!r} is empty or longer than "
                          f"{MAX_BAD_WORD_CHARS} characters", "bad_words", "invalid_value")


def bad_words_ids(words: list[str], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """vLLM's `bad_words` as token sequences, tokenized as vLLM does it: each word as sent
    (its leading spaces dropped) and, when that makes a different first token and as many
    tokens, after a space, so a word is banned at the start of a text and inside it."""
    out: list[list[int]] = []
    for word in dict.fromkeys(words):  # vLLM drops repeats
        bare = encode(word.lstrip())
        if not bare:
            raise invalid(f"Invalid 'bad_words': {word[:40]!r} makes no token", "bad_words",
                          "invalid_value")
        out.append(bare)
        spaced = encode(" " + word.lstrip())
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    if len(out) > MAX_BAD_WORDS:
        raise invalid(f"Invalid 'bad_words': at most {MAX_BAD_WORDS} token sequences, these "
                      f"words make {len(out)}", "bad_words", "invalid_value")
    return out


def _logit_bias(body: ChatCompletionRequest | CompletionRequest,
                vocab_size: int) -> dict[int, float]:
    if not body.logit_bias:
        return {}
    bias = {int(key): float(value) for key, value in body.logit_bias.items()}
    _check_ids(list(bias), vocab_size, "logit_bias")
    return bias


def _allowed_token_ids(body: ChatCompletionRequest | CompletionRequest,
                       vocab_size: int) -> list[int]:
    allowed = body.allowed_token_ids
    if allowed is None:
        return []
    if not allowed:
        raise invalid("'allowed_token_ids' must not be empty (leave it out to allow every "
                      "token)", "allowed_token_ids", "invalid_value")
    return _check_ids(list(dict.fromkeys(allowed)), vocab_size, "allowed_token_ids")


def _check_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    for token in ids:
        if not 0 <= token < vocab_size:
            raise invalid(f"Token id {token} in '{param}' is outside the vocabulary "
                          f"[0, {vocab_size})", param, "invalid_value")
    return ids


def stop_strings(body: ChatCompletionRequest | CompletionRequest) -> tuple[str, ...]:
    stop = body.stop
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    return tuple(s for s in stop if s)


def prompt_logprobs_asked(body: ChatCompletionRequest | CompletionRequest) -> int:
    """-1: none; k >= 0: the prompt's, each with its k most likely alternatives: those an
    echoed completion shows with its `logprobs`, or vLLM's `prompt_logprobs` (the larger)."""
    echoed = (body.logprobs if isinstance(body, CompletionRequest) and body.echo
              and body.logprobs is not None else -1)
    return max(echoed, -1 if body.prompt_logprobs is None else body.prompt_logprobs)


def logprobs_asked(body: ChatCompletionRequest | CompletionRequest) -> int:
    """-1: no logprobs; k >= 0: each token's, with its k most likely alternatives."""
    if isinstance(body, CompletionRequest):
        return -1 if body.logprobs is None else body.logprobs
    if not body.logprobs:
        return -1
    return 0 if body.top_logprobs is UNSET else body.top_logprobs


def sampling_params(body: ChatCompletionRequest | CompletionRequest, prompt_len: int,
                    max_model_len: int, vocab_size: int, limit_source: str = "",
                    bad_words: list[list[int]] | None = None) -> SamplingParams:
    """SamplingParams for a validated body whose prompt is `prompt_len` tokens long;
    `limit_source` says where `max_model_len` comes from and how to raise it (for the error);
    `bad_words`: the body's, tokenized (`bad_words_ids`)."""
    prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    limit = f"{max_model_len} tokens" + (f" ({limit_source})" if limit_source else "")
    if prompt_len >= max_model_len:
        raise ApiError(
            400, f"This model's maximum context length is {limit}. However, your "
            f"prompt is {prompt_len} tokens, which leaves no room for the completion.",
            param=prompt_param, code="context_length_exceeded", reason="context_length")
    room = max_model_len - prompt_len
    if isinstance(body, ChatCompletionRequest):
        if body.max_completion_tokens is not None:
            param, requested = "max_completion_tokens", body.max_completion_tokens
        else:
            param, requested = "max_tokens", body.max_tokens
        max_tokens = room if requested is None else requested
    else:
        param, requested = "max_tokens", body.max_tokens
        max_tokens = min(COMPLETIONS_DEFAULT_MAX_TOKENS, room) if requested is None else requested
    if max_tokens > room:
        raise ApiError(
            400, f"'{param}' is too large: {max_tokens}. This model's maximum context length is "
            f"{limit} and the prompt is {prompt_len} tokens, so at most {room} "
            "completion tokens fit.", param=param, code="context_length_exceeded",
            reason="context_length")
    min_tokens = body.min_tokens or 0
    if min_tokens > max_tokens:
        raise invalid(f"'min_tokens' ({min_tokens}) must not exceed the maximum number of "
                      f"tokens ({max_tokens})", "min_tokens", "invalid_value")
    if max_tokens == 0:  # echo only: the engine computes one token, which is never shown
        max_tokens = 1
    stop_ids = body.stop_token_ids or []
    if stop_ids:
        _check_ids(stop_ids, vocab_size, "stop_token_ids")
    top_k = body.top_k or 0
    structured = structured_output(body.response_format or None, body.structured_outputs)
    if isinstance(body, ChatCompletionRequest):
        forced, name = forced_calls(body)
        if forced:
            assert body.tools  # forced_calls: there are tools
            structured = StructuredOutput(json=json.dumps(forced_call_schema(
                body.tools, name, single=body.parallel_tool_calls is False)))
    seed = body.seed
    if structured is not None and seed is None and body.temperature != 0:
        # A constrained stream that moves is replayed from its prompt on the new worker (its
        # engine must see the constraint advance over every token): a seed makes it repeat.
        seed = random.randint(INT64_MIN, INT64_MAX)
    return SamplingParams(
        logprobs=logprobs_asked(body),
        prompt_logprobs=prompt_logprobs_asked(body),
        logit_bias=_logit_bias(body, vocab_size),
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else float(body.temperature),
        top_p=1.0 if body.top_p is None else float(body.top_p),
        top_k=top_k if top_k > 0 else 0,
        min_p=float(body.min_p or 0.0),
        seed=seed,
        min_tokens=min_tokens,
        stop_token_ids=stop_ids,
        ignore_eos=bool(body.ignore_eos),
        presence_penalty=float(body.presence_penalty or 0.0),
        frequency_penalty=float(body.frequency_penalty or 0.0),
        repetition_penalty=1.0 if body.repetition_penalty is None
        else float(body.repetition_penalty),
        bad_words=bad_words or [],
        allowed_token_ids=_allowed_token_ids(body, vocab_size),
        structured=structured,
    )


def wants_usage_in_stream(body: ChatCompletionRequest | CompletionRequest) -> bool:
    options = body.stream_options
    return bool(options is not None and options.include_usage)


def chat_echo(body: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the text the reply starts with, the last message's when it is the
    assistant's (as with `continue_final_message`; its text parts joined by newlines, as vLLM
    does); "" when there is none."""
    last = body.messages[-1]
    if not body.echo or not isinstance(last, AssistantMessage) or last.content is None:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(part.text for part in last.content if isinstance(part, TextPart))


def wants_obfuscation(body: ChatCompletionRequest | CompletionRequest) -> bool:
    """OpenAI's `include_obfuscation`, asked for in so many words: on by default at OpenAI,
    off here as in vLLM (it only costs bandwidth where the link is trusted)."""
    options = body.stream_options
    return options is not None and options.include_obfuscation is True


def wants_running_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    """vLLM's `continuous_usage_stats` (only with `include_usage`, as vLLM reads it)."""
    options = body.stream_options
    return bool(options is not None and options.include_usage and options.continuous_usage_stats)
