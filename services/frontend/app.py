"""The OpenAI HTTP API as a raw ASGI application (run it under uvicorn).

Owns routing (POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}],
/health, /live, /metrics), the life of one generation request (validate → resolve the model →
tokenize → open an upstream stream per completion asked for (`n`, a batch of prompts) →
detokenize, apply stop strings → answer whole or as SSE, the choices merged), admission slots,
client-disconnect cancellation and the HTTP metrics. Does not own the transport to routers
(`upstream`), process wiring (`main`) or the wire format of bodies (`protocol`, `responses`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, TypeVar

import msgspec
from prometheus_client import Gauge

from common.messages import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerateRequest,
    ImageInput,
    TokenChunk,
    TokenLogprob,
)
from services.frontend import protocol, responses, responses_api
from services.frontend.api_keys import ApiKeys, KeyPolicy
from services.frontend.chat_template import ChatTemplateError
from services.frontend.choices import ChoiceStreams
from services.frontend.errors import ApiError, invalid, unsupported
from services.frontend.images import ChatImages, ImageLimits
from services.frontend.limits import AdmissionQueue, cap_tokens
from services.frontend.logprobs import NULL as NULL_LOGPROBS
from services.frontend.logprobs import ChoiceLogprobs, PromptLogprobs
from services.frontend.metrics import FrontendMetrics, ModelMetrics
from services.frontend.quotas import Grant, QuotaExceeded, Quotas, retry_after_headers
from services.frontend.reasoning import READS_SPECIAL_TOKENS as REASONING_PARSERS_READING_SPECIALS
from services.frontend.reasoning import ReasoningText, thinks
from services.frontend.stop_matcher import StopMatcher
from services.frontend.tokenizer import INLINE_TOKENIZE_MAX_CHARS, Tokenizer
from services.frontend.tool_calls import PARSERS as TOOL_PARSERS
from services.frontend.tool_calls import READS_SPECIAL_TOKENS as TOOL_PARSERS_READING_SPECIALS
from services.frontend.tool_calls import (
    ForcedCallText,
    JsonCallText,
    PythonCallText,
    ToolCallText,
    call_reader,
)
from services.frontend.upstream import ChunkStream, NoWorkersError, Upstream

log = logging.getLogger("turnout.frontend")
T = TypeVar("T")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES: Final = 64 * 1024 * 1024
# Context length to assume when neither the config nor any worker states one.
FALLBACK_MAX_MODEL_LEN: Final = 4096
MODEL_PATH: Final = "/v1/models/"
CHAT: Final = "chat"
COMPLETIONS: Final = "completions"
RESPONSES: Final = "responses"  # OpenAI's Responses API, run as a chat request
WORKER_HEADER: Final = b"x-worker-instance-id"
# Gateway API Inference Extension: the endpoint picker's choice, "IP:PORT" (a comma-separated
# list is primary first, then fallbacks). The router matches it against workers' endpoints.
GATEWAY_ENDPOINT_HEADER: Final = b"x-gateway-destination-endpoint"
# vLLM's: a request's priority, in place of the body's (gateways set it per route or tenant).
PRIORITY_HEADER: Final = b"x-vllm-priority"
# Where a request's API key policy and quota grant travel in the ASGI scope.
KEY_SCOPE: Final = "turnout.api_key"
GRANT_SCOPE: Final = "turnout.grant"

_JSON_HEADERS: Final = [(b"content-type", b"application/json")]
_SSE_HEADERS: Final = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_FAILED: Final = (FINISH_ERROR, FINISH_ABORT)
# What one choice of several read from a batch: its index, text and logprobs JSON, and the
# reasoning (text, logprobs JSON) it read ahead of the text, if any.
_ChoiceBatch = tuple[int, str, bytes, tuple[str, bytes] | None]
# Finish reasons the OpenAI schemas allow; the engine's are mapped onto these.
_FINISH: Final = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}
_json: Final = msgspec.json.encode
# Paths outside /v1/ that a key guards too: they cost tokenizer time.
_KEYED: Final = frozenset(("/tokenize", "/detokenize"))


class Generation:
    """One request's generated stream as it is turned into text.

    `consume` takes every chunk that piled up since the last call and returns the text they
    complete; afterwards `finish` (an OpenAI finish reason) or `error` says whether it ended.
    """

    __slots__ = ("cached_tokens", "detokenizer", "disconnected", "done", "echo", "echo_ids",
                 "error", "finish", "first_token_at", "ids_out", "last_token_at", "logprobs",
                 "matcher", "prompt_logprobs", "prompt_only", "queued", "reasoning",
                 "reasoning_tokens", "request_id", "response_started",
                 "saw_first_chunk", "stop_ids", "stopped_by_string", "tokens", "tools",
                 "upstream_finished")

    def __init__(self, request_id: str, tokenizer: Tokenizer, stops: tuple[str, ...],
                 stop_ids: frozenset[int], logprobs: ChoiceLogprobs | None = None,
                 include_stop: bool = False, skip_special: bool = True) -> None:
        self.request_id = request_id
        self.detokenizer = tokenizer.new_detokenizer(skip_special)
        self.logprobs = logprobs  # None: not asked for
        self.echo = ""  # what `echo` puts first: a completion's prompt, chat's last message
        self.echo_ids: list[int] | None = None  # and its tokens, when logprobs are asked too
        self.prompt_only = False  # echo with max_tokens 0: the engine's one token is not shown
        self.prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked for
        # vLLM's return_token_ids: the ids counted since the last event (None: not asked).
        self.ids_out: list[int] | None = None
        self.matcher = StopMatcher(stops, include_stop) if stops else None
        self.stop_ids = stop_ids
        self.tokens = 0
        self.cached_tokens = 0
        self.saw_first_chunk = False
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.finish: str | None = None
        self.error: ApiError | None = None
        self.upstream_finished = False
        self.stopped_by_string = False
        self.done = False  # the last byte is being sent: a disconnect now is not the client's
        self.disconnected = False
        self.response_started = False
        self.queued: Gauge | None = None  # the queued-requests gauge, until the first chunk
        # The reasoning split from the answer (`--reasoning-parser`), then the tool calls read
        # out of the answer, when asked.
        self.reasoning: ReasoningText | None = None
        self.reasoning_tokens = 0
        self.tools: ToolCallText | JsonCallText | PythonCallText | ForcedCallText | None = None

    def consume(self, batch: list[TokenChunk]) -> str:
        counted = self.tokens
        text = self._consume(batch)
        ended = self.finish is not None or self.error is not None
        if self.reasoning is not None:
            text = self._split(text, self.tokens - counted, ended)
        tools = self.tools
        if tools is None:
            return text
        text = tools.feed(text)
        if ended:
            text += tools.end()
            if tools.calls and self.finish == "stop":
                self.finish = tools.finish_reason
        return text

    def _split(self, text: str, tokens: int, ended: bool) -> str:
        """The answer in `text` (the reasoning kept by the reader), and how many of the
        batch's `tokens` were thinking: all while it goes on; of the batch it ends in, a share
        as large as the reasoning's share of its text."""
        reader = self.reasoning
        assert reader is not None
        if not reader.thinking:
            return text
        read = reader.read
        text = reader.feed(text)
        if ended:
            reader.end()
        if reader.thinking:
            self.reasoning_tokens += tokens
        elif tokens:
            thought = reader.read - read
            self.reasoning_tokens += round(tokens * thought / max(1, thought + len(text)))
        return text

    def _consume(self, batch: list[TokenChunk]) -> str:
        if not batch:
            self.error = ApiError(500, "the upstream stream ended without a finish reason",
                                  reason="upstream_error")
            return self._drain()
        if not self.saw_first_chunk:
            return self._consume_first(batch)
        if len(batch) == 1:
            chunk = batch[0]
            if chunk.error_code or chunk.finish_reason in _FAILED:
                self.error = _chunk_error(chunk)
                return ""
            ids = chunk.token_ids
            finish = chunk.finish_reason
            logprobs = chunk.logprobs
        else:
            ids = []
            finish = None
            logprobs: list[TokenLogprob] | None = None
            for chunk in batch:
                if chunk.error_code or chunk.finish_reason in _FAILED:
                    text = self._text(ids, None, logprobs)
                    if self.finish is None:  # unless a stop string already ended it
                        self.error = _chunk_error(chunk)
                    return text
                ids.extend(chunk.token_ids)
                if chunk.logprobs:
                    if logprobs is None:
                        logprobs = []
                    logprobs.extend(chunk.logprobs)
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                    break
        if ids:
            now = time.perf_counter()
            if not self.tokens:
                self.first_token_at = now
            self.last_token_at = now
        return self._text(ids, finish, logprobs)

    def _consume_first(self, batch: list[TokenChunk]) -> str:
        """The first batch: the prompt's figures, and an echoed prompt ahead of the text."""
        self.saw_first_chunk = True
        self.cached_tokens = batch[0].cached_tokens
        self.left_queue()
        if self.echo_ids is not None and self.logprobs is not None:
            self.logprobs.add_prompt(self.echo_ids, batch[0].prompt_logprobs)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs.scores = batch[0].prompt_logprobs
        return self.echo + self._consume(batch)

    def left_queue(self) -> None:
        if self.queued is not None:
            self.queued.dec()
            self.queued = None

    def _text(self, ids: list[int], finish: str | None,
              logprobs: list[TokenLogprob] | None) -> str:
        if finish is not None:
            self.upstream_finished = True
            self.finish = _FINISH.get(finish, "stop")
        if self.prompt_only:  # nothing generated is shown, counted or scored
            if finish is not None:
                self.finish = "length"
            return ""
        # A stop token (EOS or a stop_token_id) is counted but not shown.
        hidden = finish == FINISH_STOP and bool(ids) and ids[-1] in self.stop_ids
        matcher = self.matcher
        if matcher is None:
            self.tokens += len(ids)
            if self.ids_out is not None:
                self.ids_out += ids
            shown = ids[:-1] if hidden else ids
            if self.logprobs is not None and logprobs:
                self.logprobs.add(shown, logprobs)
            text = self.detokenizer.step(shown)
            return text + self.detokenizer.flush() if finish is not None else text
        # With stop strings, decode token by token so usage counts up to the stopping token.
        out = []
        last = len(ids) - 1
        for i, token in enumerate(ids):
            self.tokens += 1
            if self.ids_out is not None:
                self.ids_out.append(token)
            if hidden and i == last:
                break
            if self.logprobs is not None and logprobs:
                self.logprobs.add([token], logprobs[i:i + 1])
            piece = self.detokenizer.step([token])
            if piece:
                emit, stopped = matcher.feed(piece)
                if emit:
                    out.append(emit)
                if stopped:
                    self.finish = "stop"
                    self.stopped_by_string = True
                    return "".join(out)
        if finish is not None:
            out.append(self._drain())
        return "".join(out)

    def _drain(self) -> str:
        """What the detokenizer and stop matcher still hold, at the end of the stream."""
        tail = self.detokenizer.flush()
        matcher = self.matcher
        if matcher is None:
            return tail
        emit, stopped = matcher.feed(tail) if tail else ("", False)
        if stopped:
            self.finish = "stop"
            self.stopped_by_string = True
            return emit
        return emit + matcher.flush()

    def usage(self, prompt_tokens: int) -> responses.Usage:
        return responses.usage(prompt_tokens, self.tokens, self.cached_tokens,
                               self.reasoning_tokens if self.reasoning is not None else None)

    def logprobs_with(self, text: str) -> bytes:
        """The JSON of the logprobs to send with `text`: those of the tokens shown since the
        last call, once they show text (or the choice has ended); else "null"."""
        if self.logprobs is None or not (text or self.finish or self.error):
            return NULL_LOGPROBS
        return self.logprobs.take()

    @property
    def plain(self) -> bool:
        """Its events carry text alone: neither logprobs nor token ids were asked for."""
        return self.logprobs is None and self.ids_out is None

    def fields_with(self, text: str) -> bytes:
        """What a streamed event with `text` carries after `"logprobs":` (`responses`): the
        logprobs, then, when asked, the ids of the tokens counted since the last event (taken
        under the same rule as the logprobs, so none is lost with a batch that shows no
        text)."""
        if self.ids_out is None:
            return self.logprobs_with(text)
        if not (text or self.finish or self.error):
            return NULL_LOGPROBS
        ids, self.ids_out = self.ids_out, []
        return b"".join((self.logprobs_with(text), b',"token_ids":', _json(ids)))

    def take_reasoning(self) -> tuple[str, bytes] | None:
        """The reasoning read since the last take, with what its event carries after
        `"logprobs":` (`fields_with`); None when none was read."""
        text = self.reasoning.take() if self.reasoning is not None else ""
        return (text, self.fields_with(text)) if text else None

    def take_ids(self) -> list[int]:
        ids, self.ids_out = self.ids_out or [], []
        return ids


