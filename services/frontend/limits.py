"""What one HTTP client may cost the frontend: sizes, read timeouts, waiting room, token caps.

- `limited_http_protocol(limits)`: uvicorn's httptools protocol with limits httptools does not
  have. The request line plus headers may take `max_header_bytes` and `max_headers` fields
  (else 431), and must arrive within `header_timeout_s` of the connection (or, on a kept-alive
  connection, of the request's first byte); the body may take `max_body_bytes` (413, at once
  when Content-Length says so) and must arrive within `body_timeout_s` of the headers, not
  counting time the server itself stopped reading (uvicorn pauses a connection whose unread
  body passes 64 KiB, e.g. while the request waits for an admission slot). A timeout answers
  408 and closes the connection, so a client sending a byte a second (slowloris) holds a
  connection for at most the timeout. Refused input is never buffered.
- `AdmissionQueue`: at most `max_active` generations at once, at most `max_waiting` more waiting
  for a slot, each for at most `wait_timeout_s`; beyond that a 503 with `Retry-After`.
- `cap_tokens`: the `--max-prompt-tokens` / `--max-output-tokens` caps on a request.

Does not own API keys or per-key quotas (`api_keys`, `quotas`).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import operator
from collections.abc import Callable
from typing import Any, Final

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from common.messages import SamplingParams
from services.frontend.errors import ApiError
from services.frontend.quotas import retry_after_headers

# Seconds a client is told to wait when the frontend is full.
OVERLOADED_RETRY_S: Final = 1
# A refused connection is still read for this long (what it sends discarded, up to LINGER_BYTES;
# then it is no longer read) before it is closed.
LINGER_S: Final = 1.0
LINGER_BYTES: Final = 1024 * 1024

_REASONS: Final = {408: b"Request Timeout", 413: b"Content Too Large",
                   431: b"Request Header Fields Too Large"}


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0


class _Refused(Exception):
    """Stops the parser: the request was answered and the connection is closing."""


class _ObservedFlow(FlowControl):
    """uvicorn's read flow control, telling the protocol when it pauses and resumes reading."""

    def __init__(self, transport: asyncio.Transport, on_pause: Callable[[], None],
                 on_resume: Callable[[], None]) -> None:
        super().__init__(transport)
        self._on_pause = on_pause
        self._on_resume = on_resume

    def pause_reading(self) -> None:
        if not self.read_paused:
            super().pause_reading()
            self._on_pause()

    def resume_reading(self) -> None:
        if self.read_paused:
            super().resume_reading()
            self._on_resume()


