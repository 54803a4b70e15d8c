"""Response bodies and SSE events, shaped as the OpenAI spec says.

Owns `chat.completion`, `chat.completion.chunk`, `text_completion` (whole and streamed), usage,
the model list, and SSE framing (`data: <json>\\n\\n` ... `data: [DONE]\\n\\n`). Streamed chunks are
the hot path: each request pre-encodes the constant bytes around the text once, so a chunk costs
one JSON string encode and a join. A streamed event's `logprobs` argument is the JSON that follows
`"logprobs":` in its choice: the value, then any fields that go after it (vLLM's `token_ids`).
Does not own HTTP or generation.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Final

import msgspec
from msgspec import UNSET, UnsetType

from services.frontend.errors import ApiError
from services.frontend.logprobs import NULL
from services.frontend.tool_calls import ToolCall, ToolCallDelta

DONE: Final = b"data: [DONE]\n\n"
# A streamed choice's `logprobs` bytes when it carries no logprobs and no token ids yet.
NO_TOKENS: Final = NULL + b',"token_ids":[]'
_TEXT_TAIL: Final = b',"logprobs":null,"finish_reason":null}]}\n\n'
_encode = msgspec.json.encode


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class CompletionTokensDetails(msgspec.Struct):
    reasoning_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    # With a reasoning parser: how many of the completion's tokens were its thinking.
    completion_tokens_details: CompletionTokensDetails | UnsetType = UNSET


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
          reasoning_tokens: int | None = None) -> Usage:
    out = Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens,
                PromptTokensDetails(cached_tokens))
    if reasoning_tokens is not None:
        out.completion_tokens_details = CompletionTokensDetails(reasoning_tokens)
    return out


class ChatMessage(msgspec.Struct):
    content: str | None
    refusal: str | None = None
    role: str = "assistant"
    tool_calls: list[ToolCall] | UnsetType = UNSET
    reasoning: str | UnsetType | None = UNSET  # vLLM's, with a reasoning parser


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    logprobs: msgspec.Raw | None
    finish_reason: str
    token_ids: list[int] | UnsetType = UNSET  # vLLM's return_token_ids


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | UnsetType = UNSET
    prompt_logprobs: msgspec.Raw | UnsetType = UNSET  # vLLM's


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: msgspec.Raw | None
    finish_reason: str
    prompt_token_ids: list[int] | UnsetType = UNSET  # vLLM's return_token_ids
    token_ids: list[int] | UnsetType = UNSET
    prompt_logprobs: msgspec.Raw | UnsetType = UNSET  # vLLM's


class Completion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "turnout"


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


def _raw(logprobs: bytes) -> msgspec.Raw | None:
    return None if logprobs == NULL else msgspec.Raw(logprobs)


def chat_completion(response_id: str, created: int, model: str,
                    choices: list[tuple[str, str, bytes]], usage_: Usage,
                    token_ids: TokenIds | None = None,
                    prompt_logprobs: list[bytes] | None = None,
                    tool_calls: list[ToolCall] | None = None,
                    reasoning: list[str | None] | UnsetType = UNSET) -> bytes:
    """`choices`: (text, finish reason, logprobs JSON) of each, in index order; `token_ids`:
    what vLLM's `return_token_ids` adds (the prompt's once, at the top); `prompt_logprobs`:
    vLLM's, each choice's JSON (the first's goes at the top: the choices share the prompt);
    `tool_calls`: the one choice's, when it made any (its text, if only blank, is null);
    `reasoning`: each choice's, when they are read for it (a text left empty is null)."""
    out = ChatCompletion(
        id=response_id, created=created, model=model, usage=usage_,
        choices=[ChatChoice(i, ChatMessage(text), _raw(logprobs), reason)
                 for i, (text, reason, logprobs) in enumerate(choices)])
    if reasoning is not UNSET:
        for choice, thought in zip(out.choices, reasoning, strict=True):
            choice.message.reasoning = thought
            choice.message.content = choice.message.content or None
    if tool_calls:
        message = out.choices[0].message
        message.tool_calls = tool_calls
        if not (message.content or "").strip():
            message.content = None
    if token_ids is not None:
        out.prompt_token_ids = token_ids.prompts[0]
        for choice, ids in zip(out.choices, token_ids.outputs, strict=True):
            choice.token_ids = ids
    if prompt_logprobs:
        out.prompt_logprobs = msgspec.Raw(prompt_logprobs[0])
    return _encode(out)


def completion(response_id: str, created: int, model: str,
               choices: list[tuple[str, str, bytes]], usage_: Usage,
               token_ids: TokenIds | None = None,
               prompt_logprobs: list[bytes] | None = None) -> bytes:
    """`choices`: (text, finish reason, logprobs JSON) of each, in index order; `token_ids`:
    what vLLM's `return_token_ids` adds (each choice's prompt and output); `prompt_logprobs`:
    vLLM's, each choice's JSON."""
    out = Completion(
        id=response_id, created=created, model=model, usage=usage_,
        choices=[CompletionChoice(i, text, _raw(logprobs), reason)
                 for i, (text, reason, logprobs) in enumerate(choices)])
    if token_ids is not None:
        for choice, prompt, ids in zip(out.choices, token_ids.prompts, token_ids.outputs,
                                       strict=True):
            choice.prompt_token_ids, choice.token_ids = prompt, ids
    if prompt_logprobs is not None:
        for choice, scored in zip(out.choices, prompt_logprobs, strict=True):
            choice.prompt_logprobs = msgspec.Raw(scored)
    return _encode(out)


class TokenIds(msgspec.Struct):
    """vLLM's `return_token_ids` of a whole response: each choice's prompt and output."""

    prompts: list[list[int]]
    outputs: list[list[int]]


class Tokenized(msgspec.Struct):
    """vLLM's /tokenize answer."""

    count: int
    max_model_len: int
    tokens: list[int]


class Detokenized(msgspec.Struct):
    prompt: str


def tokenized(tokens: list[int], max_model_len: int) -> bytes:
    return _encode(Tokenized(len(tokens), max_model_len, tokens))


def detokenized(text: str) -> bytes:
    return _encode(Detokenized(text))


def model_card(model: str, created: int) -> bytes:
    return _encode(ModelCard(id=model, created=created))


def model_list(models: list[str], created: int) -> bytes:
    return _encode(ModelList(data=[ModelCard(id=m, created=created) for m in models]))


def sse_error(error: ApiError) -> bytes:
    return b"data: " + error.body() + b"\n\n"


# The usage so far of one choice (vLLM's `continuous_usage_stats`).
RunningUsage = Callable[[], Usage]


# OpenAI's `stream_options.include_obfuscation`: a text-carrying event is padded to a multiple of
# this many bytes, so its size no longer tells how long its tokens are (a side channel on
# encrypted streams).
_PAD_TO: Final = 32
_ALNUM: Final = string.ascii_letters + string.digits
_OBFUSCATION: Final = b',"obfuscation":"'


def obfuscated(event: bytes, end: bytes) -> bytes:
    """`event`, a JSON object still open, then an `obfuscation` field of random alphanumerics
    that brings the whole to a multiple of `_PAD_TO` bytes, then `end`, which closes it."""
    size = len(event) + len(_OBFUSCATION) + 1 + len(end)
    pad = "".join(random.choices(_ALNUM, k=-size % _PAD_TO or _PAD_TO)).encode()
    return b"".join((event, _OBFUSCATION, pad, b'"', end))


def _usage_end(usage_: Usage, opening: bool) -> bytes:
    """A chunk's `"usage"` and end; an opening chunk, which shows no token, counts none (it
    may leave after the first tokens came)."""
    if opening:
        usage_ = msgspec.structs.replace(usage_, completion_tokens=0,
                                         total_tokens=usage_.prompt_tokens)
    return b',"usage":%s}\n\n' % _encode(usage_)


def _head(response_id: str, obj: str, created: int, model: str) -> bytes:
    """`data: {"id":...,"object":...,"created":...,"model":...,` — shared by every chunk."""
    return b"".join((b'data: {"id":', _encode(response_id), b',"object":"', obj.encode(),
                     b'","created":', str(created).encode(), b',"model":', _encode(model),
                     b","))


class ChatStreamEncoder:
    """SSE events of one choice (`index`) of a streamed chat completion."""

    __slots__ = ("_choice_head", "_content_head", "_content_tail", "_head", "_obfuscate",
                 "_opening_head", "_running", "_tail", "include_usage", "token_ids")

    def __init__(self, response_id: str, created: int, model: str, include_usage: bool,
                 index: int = 0, token_ids: bool = False,
                 prompt_ids: list[int] | None = None,
                 running_usage: RunningUsage | None = None, obfuscate: bool = False) -> None:
        """`token_ids`: vLLM's `return_token_ids` (the events' ids come in their `logprobs`
        bytes); `prompt_ids`, the prompt's, go at the top of this choice's opening chunk;
        `running_usage`: vLLM's `continuous_usage_stats`, the usage so far in every chunk;
        `obfuscate`: OpenAI's `include_obfuscation`, every chunk with text padded."""
        self._head = _head(response_id, "chat.completion.chunk", created, model)
        self._choice_head = b'%s"choices":[{"index":%d,"delta":' % (self._head, index)
        self._opening_head = self._choice_head if prompt_ids is None else b"".join((
            self._head, b'"prompt_token_ids":', _encode(prompt_ids), b",",
            self._choice_head[len(self._head):]))
        self.token_ids = token_ids
        self._content_head = self._choice_head + b'{"content":'
        # The spec: with include_usage every chunk but the last carries "usage": null.
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        self._content_tail = b'},"logprobs":null,"finish_reason":null}]' + self._tail
        self.include_usage = include_usage
        self._running = running_usage
        self._obfuscate = obfuscate

    def _end(self, opening: bool = False) -> bytes:
        """A chunk's end: its usage field, when there is one, then the event's end."""
        if self._running is None:
            return self._tail
        return _usage_end(self._running(), opening)

    def first(self) -> bytes:
        """The opening chunk: the assistant role and empty content."""
        return b"".join((self._opening_head, b'{"role":"assistant","content":""},"logprobs":',
                         NO_TOKENS if self.token_ids else NULL,
                         b',"finish_reason":null}]', self._end(opening=True)))

    def content(self, text: str, logprobs: bytes = NULL) -> bytes:
        if logprobs is NULL and self._running is None and not self._obfuscate:
            return b"".join((self._content_head, _encode(text), self._content_tail))
        return self._text_event(self._content_head, text, logprobs)

    def finish(self, finish_reason: str, logprobs: bytes = NULL) -> bytes:
        return self._chunk(b"{}", _encode(finish_reason), logprobs)

    def usage(self, usage_: Usage) -> bytes:
        return b"".join((self._head, b'"choices":[],"usage":', _encode(usage_), b"}\n\n"))

    def reasoning(self, text: str, logprobs: bytes = NULL) -> bytes:
        """Reasoning the model wrote, in vLLM's `delta.reasoning`."""
        return self._text_event(self._choice_head + b'{"reasoning":', text, logprobs)

    def _text_event(self, head: bytes, text: str, logprobs: bytes) -> bytes:
        """A chunk of one delta text field (`head` opens it) with its logprobs, padded when
        obfuscated, and running usage when asked for."""
        event = b"".join((head, _encode(text), b'},"logprobs":', logprobs,
                          b',"finish_reason":null}]'))
        return obfuscated(event, self._end()) if self._obfuscate else event + self._end()

    def tool_calls(self, calls: list[ToolCallDelta], complete: int) -> bytes:
        """What the model wrote of its tool calls since the last event, in one event (a chat
        stream does not mark a call's end: `complete` is the Responses API's); b"" when
        nothing was."""
        if not calls:
            return b""
        return self._chunk(b'{"tool_calls":%s}' % _encode(calls), NULL)

    def opening(self) -> bytes:
        return self.first()

    def delta(self, text: str, logprobs: bytes = NULL) -> bytes:
        return self.content(text, logprobs)

    def ending(self, text: str, finish_reason: str, logprobs: bytes = NULL) -> bytes:
        """The last text (if any) and the finish chunk: the end of this choice."""
        if text:
            return self.content(text, logprobs) + self.finish(finish_reason)
        return self.finish(finish_reason, logprobs)

    def closing(self, text: str, finish_reason: str, usage_: Usage,
                logprobs: bytes = NULL) -> bytes:
        """The end of the only choice, the usage chunk if asked for, [DONE]."""
        parts = [self.ending(text, finish_reason, logprobs)]
        if self.include_usage:
            parts.append(self.usage(usage_))
        parts.append(DONE)
        return b"".join(parts)

    def failure(self, error: ApiError) -> bytes:
        """The end of a stream that failed after it started: the error event, [DONE]."""
        return sse_error(error) + DONE

    def _chunk(self, delta: bytes, finish_reason: bytes, logprobs: bytes = NULL) -> bytes:
        return b"".join((self._choice_head, delta, b',"logprobs":', logprobs,
                         b',"finish_reason":', finish_reason, b"}]", self._end()))


class CompletionStreamEncoder:
    """SSE events of one choice (`index`) of a streamed text completion (each a
    `text_completion` object)."""

    __slots__ = ("_head", "_obfuscate", "_opening_head", "_running", "_text_head",
                 "include_usage")

    def __init__(self, response_id: str, created: int, model: str, include_usage: bool,
                 index: int = 0, token_ids: bool = False,
                 prompt_ids: list[int] | None = None,
                 running_usage: RunningUsage | None = None, obfuscate: bool = False) -> None:
        """`token_ids`: vLLM's `return_token_ids` (the events' ids come in their `logprobs`
        bytes); `prompt_ids`, this choice's prompt's, go in an opening event of no text;
        `running_usage`: vLLM's `continuous_usage_stats`, the usage so far in every event;
        `obfuscate`: OpenAI's `include_obfuscation`, every event with text padded."""
        self._head = _head(response_id, "text_completion", created, model)
        self._text_head = b'%s"choices":[{"index":%d,"text":' % (self._head, index)
        self.include_usage = include_usage
        self._running = running_usage
        self._obfuscate = obfuscate
        self._opening_head = b"" if not token_ids else b"".join((
            self._head, b'"choices":[{"index":%d,"prompt_token_ids":' % index,
            _encode(prompt_ids or []), b',"text":"","logprobs":', NO_TOKENS,
            b',"finish_reason":null}]'))

    def _end(self, opening: bool = False) -> bytes:
        if self._running is None:
            return b"}\n\n"
        return _usage_end(self._running(), opening)

    def text(self, text: str, finish_reason: str | None = None, logprobs: bytes = NULL) -> bytes:
        if (finish_reason is None and logprobs is NULL and self._running is None
                and not self._obfuscate):
            return b"".join((self._text_head, _encode(text), _TEXT_TAIL))
        reason = b"null" if finish_reason is None else _encode(finish_reason)
        event = b"".join((self._text_head, _encode(text), b',"logprobs":', logprobs,
                          b',"finish_reason":', reason, b"}]"))
        if self._obfuscate and text:
            return obfuscated(event, self._end())
        return event + self._end()

    def usage(self, usage_: Usage) -> bytes:
        return b"".join((self._head, b'"choices":[],"usage":', _encode(usage_), b"}\n\n"))

    def opening(self) -> bytes:
        return self._opening_head + self._end(opening=True) if self._opening_head else b""

    def delta(self, text: str, logprobs: bytes = NULL) -> bytes:
        return self.text(text, None, logprobs)

    def ending(self, text: str, finish_reason: str, logprobs: bytes = NULL) -> bytes:
        """The last text carrying the finish reason: the end of this choice."""
        return self.text(text, finish_reason, logprobs)

    def closing(self, text: str, finish_reason: str, usage_: Usage,
                logprobs: bytes = NULL) -> bytes:
        """The end of the only choice, the usage chunk if asked for, [DONE]."""
        parts = [self.ending(text, finish_reason, logprobs)]
        if self.include_usage:
            parts.append(self.usage(usage_))
        parts.append(DONE)
        return b"".join(parts)

    def failure(self, error: ApiError) -> bytes:
        """The end of a stream that failed after it started: the error event, [DONE]."""
        return sse_error(error) + DONE