def _chunk_error(chunk: TokenChunk) -> ApiError:
    code = chunk.error_code
    status = code if 400 <= code < 600 else 500
    if chunk.error_message:
        message = chunk.error_message
    elif chunk.finish_reason == FINISH_ABORT:
        message = "the request was aborted upstream"
    else:
        message = "generation failed upstream"
    return ApiError(status, message, reason="upstream_error")


def _quota_error(exc: QuotaExceeded, with_limits: bool = True) -> ApiError:
    """A key over its quota → OpenAI's 429 (type "requests" or "tokens"); `with_limits`: carry
    the `x-ratelimit-*` headers (else the response's `send` adds them)."""
    headers = list(exc.headers) if with_limits else []
    if exc.retry_after_s is not None:
        headers += retry_after_headers(exc.retry_after_s)
    code = ("request_too_large" if exc.retry_after_s is None  # waiting cannot help
            else "concurrency_limit_exceeded" if exc.kind == "streams" else "rate_limit_exceeded")
    return ApiError(429, exc.message, type="tokens" if exc.kind == "tokens" else "requests",
                    code=code, reason="rate_limited", headers=headers)


def _target_worker(scope: Scope) -> str | None:
    """The worker an upstream gateway chose: `x-worker-instance-id` (an instance id), else
    `x-gateway-destination-endpoint` (checked to be IP:PORT[,IP:PORT...])."""
    endpoint = None
    for name, value in scope["headers"]:
        if name == WORKER_HEADER:
            return value.decode("latin-1")
        if name == GATEWAY_ENDPOINT_HEADER:
            endpoint = value.decode("latin-1")
    if endpoint is None:
        return None
    parts = [p.strip() for p in endpoint.split(",")]
    if not all(_is_host_port(p) for p in parts):
        raise ApiError(400, f"header x-gateway-destination-endpoint must be IP:PORT (or a "
                            f"comma-separated list of them), got {endpoint!r}",
                       param="x-gateway-destination-endpoint",
                       code="invalid_destination_endpoint", reason="bad_destination")
    return ",".join(parts)


