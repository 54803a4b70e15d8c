"""OpenAI's Responses API (`POST /v1/responses`), stateless, as a translation over chat.

Owns the request subset Turnout honours (`ResponsesRequest`: text and image input, instructions,
sampling, `max_output_tokens`, streaming), its translation into a chat completions request (so
every chat check, the chat template and the whole generation path apply unchanged), and the
`response` object and semantic stream events (`response.created` ... `response.completed`) made
from the generated text. Nothing is stored: `store: true`, `previous_response_id`, hosted
tools and the other stateful fields are refused with a 400 that names them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from services.frontend import protocol
from services.frontend.errors import ApiError, invalid, unsupported
from services.frontend.protocol import ChatCompletionRequest
from services.frontend.reasoning import ReasoningText
from services.frontend.responses import DONE, Usage, obfuscated
from services.frontend.tool_calls import FunctionCall, ToolCall, ToolCallDelta

_encode = msgspec.json.encode
# Chat's names for what a Responses request calls otherwise (in errors raised after translation).
_PARAMS: Final = {"max_completion_tokens": "max_output_tokens", "messages": "input",
                  "response_format.json_schema": "text.format", "response_format": "text.format"}
# The Responses API's function tools are chat's, written flat.
_FUNCTION_FIELDS: Final = ("name", "description", "parameters", "strict")
_ROLES: Final = ("user", "assistant", "system", "developer")


class TextFormat(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    # json_schema's, written flat (chat nests them in `response_format.json_schema`).
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    include_obfuscation: bool | None = None


class ReasoningOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The chat template's `reasoning_effort` (and `enable_thinking`), as vLLM passes it.
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # Only "auto" (no summarizer runs here: the reasoning comes whole, as reasoning_text).
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # the older name


class ResponsesRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    input: str | Annotated[list[dict[str, Any]], Meta(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    text: TextOptions | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    cache_salt: str | None = None  # vLLM's, as on chat
    priority: int | None = None  # vLLM's, as on chat
    reasoning: ReasoningOptions | None = None
    # Refused when set: state and hosted tools are not kept or run here.
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    context_management: Any = None


_decoder = msgspec.json.Decoder(ResponsesRequest)


class ResponseShell:
    """What a response object repeats of its request, and its ids; `render` fills in the
    output, status and usage."""

    __slots__ = ("_fields", "item_id", "reasoning_id", "response_id")

    def __init__(self, request: ResponsesRequest, request_id: str, model: str) -> None:
        self.response_id = "resp_" + request_id
        self.item_id = "msg_" + request_id
        self.reasoning_id = "rs_" + request_id
        self._fields: dict[str, Any] = {
            "id": self.response_id, "object": "response", "created_at": int(time.time()),
            "model": model, "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "metadata": request.metadata or {},
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": None, "store": False,
            "reasoning": None if request.reasoning is None else {
                "effort": request.reasoning.effort, "summary": request.reasoning.summary
                or request.reasoning.generate_summary},
            "text": {"format": _format_echo(request)},
            "tool_choice": request.tool_choice or "auto",
            "tools": [{"type": "function", "name": tool.get("name"),
                       "description": tool.get("description"),
                       "parameters": tool.get("parameters"), "strict": tool.get("strict")}
                      for tool in request.tools or ()],
            "truncation": request.truncation or "disabled", "error": None,
            "incomplete_details": None,
        }
        if request.user is not None:  # a string when present
            self._fields["user"] = request.user

    def message(self, text: str | None, finish: str | None) -> dict[str, Any]:
        """The output message item: in progress (no text yet), or done with `text`."""
        if text is None:
            return {"type": "message", "id": self.item_id, "status": "in_progress",
                    "role": "assistant", "content": []}
        return {"type": "message", "id": self.item_id, "status": _item_status(finish),
                "role": "assistant", "content": [_text_part(text)]}

    def reasoning_item(self, text: str | None, status: str) -> dict[str, Any]:
        """The reasoning item (`--reasoning-parser`): in progress (no text yet), or done."""
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [],
                "content": [] if text is None else [{"type": "reasoning_text", "text": text}],
                "status": status}

    def render(self, text: str | None, finish: str | None, usage: Usage | None,
               calls: list[ToolCall] | None = None, complete: int | None = None,
               reasoning: str | None = None, thinking: bool = False) -> dict[str, Any]:
        """The response object: in progress (`text` None) or finished: the model's
        reasoning first when it wrote any, its message, then the function calls it made
        (those past the first `complete`, when given, left unfinished: cut short).
        `thinking`: the reply ended inside its thinking; cut short there, it has no
        message, as OpenAI's when the tokens ran out before the answer."""
        out = dict(self._fields)
        if text is None:
            out.update(status="in_progress", output=[])
            return out
        status = _item_status(finish)
        cut_thinking = thinking and status == "incomplete"
        out.update(status=status, usage=_usage(usage), output=self._output(
            reasoning, status if thinking else "completed",
            None if cut_thinking else self.message(text, finish), calls, complete))
        if status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            out["completed_at"] = int(time.time())
        return out

    def failed(self, text: str | None, error: ApiError, reasoning: str | None = None,
               calls: list[ToolCall] | None = None, complete: int = 0) -> dict[str, Any]:
        """The response object of a stream that failed part-way: the items it had opened,
        each left incomplete unless it was done (the reasoning, when `text` is None the
        message never opened; the first `complete` calls), and the error in OpenAI's
        codes."""
        out = dict(self._fields)
        # The answer began: the reasoning before it is done, the message not ("length").
        output = self._output(reasoning, "incomplete" if text is None else "completed",
                              None if text is None else self.message(text, "length"), calls,
                              complete)
        out.update(status="failed", output=output,
                   error={"code": _failure_code(error.status), "message": error.message})
        return out

    def _output(self, reasoning: str | None, reasoning_status: str,
                message: dict[str, Any] | None, calls: list[ToolCall] | None,
                complete: int | None) -> list[dict[str, Any]]:
        """The output items in OpenAI's order: the reasoning (when any was written), the
        message (when there is one), then the calls, those past the first `complete` (when
        given) unfinished."""
        return [*([self.reasoning_item(reasoning, reasoning_status)]
                  if reasoning is not None else ()),
                *((message,) if message is not None else ()),
                *(function_call(call, _call_status(i, complete))
                  for i, call in enumerate(calls or ()))]