def limited_http_protocol(limits: HttpLimits,
                          on_refusal: Callable[[str], None] | None = None) -> type[Any]:
    """An `HttpToolsProtocol` subclass enforcing `limits`; `on_refusal(limit)` counts each
    refusal ("header_bytes", "header_count", "body_bytes", "header_timeout", "body_timeout")."""

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._timer: asyncio.TimerHandle | None = None
            self._timer_limit = ""
            self._deadline = 0.0
            self._body_left: float | None = None  # body clock stopped with this much left
            self._head_bytes = 0
            self._head_open = True  # the current request's headers are not complete yet
            self._head_raw = 0  # bytes received while they were not
            self._heads = 0  # requests whose headers completed on this connection
            self._header_count = 0
            self._body_bytes = 0
            self._refused = False
            self._discarded = 0

        # --- timers ---------------------------------------------------------------------------

        def _arm(self, seconds: float, limit: str) -> None:
            self._disarm()
            self._timer_limit = limit
            self._deadline = self.loop.time() + seconds
            self._timer = self.loop.call_later(seconds, self._expired, limit)

        def _disarm(self) -> None:
            self._body_left = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _reading_paused(self) -> None:
            """The server stopped reading: stop the body clock (not the client's time)."""
            if self._timer is not None and self._timer_limit == "body_timeout":
                left = self._deadline - self.loop.time()
                self._disarm()
                self._body_left = max(left, 0.0)

        def _reading_resumed(self) -> None:
            if self._body_left is not None:
                self._arm(self._body_left, "body_timeout")

        def _expired(self, limit: str) -> None:
            self._timer = None
            what = "headers" if limit == "header_timeout" else "body"
            self._refuse(408, limit, f"the request {what} did not arrive within "
                                     f"{getattr(limits, limit + '_s'):g} s")

        def _refuse(self, status: int, limit: str, message: str) -> None:
            if self._refused:
                return
            self._refused = True
            self._disarm()
            if on_refusal is not None:
                on_refusal(limit)
            cycle = self.cycle
            started = cycle is not None and not cycle.response_complete and \
                cycle.response_started
            if not started and not self.transport.is_closing():
                body = ApiError(status, message, code=limit, reason=limit).body()
                self.transport.write(b"".join((
                    b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
                    b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n", body)))
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app reading the body sees a disconnect
                cycle.message_event.set()
            # Lingering close: closing with unread input would reset the connection and the
            # client might never read the answer. Half-close, discard what still comes (see
            # data_received) and close for good after LINGER_S.
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(LINGER_S, self.transport.close)

        # --- asyncio.Protocol -----------------------------------------------------------------

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.flow = _ObservedFlow(transport, self._reading_paused, self._reading_resumed)
            self._arm(limits.header_timeout_s, "header_timeout")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:  # lingering: discard
                self._discarded += len(data)
                if self._discarded > LINGER_BYTES:
                    self.flow.pause_reading()
                return
            self._unset_keepalive_if_required()
            head_open, heads = self._head_open, self._heads
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                if isinstance(exc.__context__, _Refused) or self._refused:
                    return
                self.send_400_response("Invalid HTTP request received.")
            except httptools.HttpParserUpgrade:
                self.send_400_response("Upgrades are not supported.")
            except httptools.HttpParserError:
                self.send_400_response("Invalid HTTP request received.")
            else:
                # httptools holds a header field until it is complete: count raw bytes too, or
                # one endless header would grow its buffer without on_header ever being called.
                if head_open and self._heads == heads:  # still in the same request's head
                    self._head_raw += len(data)
                    if self._head_raw > limits.max_header_bytes:
                        self._refuse(431, "header_bytes", "the request line and headers are "
                                     f"larger than {limits.max_header_bytes} bytes")

        # --- parser callbacks -----------------------------------------------------------------

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = self._header_count = self._body_bytes = 0
            if self._timer is None and self._body_left is None:  # the next request kept alive
                self._arm(limits.header_timeout_s, "header_timeout")

        def on_url(self, url: bytes) -> None:
            self._head_bytes += len(url)
            if self._head_bytes > limits.max_header_bytes:
                self._refuse(431, "header_bytes", "the request line and headers are larger "
                                                  f"than {limits.max_header_bytes} bytes")
                raise _Refused
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_bytes += len(name) + len(value) + 4
            self._header_count += 1
            if self._head_bytes > limits.max_header_bytes:
                self._refuse(431, "header_bytes", "the request line and headers are larger "
                                                  f"than {limits.max_header_bytes} bytes")
                raise _Refused
            if self._header_count > limits.max_headers:
                self._refuse(431, "header_count",
                             f"the request has more than {limits.max_headers} header fields")
                raise _Refused
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._head_open = False
            self._heads += 1
            self._disarm()
            for name, value in self.headers:
                if name == b"content-length" and value.isdigit() \
                        and int(value) > limits.max_body_bytes:
                    self._refuse(413, "body_bytes", "the request body is larger than "
                                                    f"{limits.max_body_bytes} bytes")
                    raise _Refused
            self._arm(limits.body_timeout_s, "body_timeout")
            super().on_headers_complete()  # may pause reading (a pipelined request waits)

        def on_body(self, body: bytes) -> None:
            self._body_bytes += len(body)
            if self._body_bytes > limits.max_body_bytes:
                self._refuse(413, "body_bytes", "the request body is larger than "
                                                f"{limits.max_body_bytes} bytes")
                raise _Refused
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._head_open, self._head_raw = True, 0
            self._disarm()
            super().on_message_complete()

    return LimitedHttpToolsProtocol


_PRIORITY = operator.itemgetter(2)  # of an admission waiter: (future, slots, priority)


class AdmissionQueue:
    """Slots for generations; a bounded, timed queue for requests waiting for theirs, in order
    of `priority` (vLLM's: lower first) then arrival (a request for n completions takes n slots
    at once, so it never holds some while it waits)."""

    def __init__(self, max_active: int, max_waiting: int, wait_timeout_s: float) -> None:
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.wait_timeout_s = wait_timeout_s
        self.active = 0
        self._waiters: collections.deque[tuple[asyncio.Future[None], int, int]] = \
            collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(self, count: int = 1, priority: int = 0) -> None:
        """Take `count` slots, waiting for them if need be; `ApiError` 503 when the waiting room
        is full or the wait times out, 400 when `count` is more than there are."""
        if not self.max_active:
            self.active += count
            return
        if count > self.max_active:
            raise ApiError(400, f"The request asks for {count} completions; this server runs at "
                                f"most {self.max_active} at once (--max-active-requests).",
                           param="n", code="too_many_choices")
        if self.active + count <= self.max_active and not self._waiters:
            self.active += count
            return
        if len(self._waiters) >= self.max_waiting:
            raise overloaded(f"the frontend is at its limit of {self.max_active} requests in "
                             f"flight with {self.max_waiting} more waiting")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, count, priority)
        bisect.insort(self._waiters, entry, key=_PRIORITY)  # after its equals: in arrival order
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait_timeout_s)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.leave(count)  # the slots came as we gave up: pass them on
            else:
                waiter.cancel()
                self._waiters.remove(entry)
                self._wake()  # a smaller request behind this one may fit now
            if isinstance(exc, TimeoutError):
                raise overloaded(f"no request slot freed within {self.wait_timeout_s:g} s "
                                 f"({self.max_active} in flight)") from None
            raise

    def leave(self, count: int = 1) -> None:
        """Free `count` slots: to the waiters at the head of the queue, in order, as they
        fit."""
        self.active -= count
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter, count, _ = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if self.active + count > self.max_active:
                return
            self._waiters.popleft()
            self.active += count
            waiter.set_result(None)


def overloaded(message: str) -> ApiError:
    return ApiError(503, message, code="overloaded", reason="overloaded",
                    headers=retry_after_headers(OVERLOADED_RETRY_S))


def cap_tokens(body: Any, prompt_tokens: int, sampling: SamplingParams, max_prompt_tokens: int,
               max_output_tokens: int) -> None:
    """Apply the operator's caps (0: none): a longer prompt or a larger explicit max_tokens is
    a 400 naming the flag; a default max_tokens is lowered to the cap."""
    if max_prompt_tokens and prompt_tokens > max_prompt_tokens:
        param = "messages" if hasattr(body, "messages") else "prompt"
        raise ApiError(400, f"The prompt is {prompt_tokens} tokens; this server accepts at most "
                            f"{max_prompt_tokens} (--max-prompt-tokens).", param=param,
                       code="prompt_too_long", reason="prompt_too_long")
    if not max_output_tokens or sampling.max_tokens <= max_output_tokens:
        return
    explicit = getattr(body, "max_completion_tokens", None)
    param = "max_completion_tokens"
    if explicit is None:
        explicit, param = body.max_tokens, "max_tokens"
    if explicit is not None:
        raise ApiError(400, f"'{param}' is {explicit}; this server allows at most "
                            f"{max_output_tokens} (--max-output-tokens).", param=param,
                       code="max_tokens_exceeded", reason="max_tokens_exceeded")
    sampling.max_tokens = max_output_tokens
    if sampling.min_tokens > max_output_tokens:
        raise ApiError(400, f"'min_tokens' ({sampling.min_tokens}) exceeds this server's "
                            f"--max-output-tokens ({max_output_tokens})", param="min_tokens",
                       code="invalid_value")