def _priority(scope: Scope, given: int) -> int:
    """The request's priority: vLLM's `x-vllm-priority` header when sent (an integer), else
    the body's."""
    for name, value in scope["headers"]:
        if name == PRIORITY_HEADER:
            text = value.decode("latin-1").strip()
            try:
                priority = int(text)
            except ValueError:
                priority = None
            if priority is None or not -(2**63) <= priority < 2**63:
                raise ApiError(400, f"header x-vllm-priority must be an integer, got {text!r}",
                               param="x-vllm-priority", code="invalid_value")
            return priority
    return given


def _is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # [IPv6]:port
        host = host[1:-1]
    return bool(sep and host and port.isascii() and port.isdigit()
                and 0 < int(port) < 65536 and "," not in host and " " not in host)


def _check_json_body(scope: Scope) -> None:
    """415 unless the body is declared JSON: the spec's request bodies are application/json only
    (`application/*+json` and parameters such as charset are fine). A request with no
    Content-Type at all is read as JSON, for clients that leave it out."""
    for name, value in scope["headers"]:
        if name != b"content-type":
            continue
        media = value.split(b";", 1)[0].strip().lower()
        if media != b"application/json" and not (media.startswith(b"application/")
                                                 and media.endswith(b"+json")):
            raise ApiError(415, "Content-Type must be application/json, got "
                                f"{value.decode('latin-1')!r}", code="unsupported_media_type",
                           reason="media_type")


async def _read_body(receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The whole request body, or None if the client left first."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body = message.get("body", b"")
        if not message.get("more_body", False):
            if not parts:
                return body
            parts.append(body)
            return b"".join(parts)
        parts.append(body)
        size += len(body)
        if size > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes",
                           reason="too_large")