def _failure_code(status: int) -> str:
    if status == 429:
        return "rate_limit_exceeded"
    return "invalid_prompt" if 400 <= status < 500 else "server_error"


def _function_item_id(call: ToolCall) -> str:
    return "fc_" + call.id.removeprefix("call_")


def function_call(call: ToolCall, status: str, arguments: str | None = None) -> dict[str, Any]:
    """A function call output item (its `arguments` as written, unless given)."""
    return {"type": "function_call", "id": _function_item_id(call),
            "call_id": call.id, "name": call.function.name,
            "arguments": call.function.arguments if arguments is None else arguments,
            "status": status}


def _call_status(index: int, complete: int | None) -> str:
    return "completed" if complete is None or index < complete else "incomplete"


def _item_status(finish: str | None) -> str:
    return "incomplete" if finish == "length" else "completed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.completion_tokens_details
                                      .reasoning_tokens if usage.completion_tokens_details
                                      else 0},
            "total_tokens": usage.total_tokens}


def parse(raw: bytes) -> tuple[ResponsesRequest, ChatCompletionRequest]:
    """Decode and check a Responses body, and translate it into the chat request it runs as;
    raises `ApiError`."""
    request: ResponsesRequest = protocol.decode_body(_decoder, raw)
    _refuse_unsupported(request)
    chat: dict[str, Any] = {"model": request.model, "messages": _messages(request),
                            "stream": bool(request.stream)}
    for name, value in (("max_completion_tokens", request.max_output_tokens),
                        ("temperature", request.temperature), ("top_p", request.top_p),
                        ("user", request.user), ("metadata", request.metadata),
                        ("safety_identifier", request.safety_identifier),
                        ("prompt_cache_key", request.prompt_cache_key),
                        ("prompt_cache_retention", request.prompt_cache_retention),
                        ("service_tier", request.service_tier),
                        ("tools", _chat_tools(request.tools)),
                        ("tool_choice", _chat_tool_choice(request.tool_choice)),
                        ("parallel_tool_calls", request.parallel_tool_calls),
                        ("cache_salt", request.cache_salt), ("priority", request.priority),
                        ("reasoning_effort", request.reasoning and request.reasoning.effort),
                        ("response_format", _response_format(request))):
        if value is not None:
            chat[name] = value
    try:
        return request, protocol.parse_chat(_encode(chat))
    except ApiError as exc:
        raise renamed(exc) from None


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """A named function, written flat here, as chat nests it."""
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(request: ResponsesRequest) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format`."""
    fmt = request.text.format if request.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else {"type": fmt.type}
    spec = {name: getattr(fmt, name) for name in ("name", "schema", "description", "strict")
            if getattr(fmt, name) is not None}
    return {"type": "json_schema", "json_schema": spec}


def _format_echo(request: ResponsesRequest) -> dict[str, Any]:
    fmt = request.text.format if request.text is not None else None
    return {"type": "text"} if fmt is None else msgspec.to_builtins(fmt)


def renamed(error: ApiError) -> ApiError:
    """`error` with chat's parameter names as this API calls them."""
    if error.param is None:
        return error
    for chat_name, name in _PARAMS.items():
        if error.param == chat_name or error.param.startswith((chat_name + "[",
                                                               chat_name + ".")):
            error.message = error.message.replace(chat_name, name)
            error.param = name + error.param[len(chat_name):]
    if error.param.startswith(("tools[", "tool_choice.")) and ".function." in error.param:
        # written flat here
        error.message = error.message.replace(".function.", ".")
        error.param = error.param.replace(".function.", ".")
    return error


def wants_obfuscation(request: ResponsesRequest) -> bool:
    """`stream_options.include_obfuscation` asked for in so many words (off by default, as
    chat's)."""
    options = request.stream_options
    return options is not None and options.include_obfuscation is True


def _refuse_unsupported(request: ResponsesRequest) -> None:
    if request.store:
        raise unsupported("store", "responses are not stored; send store: false")
    for name in ("background", "previous_response_id", "conversation", "prompt",
                 "max_tool_calls", "top_logprobs", "context_management"):
        if getattr(request, name) not in (None, False):
            raise unsupported(name)
    if request.include:
        raise unsupported("include")
    reasoning = request.reasoning
    if reasoning is not None:
        for name in ("summary", "generate_summary"):
            if getattr(reasoning, name) not in (None, "auto"):
                raise unsupported(f"reasoning.{name}", "no reasoning summaries are written "
                                                       "here; the reasoning comes whole")
    for i, tool in enumerate(request.tools or ()):
        if tool.get("type") != "function":
            raise unsupported(f"tools[{i}].type", "only function tools are supported")
    choice = request.tool_choice
    if isinstance(choice, dict) and choice.get("type") != "function":
        raise unsupported("tool_choice.type", "only a named function is supported")
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise invalid(f"Invalid value for 'tool_choice': {choice!r}", "tool_choice",
                      "invalid_value")
    if request.truncation == "auto":
        raise unsupported("truncation", "only 'disabled' is supported")
    text = request.text
    if text is not None:
        if text.format is not None and text.format.type == "json_schema" \
                and text.format.name is None:
            raise invalid("Missing required parameter: 'text.format.name'.", "text.format.name",
                          "missing_required_parameter")
        if text.verbosity is not None:
            raise unsupported("text.verbosity")
    if request.stream_options is not None and not request.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    return [{"type": "function",
             "function": {k: tool[k] for k in _FUNCTION_FIELDS if tool.get(k) is not None}}
            for tool in tools]


def _messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages: the instructions first (as OpenAI places them), then
    each input item; an earlier reasoning item, the assistant message and function calls
    after it are one assistant turn (as that turn's output lists them), each output a tool
    message."""
    messages: list[dict[str, Any]] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
        return messages
    for index, item in enumerate(request.input):
        where = f"input[{index}]"
        kind = item.get("type", "message")
        last = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if kind == "function_call":
            call = _function_call(item, where)
            if last is not None:  # the calls after a turn's message are that turn's
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_function_output(item, where))
        elif kind == "reasoning":
            messages.append({"role": "assistant", "content": None,
                             "reasoning": _reasoning_text(item, where)})
        else:
            message = _message(item, where)
            if last is not None and message["role"] == "assistant" and _thought_only(last):
                last["content"] = message["content"]
            else:
                messages.append(message)
    return messages


def _thought_only(message: dict[str, Any]) -> bool:
    """An assistant turn that so far holds only its reasoning."""
    return message["content"] is None and "tool_calls" not in message and "reasoning" in message


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    """An earlier reasoning item's text (its content, else its summary), for the template."""
    for field, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(field) or []
        if not isinstance(parts, list) or not all(
                isinstance(part, dict) and part.get("type") == kind
                and isinstance(part.get("text"), str) for part in parts):
            raise invalid(f"Invalid value for '{where}.{field}': expected a list of {kind} "
                          "parts", f"{where}.{field}", "invalid_value")
        if parts:
            return "".join(part["text"] for part in parts)
    return ""


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str):
            raise invalid(f"Invalid value for '{where}.{name}': expected a string",
                          f"{where}.{name}", "invalid_value")
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def _function_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    output = item.get("output")
    if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
        raise invalid(f"Invalid value for '{where}': a function_call_output has a 'call_id' "
                      "and a text 'output'", where, "invalid_value")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": output}


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind != "message":
        raise unsupported(f"{where}.type", f"input items of type {kind!r} are not supported; "
                                           "send messages")
    role = item.get("role")
    if role not in _ROLES:
        raise invalid(f"Invalid value for '{where}.role': expected one of {', '.join(_ROLES)}",
                      f"{where}.role", "invalid_value")
    unknown = set(item) - {"type", "role", "content", "id", "status"}
    if unknown:
        raise invalid(f"Unrecognized request argument supplied: {where}.{sorted(unknown)[0]}",
                      f"{where}.{sorted(unknown)[0]}", "unknown_parameter")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list) or not content:
        raise invalid(f"Invalid value for '{where}.content': expected a string or a non-empty "
                      "list of content parts", f"{where}.content", "invalid_value")
    return {"role": role, "content": [_part(part, f"{where}.content[{i}]")
                                      for i, part in enumerate(content)]}


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise unsupported(f"{where}.image_url", "an image is given by its URL or data URL "
                                                    "(file ids are not stored here)")
        image: dict[str, Any] = {"url": url}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind in ("input_file", "input_audio", "refusal"):
        raise unsupported(f"{where}.type", f"{kind} content is not supported")
    raise invalid(f"Invalid value for '{where}': expected an input_text, output_text or "
                  "input_image part", where, "invalid_value")


class ResponsesStreamEncoder:
    """The semantic SSE events of a streamed response: `opening`, `delta` and `closing`, as the
    chat and completion stream encoders have them for one choice (its usage goes in the final
    event)."""

    __slots__ = ("_base", "_calls", "_calls_done", "_message_open", "_obfuscate", "_parts",
                 "_reader", "_sequence", "_shell", "_thought")

    def __init__(self, shell: ResponseShell, obfuscate: bool = False,
                 reasoning: ReasoningText | None = None) -> None:
        """`obfuscate`: `stream_options.include_obfuscation`, every text delta padded;
        `reasoning`: the reply's splitter when it may begin with reasoning, its own item
        ahead of the message (which then opens with the answer)."""
        self._reader = reasoning
        self._shell = shell
        self._parts: list[str] = []
        self._sequence = 0
        self._obfuscate = obfuscate
        self._calls: list[ToolCall] = []
        self._calls_done = 0  # of `_calls`, those whose done events were sent
        self._message_open = reasoning is None
        self._thought: list[str] | None = None  # the reasoning item's text, once it opens
        self._base = 0  # the message's output index

    def _event(self, kind: str, padded: bool = False, **fields: Any) -> bytes:
        fields = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        data = _encode(fields)
        if padded:
            data = obfuscated(data[:-1], b"}")
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), data)

    def _item(self) -> dict[str, Any]:
        return {"item_id": self._shell.item_id, "output_index": self._base, "content_index": 0}

    def opening(self) -> bytes:
        started = self._shell.render(None, None, None)
        events = [self._event("response.created", response=started),
                  self._event("response.in_progress", response=started)]
        if self._message_open:
            events += self._message_opening()
        return b"".join(events)

    def _message_opening(self) -> list[bytes]:
        return [self._event("response.output_item.added", output_index=self._base,
                            item=self._shell.message(None, None)),
                self._event("response.content_part.added", part=_text_part(""), **self._item())]

    def _open_message(self) -> list[bytes]:
        """The message's opening, once the answer begins: the reasoning item before it
        ends."""
        if self._message_open:
            return []
        self._message_open = True
        return self._reasoning_ended("completed") + self._message_opening()

    def _reasoning_ended(self, status: str) -> list[bytes]:
        """The done events of the reasoning item, if one opened."""
        if self._thought is None:
            return []
        thought = "".join(self._thought)
        place = {"item_id": self._shell.reasoning_id, "output_index": 0, "content_index": 0}
        self._base = 1
        return [self._event("response.reasoning_text.done", text=thought, **place),
                self._event("response.output_item.done", output_index=0,
                            item=self._shell.reasoning_item(thought, status))]

    def reasoning(self, text: str, logprobs: bytes = b"null") -> bytes:
        """Reasoning the model wrote, in its own item ahead of the message."""
        events = []
        if self._thought is None:
            self._thought = []
            events.append(self._event("response.output_item.added", output_index=0,
                                      item=self._shell.reasoning_item(None, "in_progress")))
        self._thought.append(text)
        events.append(self._event("response.reasoning_text.delta", self._obfuscate, delta=text,
                                  item_id=self._shell.reasoning_id, output_index=0,
                                  content_index=0))
        return b"".join(events)

    def delta(self, text: str, logprobs: bytes = b"null") -> bytes:
        self._parts.append(text)
        return b"".join((*self._open_message(), self._event(
            "response.output_text.delta", self._obfuscate, delta=text, logprobs=[],
            **self._item())))

    def tool_calls(self, calls: list[ToolCallDelta], complete: int) -> bytes:
        """What the model wrote of its function calls since the last event: each call an
        output item after the message, its arguments in deltas as they are written, and done
        once it is one of the first `complete` calls (written to its end)."""
        events = self._open_message() if calls else []
        for delta in calls:
            if delta.id is not None:  # a call opens
                call = ToolCall(delta.id, FunctionCall(delta.function.name or "", ""))
                self._calls.append(call)
                events.append(self._event(
                    "response.output_item.added", output_index=self._call_index(delta.index),
                    item=function_call(call, "in_progress", "")))
            call = self._calls[delta.index]
            call.function.arguments += delta.function.arguments
            events.append(self._event("response.function_call_arguments.delta",
                                      delta=delta.function.arguments,
                                      **self._place(call, delta.index)))
        events += self._calls_ended(complete, "completed")
        return b"".join(events)

    def _call_index(self, index: int) -> int:
        """The output index of the call at `index`: after the message."""
        return self._base + 1 + index

    def _place(self, call: ToolCall, index: int) -> dict[str, Any]:
        """Where a call's streamed events point: its item and output index."""
        return {"item_id": _function_item_id(call), "output_index": self._call_index(index)}

    def _calls_ended(self, upto: int, status: str) -> list[bytes]:
        """The done events of the calls before `upto` not yet ended."""
        events = []
        for index in range(self._calls_done, upto):
            call = self._calls[index]
            events += (
                self._event("response.function_call_arguments.done",
                            arguments=call.function.arguments, name=call.function.name,
                            **self._place(call, index)),
                self._event("response.output_item.done", output_index=self._call_index(index),
                            item=function_call(call, status)))
        self._calls_done = max(self._calls_done, upto)
        return events

    def closing(self, text: str, finish_reason: str, usage_: Usage,
                logprobs: bytes = b"null") -> bytes:
        thought = None if self._thought is None else "".join(self._thought)
        if self._reader is not None and self._reader.thinking \
                and _item_status(finish_reason) == "incomplete":
            # Cut short inside the thinking: no answer began, so no message.
            done = self._shell.render("", finish_reason, usage_, reasoning=thought,
                                      thinking=True)
            return b"".join((*self._reasoning_ended("incomplete"),
                             self._event("response.incomplete", response=done), DONE))
        events = [self.delta(text)] if text else self._open_message()
        # A call the reply was cut short in ends with it, unfinished.
        complete = self._calls_done
        events += self._calls_ended(len(self._calls), "incomplete")
        whole = "".join(self._parts)
        done = self._shell.render(whole, finish_reason, usage_, self._calls, complete, thought)
        events += (
            self._event("response.output_text.done", text=whole, logprobs=[], **self._item()),
            self._event("response.content_part.done", part=_text_part(whole), **self._item()),
            self._event("response.output_item.done", output_index=self._base,
                        item=done["output"][self._base]),
            self._event("response.incomplete" if done["status"] == "incomplete"
                        else "response.completed", response=done),
            DONE)  # as the other endpoints end their streams (clients stop on it)
        return b"".join(events)

    def failure(self, error: ApiError) -> bytes:
        """The end of a stream that failed after it started: `response.failed` with the
        text so far, then [DONE] as `closing` ends."""
        failed = self._shell.failed(
            "".join(self._parts) if self._message_open else None, error,
            None if self._thought is None else "".join(self._thought), self._calls,
            self._calls_done)
        return self._event("response.failed", response=failed) + DONE


def response_body(shell: ResponseShell, text: str, finish: str, usage: Usage,
                  calls: list[ToolCall] | None = None, complete: int | None = None,
                  reasoning: str | None = None, thinking: bool = False) -> bytes:
    return _encode(shell.render(text, finish, usage, calls, complete, reasoning, thinking))