async def _send_bytes(send: Send, status: int, body: bytes,
                      headers: list[tuple[bytes, bytes]] = _JSON_HEADERS) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class FrontendApp:
    """The ASGI callable; one per frontend process."""

    def __init__(self, upstream: Upstream, tokenizer: Tokenizer, served_model_name: str | None,
                 max_model_len: int, metrics: FrontendMetrics, api_key: str | None = None, *,
                 api_keys: ApiKeys | None = None, quotas: Quotas | None = None,
                 admission: AdmissionQueue | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 max_prompt_tokens: int = 0, max_output_tokens: int = 0,
                 stream_interval: int = 0, images: ChatImages | None = None,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None
                 ) -> None:
        """`api_keys` (else `api_key`, a single unrestricted key): who may call /v1/;
        `quotas` their limits (default: a fresh `Quotas`); `admission` the generations
        allowed in flight (default: no limit); `stream_interval` tokens per SSE
        event (0: whatever piled up while the last event was being written);
        `tool_call_parser`: the syntax of the model's tool calls (`tool_calls.PARSERS`; None:
        requests with tools are refused); `reasoning_parser`: how the model marks its
        thinking (`reasoning.PARSERS`; None: its text is all answer)."""
        self.upstream = upstream
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name or None
        self.max_model_len = max_model_len
        self.metrics = metrics
        if api_keys is None and api_key:
            api_keys = ApiKeys(single_key=api_key)
        self.api_keys = api_keys
        self.quotas = quotas if quotas is not None else Quotas()
        self.admission = admission if admission is not None else AdmissionQueue(0, 0, 1.0)
        self.max_body_bytes = max_body_bytes
        self.max_prompt_tokens = max_prompt_tokens
        self.max_output_tokens = max_output_tokens
        metrics.admission_active.set_function(lambda: self.admission.active)
        metrics.admission_waiting.set_function(lambda: self.admission.waiting)
        self.stream_interval = stream_interval
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self.images = images if images is not None else ChatImages(ImageLimits())
        self.created = int(time.time())
        self._hidden_ids = frozenset(tokenizer.eos_token_ids)
        self._routes: dict[str, dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/responses": {"POST": self._responses},
            "/v1/models": {"GET": self._models},
            "/tokenize": {"POST": self._tokenize_route},
            "/detokenize": {"POST": self._detokenize_route},
            "/health": {"GET": self._health},
            "/live": {"GET": self._live},
            "/metrics": {"GET": self._metrics},
        }
        self._model_routes: dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            "GET": self._model}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            methods = self._routes.get(path)
            if methods is None and path.startswith(MODEL_PATH) and len(path) > len(MODEL_PATH):
                methods = self._model_routes
            if methods is None:
                error = ApiError(404, f"no route for {scope['path']}", code="not_found")
                await _send_bytes(send, 404, error.body())
                return
            if self.api_keys is not None and (path.startswith("/v1/") or path in _KEYED):
                policy = self.api_keys.lookup(scope["headers"])
                if policy is None:
                    error = ApiError(401, "Incorrect or missing API key (send 'Authorization: "
                                     "Bearer <key>')", code="invalid_api_key",
                                     reason="unauthorized")
                    self.metrics.rejected(error.reason)
                    await _send_bytes(send, 401, error.body())
                    return
                scope[KEY_SCOPE] = policy
            handler = methods.get(scope["method"])
            if handler is None:
                error = ApiError(405, f"method {scope['method']} is not allowed here",
                                 code="method_not_allowed")
                allow = ", ".join(methods).encode()
                await _send_bytes(send, 405, error.body(), [*_JSON_HEADERS, (b"allow", allow)])
                return
            await handler(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- small endpoints ----------------------------------------------------------------------

    def public_models(self) -> list[str]:
        served = self.upstream.served_models()
        if self.served_model_name is not None:
            return [self.served_model_name] if served else []
        return list(dict.fromkeys(served))

    def _visible_models(self, scope: Scope) -> list[str]:
        models = self.public_models()
        policy: KeyPolicy | None = scope.get(KEY_SCOPE)
        if policy is not None and policy.models is not None:  # only what the key may use
            models = [m for m in models if policy.allows(m)]
        return models

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_bytes(send, 200, responses.model_list(self._visible_models(scope),
                                                          self.created))

    async def _tokenize_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """vLLM's POST /tokenize: a prompt's token ids, or chat messages' through the
        template, with the context length they are judged against."""
        async def answer(raw: bytes) -> bytes:
            body = protocol.parse_tokenize(raw)
            upstream_model = self._tokenizer_model(scope, body.model)
            if body.messages is not None:
                ids = await self._render_chat(body)
            else:
                assert body.prompt is not None
                ids = await self._tokenize(self.tokenizer.encode, body.prompt,
                                           body.add_special_tokens is not False,
                                           chars=len(body.prompt))
            return responses.tokenized(ids, self.context_length(upstream_model))
        await self._tokenizer_answer(scope, receive, send, answer)

    async def _detokenize_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """vLLM's POST /detokenize: token ids back to text."""
        async def answer(raw: bytes) -> bytes:
            body = protocol.parse_detokenize(raw, self.tokenizer.vocab_size)
            self._tokenizer_model(scope, body.model)
            return responses.detokenized(await self._tokenize(
                self.tokenizer.decode, body.tokens, chars=len(body.tokens) * 4))
        await self._tokenizer_answer(scope, receive, send, answer)

    def _tokenizer_model(self, scope: Scope, model: str | None) -> str:
        """The model the workers serve for the one a tokenizer request names (the key must
        allow it), else for the first the key sees ("" when there is none: the fallback
        context length)."""
        if model is None:
            visible = self._visible_models(scope)
            return self._resolve_model(visible[0])[1] if visible else ""
        self._check_key(scope, model)
        return self._resolve_model(model)[1]

    async def _tokenizer_answer(self, scope: Scope, receive: Receive, send: Send,
                                answer: Callable[[bytes], Awaitable[bytes]]) -> None:
        try:
            _check_json_body(scope)
            raw = await _read_body(receive, self.max_body_bytes)
            if raw is None:
                return
            body = await answer(raw)
        except ApiError as error:
            self.metrics.rejected(error.reason)
            await _send_bytes(send, error.status, error.body(), [*_JSON_HEADERS, *error.headers])
            return
        await _send_bytes(send, 200, body)

    async def _model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET /v1/models/{model} (ids with a slash included, as Hugging Face names go)."""
        model = scope["path"][len(MODEL_PATH):]
        if model not in self._visible_models(scope):
            error = ApiError(404, f"The model '{model}' does not exist", param="model",
                             code="model_not_found", reason="model_not_found")
            await _send_bytes(send, 404, error.body())
            return
        await _send_bytes(send, 200, responses.model_card(model, self.created))

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.upstream.served_models():
            await _send_bytes(send, 200, b'{"status":"ok"}')
        else:
            await _send_bytes(send, 503, b'{"status":"unavailable","reason":"no workers"}')

    async def _live(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_bytes(send, 200, b'{"status":"live"}')

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, content_type = self.metrics.render()
        await _send_bytes(send, 200, body, [(b"content-type", content_type.encode())])

    # --- generation ---------------------------------------------------------------------------

    def _resolve_model(self, requested: str) -> tuple[str, str]:
        """(name to report, model the workers serve) for the request's `model`."""
        served = self.upstream.served_models()
        if not served:
            raise ApiError(503, "no worker is serving any model right now",
                           code="no_workers", reason="no_workers")
        if requested in served:
            return requested, requested
        if requested == self.served_model_name:
            return requested, served[0]
        raise ApiError(404, f"The model '{requested}' does not exist", param="model",
                       code="model_not_found", reason="model_not_found")

    def context_length(self, upstream_model: str) -> int:
        """The configured context length, else the smallest one the model's workers report."""
        if self.max_model_len > 0:
            return self.max_model_len
        return self.upstream.max_model_len(upstream_model) or FALLBACK_MAX_MODEL_LEN

    def context_length_source(self, upstream_model: str) -> str:
        """Which limit `context_length` is and the flag that raises it, for the 400."""
        if self.max_model_len > 0:
            return "the frontend's --max-model-len"
        if self.upstream.max_model_len(upstream_model):
            return ("the smallest context length this model's workers report; raise it with "
                    "the workers' --max-model-len, or set the frontend's --max-model-len")
        return ("the frontend's fallback while no worker reports one; set the frontend's "
                "--max-model-len")

    async def _tokenize(self, work: Callable[..., T], *args: Any, chars: int) -> T:
        """`work(*args)` (tokenizing or decoding about `chars` characters), off the loop when
        that is long."""
        if chars <= INLINE_TOKENIZE_MAX_CHARS:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(None, work, *args)

    async def _render_chat(self, body: Any) -> list[int]:
        """A chat body's messages through the template, as it asks; a template's refusal is a
        400."""
        try:
            return await self._tokenize(self.tokenizer.render_chat, protocol.chat_messages(body),
                                        protocol.render_options(body),
                                        chars=protocol.chat_text_length(body))
        except ChatTemplateError as exc:
            raise invalid(str(exc), "messages", "invalid_chat_template") from None

    def _check_tool_request(self, body: protocol.ChatCompletionRequest) -> None:
        """A request the model may answer with tool calls: one this deployment can read (a
        reply forced to be calls is JSON, read without a parser)."""
        if self.tool_call_parser is None and not protocol.forced_calls(body)[0]:
            raise unsupported("tools", "this deployment reads no tool calls; start the frontend "
                                       f"with --tool-call-parser ({', '.join(TOOL_PARSERS)}) "
                                       "for a model that makes them, or send tool_choice "
                                       "'none'")
        if (body.n or 1) > 1:
            raise unsupported("n", "tools are supported with one choice (n: 1)")
        if body.logprobs:
            raise unsupported("logprobs", "logprobs are not supported with tools")

    async def _bad_words(self, body: Any) -> list[list[int]]:
        """vLLM's `bad_words` as token sequences ([] when none)."""
        words = body.bad_words
        if not words:
            return []
        encode = functools.partial(self.tokenizer.encode, add_special_tokens=False)
        return await self._tokenize(protocol.bad_words_ids, words, encode,
                                    chars=2 * sum(map(len, words)))

    async def _echoes(self, endpoint: str, body: Any,
                      prompts: list[tuple[list[int], list[ImageInput]]]) -> list[str] | None:
        """`echo`: each prompt's text, which its completions start with (and, with logprobs,
        its tokens' logprobs: `SamplingParams.prompt_logprobs`); on chat, the last message's
        text when it is the assistant's; None without `echo` or such a message."""
        if endpoint == CHAT:
            echoed = protocol.chat_echo(body) if isinstance(
                body, protocol.ChatCompletionRequest) else ""
            return [echoed] if echoed else None
        if not body.echo:
            return None
        return [await self._tokenize(self.tokenizer.decode, ids, chars=len(ids) * 4)
                for ids, _ in prompts]

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._admitted(scope, receive, send, CHAT)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._admitted(scope, receive, send, COMPLETIONS)

    async def _responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._admitted(scope, receive, send, RESPONSES)

    # --- admission: key quotas (then, in `_generate`, slots) -----------------------------------

    async def _admitted(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        """Run `_generate` under the key's quota grant, or refuse."""
        policy: KeyPolicy | None = scope.get(KEY_SCOPE)
        grant = None
        if policy is not None:
            try:
                grant = self.quotas.admit(policy)
            except QuotaExceeded as exc:
                self.metrics.key_rejections.labels(policy.key_id, exc.kind).inc()
                await self._refuse(send, endpoint, _quota_error(exc), policy.key_id)
                return
            scope[GRANT_SCOPE] = grant
            send = self._key_send(send, grant)
            self.metrics.key_streams.labels(grant.key_id).inc()
        try:
            await self._generate(scope, receive, send, endpoint)
        finally:
            if grant is not None:
                self.metrics.key_streams.labels(grant.key_id).dec(grant.streams)
                grant.release()

    def _key_send(self, send: Send, grant: Grant) -> Send:
        """`send` that adds the key's `x-ratelimit-*` headers to the response and counts its
        status per key id."""
        metrics = self.metrics

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], *grant.headers()]
                metrics.key_requests.labels(grant.key_id, str(message["status"])).inc()
            await send(message)

        return send_with_limits

    async def _refuse(self, send: Send, endpoint: str, error: ApiError,
                      key_id: str | None = None) -> None:
        self.metrics.rejected(error.reason)
        if key_id is not None:  # else `send` counts it
            self.metrics.key_requests.labels(key_id, str(error.status)).inc()
        await _send_bytes(send, error.status, error.body(), [*_JSON_HEADERS, *error.headers])
        self.metrics.finished("", endpoint, False, error.status, error_type=error.reason)

    def _check_key(self, scope: Scope, model: str) -> None:
        """403 when the request's key may not use `model`."""
        policy: KeyPolicy | None = scope.get(KEY_SCOPE)
        if policy is not None and not policy.allows(model):
            self.metrics.key_rejections.labels(policy.key_id, "model").inc()
            raise ApiError(403, f"The API key '{policy.key_id}' may not use model '{model}'",
                           type="permission_error", param="model", code="model_not_allowed",
                           reason="model_not_allowed")

    def _widen_grant(self, scope: Scope, streams: int) -> None:
        """The key's stream slots for every completion the request asks for, or 429."""
        grant: Grant | None = scope.get(GRANT_SCOPE)
        if grant is None or streams <= grant.streams:
            return
        held = grant.streams
        try:
            grant.widen(streams)
        except QuotaExceeded as exc:
            self.metrics.key_rejections.labels(grant.key_id, exc.kind).inc()
            raise _quota_error(exc, with_limits=False) from None
        self.metrics.key_streams.labels(grant.key_id).inc(streams - held)

    def _take_prompt_quota(self, scope: Scope,
                           prompts: list[tuple[list[int], list[ImageInput]]]) -> None:
        """The key's token quota for the prompts (each once: its n copies share its prefix)."""
        grant: Grant | None = scope.get(GRANT_SCOPE)
        if grant is None:
            return
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        try:
            grant.take_prompt(prompt_tokens)
        except QuotaExceeded as exc:
            self.metrics.key_rejections.labels(grant.key_id, exc.kind).inc()
            raise _quota_error(exc, with_limits=False) from None
        self.metrics.key_tokens.labels(grant.key_id, "prompt").inc(prompt_tokens)

    def _settle_key(self, scope: Scope, completion_tokens: int) -> None:
        grant: Grant | None = scope.get(GRANT_SCOPE)
        if grant is not None and completion_tokens:
            grant.charge_completion(completion_tokens)
            self.metrics.key_tokens.labels(grant.key_id, "completion").inc(completion_tokens)

    async def _prompts(self, endpoint: str,
                       body: Any) -> list[tuple[list[int], list[ImageInput]]]:
        """Each prompt of the request as token ids (and its images): one, or a completions
        batch's several."""
        tokenizer = self.tokenizer
        if endpoint == CHAT and protocol.has_images(body):
            try:
                return [await self.images.prompt(body, tokenizer)]
            except ChatTemplateError as exc:
                raise invalid(str(exc), "messages", "invalid_chat_template") from None
        if endpoint == CHAT:
            ids = await self._render_chat(body)
            if not ids:
                raise invalid("the prompt is empty", "messages", "empty_prompt")
            return [(ids, [])]
        prompts = protocol.completion_prompts(body, tokenizer.vocab_size)
        protocol.check_choices(len(prompts), body.n or 1)
        out: list[tuple[list[int], list[ImageInput]]] = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = await self._tokenize(tokenizer.encode, prompt, True, chars=len(prompt))
            else:
                ids = prompt
            if not ids:
                which = f" (prompt {i} of the batch)" if len(prompts) > 1 else ""
                raise invalid(f"the prompt is empty{which}", "prompt", "empty_prompt")
            out.append((ids, []))
        return out

    def _requests(self, scope: Scope, body: Any, upstream_model: str,
                  prompts: list[tuple[list[int], list[ImageInput]]],
                  bad_words: list[list[int]]) -> list[GenerateRequest]:
        """One `GenerateRequest` per completion asked for: each prompt n times, in the order of
        the choices' indexes (prompt i's j-th at i * n + j, as vLLM numbers them)."""
        n = body.n or 1
        context = self.context_length(upstream_model)
        source = self.context_length_source(upstream_model)
        target = _target_worker(scope)
        priority = _priority(scope, body.priority or 0)
        requests = []
        for ids, images in prompts:
            sampling = protocol.sampling_params(body, len(ids), context,
                                                self.tokenizer.vocab_size, source, bad_words)
            cap_tokens(body, len(ids), sampling, self.max_prompt_tokens, self.max_output_tokens)
            for j in range(n):
                if j and sampling.seed is not None:
                    # A seeded request's choices differ from one another yet repeat as a whole.
                    sampling = msgspec.structs.replace(
                        sampling, seed=_wrap_int64(sampling.seed + 1))
                requests.append(GenerateRequest(
                    request_id=os.urandom(16).hex(), model=upstream_model, token_ids=ids,
                    sampling=sampling, target_worker=target, images=images,
                    cache_salt=body.cache_salt or "", priority=priority))
        return requests

    def _open(self, requests: list[GenerateRequest],
              per_prompt: int) -> ChunkStream | ChoiceStreams:
        """The one completion's stream, or the several's (each prompt's first opened)."""
        try:
            if len(requests) == 1:
                return self.upstream.open(requests[0])
            choices = ChoiceStreams(self.upstream, requests, per_prompt)
            choices.open_first()
            return choices
        except NoWorkersError as exc:
            raise _no_workers(exc) from None

    async def _generate(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        started = time.perf_counter()
        model = ""
        stream = False
        try:
            _check_json_body(scope)
            raw = await _read_body(receive, self.max_body_bytes)
            if raw is None:
                return
            api_request: responses_api.ResponsesRequest | None = None
            if endpoint == RESPONSES:
                api_request, body = responses_api.parse(raw)
            else:
                body = (protocol.parse_chat(raw) if endpoint == CHAT
                        else protocol.parse_completion(raw))
            stream = bool(body.stream)
            self._check_key(scope, body.model)
            model, upstream_model = self._resolve_model(body.model)
            calls_tools = endpoint != COMPLETIONS and protocol.tools_asked(body) is not None
            if calls_tools:
                self._check_tool_request(body)
            if endpoint != COMPLETIONS and self.reasoning_parser is not None:
                _check_reasoning_request(body)
            kind = CHAT if endpoint == RESPONSES else endpoint  # how its prompt is made
            prompts = protocol.truncate_prompts(body, await self._prompts(kind, body),
                                                self.context_length(upstream_model))
            requests = self._requests(scope, body, upstream_model, prompts,
                                      await self._bad_words(body))
            echoes = await self._echoes(kind, body, prompts)
            self._widen_grant(scope, len(requests))
            # The slots come last: a request waiting for them is one that will run.
            await self.admission.enter(len(requests), requests[0].priority)
            try:
                self._take_prompt_quota(scope, prompts)
                opened = self._open(requests, body.n or 1)
            except BaseException:
                self.admission.leave(len(requests))
                raise
        except Exception as exc:
            if isinstance(exc, ApiError):
                error = responses_api.renamed(exc) if endpoint == RESPONSES else exc
            else:
                log.exception("request failed before generation")
                error = ApiError(500, f"internal error: {type(exc).__name__}", reason="internal")
            self.metrics.rejected(error.reason)
            await _send_bytes(send, error.status, error.body(), [*_JSON_HEADERS, *error.headers])
            self.metrics.finished(model, endpoint, stream, error.status, error_type=error.reason)
            return

        stops = protocol.stop_strings(body)
        include_stop = bool(body.include_stop_str_in_output)
        skip_special = body.skip_special_tokens is not False and not (
            (calls_tools and self.tool_call_parser in TOOL_PARSERS_READING_SPECIALS)
            or (endpoint != COMPLETIONS
                and self.reasoning_parser in REASONING_PARSERS_READING_SPECIALS))
        gens = []
        for request in requests:
            # A stop token's text is hidden, unless the request asks for what stopped it.
            stop_ids = () if include_stop else request.sampling.stop_token_ids
            gens.append(Generation(request.request_id, self.tokenizer, stops,
                                   self._hidden_ids.union(stop_ids) if stop_ids
                                   else self._hidden_ids,
                                   ChoiceLogprobs(self.tokenizer, endpoint == CHAT,
                                                  bool(body.return_tokens_as_token_ids),
                                                  request.sampling.logprobs)
                                   if request.sampling.logprobs >= 0 else None, include_stop,
                                   skip_special))
        if body.return_token_ids:
            for gen in gens:
                gen.ids_out = []
        if endpoint != COMPLETIONS and self.reasoning_parser is not None \
                and requests[0].sampling.structured is None:
            # A constrained reply has no thinking: its constraint holds from its first token.
            thinking = thinks(self.reasoning_parser, protocol.template_variables(body))
            for gen in gens:
                gen.reasoning = ReasoningText(self.reasoning_parser, thinking,
                                              keep=body.include_reasoning is not False)
        if calls_tools:
            forced, name = protocol.forced_calls(body)
            single = body.parallel_tool_calls is False
            gens[0].tools = ForcedCallText(name, single) if forced else call_reader(
                self.tool_call_parser or "", body.tools or [], single)
        if body.prompt_logprobs is not None:
            for gen in gens:
                gen.prompt_logprobs = PromptLogprobs(self.tokenizer, body.prompt_logprobs,
                                                     bool(body.return_tokens_as_token_ids))
        if echoes is not None:
            per_prompt = body.n or 1
            for i, gen in enumerate(gens):
                gen.echo = echoes[i // per_prompt]
                if kind == COMPLETIONS:  # a prompt echoed is scored, and may be all there is
                    gen.prompt_only = body.max_tokens == 0
                    if gen.logprobs is not None:
                        gen.echo_ids = requests[i].token_ids
        request_id = requests[0].request_id
        per_model = self.metrics.model(model)
        per_model.active.inc()
        per_model.queued.inc()
        gens[0].queued = per_model.queued
        handler = asyncio.current_task()
        assert handler is not None
        watcher = asyncio.create_task(self._watch_disconnect(receive, gens, handler))
        status = 500
        # A streamed response's encoder, kept to end its stream in its own terms on a crash.
        api_encoder: responses_api.ResponsesStreamEncoder | None = None
        try:
            response_id = ("chatcmpl-" if endpoint == CHAT else "cmpl-") + request_id
            shell = None if api_request is None else responses_api.ResponseShell(
                api_request, request_id, model)
            if stream and shell is not None:
                # One prompt, one choice.
                assert isinstance(opened, ChunkStream) and api_request is not None
                api_encoder = responses_api.ResponsesStreamEncoder(
                    shell, responses_api.wants_obfuscation(api_request),
                    reasoning=gens[0].reasoning)
                status = await self._stream(send, gens[0], opened, api_encoder,
                                            len(prompts[0][0]), request_id)
            elif stream:
                include_usage = protocol.wants_usage_in_stream(body)
                created = int(time.time())
                encoder_type = (responses.ChatStreamEncoder if endpoint == CHAT
                                else responses.CompletionStreamEncoder)
                token_ids = bool(body.return_token_ids)
                per_prompt = body.n or 1
                running = protocol.wants_running_usage(body)
                obfuscate = protocol.wants_obfuscation(body)
                encoders = [encoder_type(
                    response_id, created, model, include_usage, i, token_ids,
                    # The prompt's ids: chat's once, at the top; each completion's its own.
                    prompts[i // per_prompt][0] if token_ids and (endpoint != CHAT or not i)
                    else None,
                    functools.partial(gens[i].usage, len(prompts[i // per_prompt][0]))
                    if running else None, obfuscate) for i in range(len(gens))]
                if isinstance(opened, ChunkStream):
                    status = await self._stream(send, gens[0], opened, encoders[0],
                                                len(prompts[0][0]), request_id)
                else:
                    status = await self._stream_choices(send, gens, opened, encoders, prompts,
                                                        request_id)
            else:
                status = await self._unary(send, gens, opened, endpoint, response_id, model,
                                           prompts, shell)
        except asyncio.CancelledError:
            if not gens[0].disconnected:
                raise
            handler.uncancel()
            status = 499  # client closed the request
        except Exception as exc:
            log.exception("request %s failed", request_id)
            for gen in gens:
                self.upstream.cancel(gen.request_id)
            status = 500
            if not gens[0].done:
                _mark_done(gens)
                error = ApiError(500, f"internal error: {type(exc).__name__}")
                try:
                    if gens[0].response_started:
                        await send({"type": "http.response.body", "more_body": False,
                                    "body": responses.sse_error(error) + responses.DONE
                                    if api_encoder is None else api_encoder.failure(error)})
                    else:
                        await _send_bytes(send, 500, error.body())
                except Exception:
                    log.debug("could not report the failure of %s", request_id)
        finally:
            _mark_done(gens)
            watcher.cancel()
            self.admission.leave(len(requests))
            per_model.active.dec()
            gens[0].left_queue()
        self._record(per_model, gens, prompts, model, endpoint, stream, status, started)
        self._settle_key(scope, sum(gen.tokens for gen in gens))

    def _record(self, per_model: ModelMetrics, gens: list[Generation],
                prompts: list[tuple[list[int], list[ImageInput]]], model: str, endpoint: str,
                stream: bool, status: int, started: float) -> None:
        now = time.perf_counter()
        if gens[0].disconnected:
            per_model.disconnects.inc()
        usage = _usage(gens, prompts)  # the token counters count what usage reports
        per_model.input_tokens.inc(usage.prompt_tokens)
        if usage.completion_tokens:
            per_model.output_tokens.inc(usage.completion_tokens)
        if usage.prompt_tokens_details.cached_tokens:
            per_model.cached_tokens.inc(usage.prompt_tokens_details.cached_tokens)
        first_token_at = 0.0
        for gen in gens:
            if not gen.tokens:
                continue
            if not first_token_at or gen.first_token_at < first_token_at:
                first_token_at = gen.first_token_at
            if gen.tokens > 1:
                per_model.itl.observe((gen.last_token_at - gen.first_token_at)
                                      / (gen.tokens - 1))
        if first_token_at:
            per_model.ttft.observe(first_token_at - started)
        error_type = ""
        if status >= 400:
            failed = next((gen.error for gen in gens if gen.error is not None), None)
            error_type = (failed.reason if failed is not None
                          else "client_disconnected" if gens[0].disconnected else "internal")
        self.metrics.finished(model, endpoint, stream, status, now - started, error_type)

    async def _watch_disconnect(self, receive: Receive, gens: list[Generation],
                                handler: asyncio.Task[Any]) -> None:
        """Waits for the client to go away; then aborts the request's generations upstream and
        wakes the handler (which may be blocked waiting for tokens)."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
            if gens[0].done:
                return
            for gen in gens:
                gen.disconnected = True
                if not gen.upstream_finished:
                    self.upstream.cancel(gen.request_id)
        except Exception:
            log.exception("disconnect watcher of %s failed", gens[0].request_id)
            return
        handler.cancel()

    async def _stream(self, send: Send, gen: Generation, chunks: ChunkStream,
                      encoder: responses.ChatStreamEncoder | responses.CompletionStreamEncoder
                      | responses_api.ResponsesStreamEncoder,
                      prompt_tokens: int, request_id: str) -> int:
        text = gen.consume(await chunks.next_batch(self.stream_interval))
        if gen.error is not None:
            # Nothing sent yet: the error gets its own HTTP status.
            gen.done = True
            await _send_bytes(send, gen.error.status, gen.error.body())
            return gen.error.status
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_SSE_HEADERS, (b"x-request-id", request_id.encode())]})
        gen.response_started = True
        # Events ready in the same turn leave in one write: with a fixed tokens-per-event
        # interval under load, several events of one stream pile up, and a write per event
        # is a syscall per token.
        opening = encoder.opening()
        out = [opening] if opening else []
        interval = self.stream_interval
        first = True
        while True:
            if gen.error is not None:
                gen.done = True
                if gen.reasoning is not None:
                    out.append(_reasoning(gen, encoder))
                if text:
                    out.append(encoder.delta(text, gen.fields_with(text)))
                out.append(encoder.failure(gen.error))
                await send({"type": "http.response.body", "more_body": False,
                            "body": b"".join(out)})
                return gen.error.status
            if gen.finish is not None:
                if gen.stopped_by_string and not gen.upstream_finished:
                    self.upstream.cancel(gen.request_id)
                gen.done = True
                if gen.reasoning is not None:
                    out.append(_reasoning(gen, encoder))
                calls = _tool_calls(gen, encoder)
                if calls:  # after the text before them, before the finish
                    if text:
                        out.append(encoder.delta(text, gen.fields_with(text)))
                        text = ""
                    out.append(calls)
                out.append(encoder.closing(text, gen.finish, gen.usage(prompt_tokens),
                                           gen.fields_with(text)))
                await send({"type": "http.response.body", "more_body": False,
                            "body": b"".join(out)})
                return 200
            if gen.reasoning is not None:
                out.append(_reasoning(gen, encoder))
            if text:
                out.append(encoder.delta(text) if gen.plain
                           else encoder.delta(text, gen.fields_with(text)))
            if gen.tools is not None:
                calls = _tool_calls(gen, encoder)
                if calls:
                    out.append(calls)
            # The first event leaves alone: TTFT does not wait for the encoding of the rest.
            batch = chunks.ready_batch(interval) if interval and not first else None
            first = False
            if batch is None:
                if out:
                    await send({"type": "http.response.body", "more_body": True,
                                "body": b"".join(out)})
                    out = []
                batch = await chunks.next_batch(interval)
            text = gen.consume(batch)

    async def _stream_choices(
            self, send: Send, gens: list[Generation], choices: ChoiceStreams,
            encoders: list[responses.ChatStreamEncoder] | list[responses.CompletionStreamEncoder],
            prompts: list[tuple[list[int], list[ImageInput]]], request_id: str) -> int:
        """Several choices in one SSE stream: each choice's text leaves as it comes, marked
        with its index; the usage (if asked for) and [DONE] once every choice has ended. The
        first choice to fail ends the response and aborts the others."""
        ready: asyncio.Queue[_ChoiceBatch] = asyncio.Queue()
        readers = [asyncio.create_task(self._read_choice(i, gen, choices, ready))
                   for i, gen in enumerate(gens)]

        def stop() -> None:
            for reader in readers:
                reader.cancel()
            choices.close()

        try:
            out: list[bytes] = []
            left = len(gens)
            index, text, logprobs, thought = await ready.get()
            while True:
                gen = gens[index]
                if gen.error is not None:
                    stop()
                    _mark_done(gens)
                    if not gens[0].response_started:  # nothing sent: an HTTP status of its own
                        await _send_bytes(send, gen.error.status, gen.error.body())
                        return gen.error.status
                    if thought is not None:
                        out.append(encoders[index].reasoning(*thought))  # type: ignore[union-attr]
                    if text:
                        out.append(encoders[index].delta(text, logprobs))
                    out.append(encoders[index].failure(gen.error))
                    await send({"type": "http.response.body", "more_body": False,
                                "body": b"".join(out)})
                    return gen.error.status
                if not gens[0].response_started:
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [*_SSE_HEADERS, (b"x-request-id", request_id.encode())]})
                    gens[0].response_started = True
                    out += (encoder.opening() for encoder in encoders)
                if thought is not None:  # chat's, read apart from the answer: before it
                    out.append(encoders[index].reasoning(*thought))  # type: ignore[union-attr]
                if gen.finish is not None:
                    if gen.stopped_by_string and not gen.upstream_finished:
                        self.upstream.cancel(gen.request_id)
                    out.append(encoders[index].ending(text, gen.finish, logprobs))
                    left -= 1
                    if not left:
                        _mark_done(gens)
                        if encoders[0].include_usage:
                            out.append(encoders[0].usage(_usage(gens, prompts)))
                        out.append(responses.DONE)
                        await send({"type": "http.response.body", "more_body": False,
                                    "body": b"".join(out)})
                        return 200
                elif text:
                    out.append(encoders[index].delta(text, logprobs))
                if ready.empty():  # what piled up leaves in one write
                    if out:
                        await send({"type": "http.response.body", "more_body": True,
                                    "body": b"".join(out)})
                        out = []
                    index, text, logprobs, thought = await ready.get()
                else:
                    index, text, logprobs, thought = ready.get_nowait()
        finally:
            stop()

    async def _read_choice(self, index: int, gen: Generation, choices: ChoiceStreams,
                           ready: asyncio.Queue[_ChoiceBatch]) -> None:
        """Posts (index, text, logprobs JSON, reasoning) for each batch of one choice's stream,
        until it ends or fails."""
        chunks = await self._choice_stream(index, gen, choices)
        if chunks is None:
            ready.put_nowait((index, "", NULL_LOGPROBS, None))
            return
        while gen.finish is None and gen.error is None:
            text = gen.consume(await chunks.next_batch(self.stream_interval))
            if gen.error is None:
                choices.started(index)
            # The reasoning's logprobs are taken first: it goes out ahead of the text.
            reasoning = gen.take_reasoning()
            ready.put_nowait((index, text, gen.fields_with(text), reasoning))

    @staticmethod
    async def _choice_stream(index: int, gen: Generation,
                             choices: ChoiceStreams) -> ChunkStream | None:
        """Choice `index`'s stream once it opens; None (`gen.error` set) if no worker is left
        to open it on."""
        try:
            return await choices.stream(index)
        except NoWorkersError as exc:
            gen.error = _no_workers(exc)
            return None

    async def _collect(self, gen: Generation, chunks: ChunkStream,
                       started: Callable[[], None] | None = None) -> str:
        """One choice's whole text (`gen.error` says whether it failed); `started` is called
        once it has tokens."""
        parts: list[str] = []
        while True:
            text = gen.consume(await chunks.next_batch())
            if text:
                parts.append(text)
            if gen.error is not None:
                break
            if started is not None:
                started()
            if gen.finish is not None:
                break
        if gen.stopped_by_string and not gen.upstream_finished:
            self.upstream.cancel(gen.request_id)
        return "".join(parts)

    async def _collect_choice(self, index: int, gen: Generation, choices: ChoiceStreams) -> str:
        chunks = await self._choice_stream(index, gen, choices)
        if chunks is None:
            return ""
        return await self._collect(gen, chunks, lambda: choices.started(index))

    async def _unary(self, send: Send, gens: list[Generation],
                     opened: ChunkStream | ChoiceStreams, endpoint: str, response_id: str,
                     model: str, prompts: list[tuple[list[int], list[ImageInput]]],
                     shell: responses_api.ResponseShell | None = None) -> int:
        if isinstance(opened, ChunkStream):
            texts = [await self._collect(gens[0], opened)]
        else:
            collecting = [asyncio.create_task(self._collect_choice(i, gen, opened))
                          for i, gen in enumerate(gens)]
            try:
                for task in asyncio.as_completed(collecting):
                    await task
                    if any(gen.error is not None for gen in gens):
                        break
                texts = [task.result() if task.done() else "" for task in collecting]
            finally:
                for task in collecting:
                    task.cancel()
                opened.close()
        _mark_done(gens)
        failed = next((gen for gen in gens if gen.error is not None), None)
        if failed is not None:
            assert failed.error is not None
            await _send_bytes(send, failed.error.status, failed.error.body())
            return failed.error.status
        # Each choice's reasoning, when they are read for it: the Responses API's and tool
        # calls' requests have one choice.
        reasoning = {"reasoning": [gen.reasoning.whole if gen.reasoning is not None else None
                                   for gen in gens]} if gens[0].reasoning is not None else {}
        if shell is not None:
            tools, reader = gens[0].tools, gens[0].reasoning
            await _send_bytes(send, 200, responses_api.response_body(
                shell, texts[0], gens[0].finish or "stop", _usage(gens, prompts),
                tools.calls if tools is not None else None,
                tools.complete if tools is not None else None,
                reader.whole if reader is not None else None,
                reader is not None and reader.thinking))
            return 200
        if gens[0].tools is not None:  # one choice (`_check_tool_request`)
            await _send_bytes(send, 200, responses.chat_completion(
                response_id, int(time.time()), model,
                [(texts[0], gens[0].finish or "stop", NULL_LOGPROBS)], _usage(gens, prompts),
                tool_calls=gens[0].tools.calls, **reasoning))
            return 200
        render = responses.chat_completion if endpoint == CHAT else responses.completion
        choices = [(text, gen.finish or "stop", gen.logprobs_with(text))
                   for text, gen in zip(texts, gens, strict=True)]
        n = len(gens) // len(prompts)  # choices per prompt
        token_ids = None
        if gens[0].ids_out is not None:  # vLLM's return_token_ids
            token_ids = responses.TokenIds([prompts[i // n][0] for i in range(len(gens))],
                                           [gen.take_ids() for gen in gens])
        prompt_logprobs = None
        if gens[0].prompt_logprobs is not None:  # vLLM's: each choice's of its own prompt
            prompt_logprobs = [gen.prompt_logprobs.json(prompts[i // n][0])
                               for i, gen in enumerate(gens) if gen.prompt_logprobs is not None]
        body = render(response_id, int(time.time()), model, choices, _usage(gens, prompts),
                      token_ids, prompt_logprobs, **reasoning)
        await _send_bytes(send, 200, body)
        return 200


def _check_reasoning_request(body: protocol.ChatCompletionRequest) -> None:
    """A chat request on a frontend that splits reasoning from the answer: one it can split."""
    if body.echo:
        raise unsupported("echo", "the last message is not echoed with --reasoning-parser")


def _reasoning(gen: Generation, encoder: Any) -> bytes:
    """The event of the reasoning `gen` read since the last one (b"" when none); the tokens'
    logprobs and ids that were read with it go with it."""
    thought = gen.take_reasoning()
    return encoder.reasoning(*thought) if thought is not None else b""


def _tool_calls(gen: Generation, encoder: Any) -> bytes:
    """The events of what `gen` read of tool calls out of its text since the last ones (b""
    when nothing, or when it reads none)."""
    tools = gen.tools
    if tools is None:
        return b""
    assert isinstance(encoder, responses.ChatStreamEncoder
                      | responses_api.ResponsesStreamEncoder)  # tools come with these only
    return encoder.tool_calls(tools.take(), tools.complete)


def _no_workers(exc: NoWorkersError) -> ApiError:
    return ApiError(503, str(exc) or "no worker can serve this model right now",
                    code="no_workers", reason="no_workers")


def _mark_done(gens: list[Generation]) -> None:
    """The last bytes are being sent: a disconnect now is not the client's."""
    for gen in gens:
        gen.done = True


def _usage(gens: list[Generation],
           prompts: list[tuple[list[int], list[ImageInput]]]) -> responses.Usage:
    """The request's usage so far: each prompt counted once (its n choices share it), with the
    cached tokens its first choice found, as vLLM reports a request with n; every choice's
    output."""
    n = len(gens) // len(prompts)
    prompt_tokens = cached = completion_tokens = 0
    for i, (ids, _) in enumerate(prompts):  # loops: cheaper than sums over one prompt
        prompt_tokens += len(ids)
        cached += gens[i * n].cached_tokens
    for gen in gens:
        completion_tokens += gen.tokens
    return responses.usage(prompt_tokens, completion_tokens, cached,
                           sum(gen.reasoning_tokens for gen in gens)
                           if gens[0].reasoning is not None else None)


def _wrap_int64(value: int) -> int:
    return (value - protocol.INT64_MIN) % 2**64 + protocol.INT64_MIN
