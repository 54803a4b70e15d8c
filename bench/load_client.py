"""A light streaming load client for OpenAI-compatible servers, for benchmarks.

Owns: raw HTTP/1.1 keep-alive connections (asyncio Protocol, TCP_NODELAY, chunked transfer
decoding), SSE parsing of `/v1/completions` and `/v1/chat/completions` streams, per-request timing
(TTFT, every inter-chunk gap, E2E, token counts from usage), closed-loop load (`run_load`),
open-loop trace replay (`run_trace`) and summaries. Does not own starting or measuring servers
(see `bench/overhead.py`).

Why not aiohttp or httpx: on a small machine the client competes with the server for cores, and
those clients spend about a core of their own at a few hundred requests per second. This one
does the minimum per chunk: find the frame, decode one small JSON object, take one timestamp.

    python bench/load_client.py --url http://127.0.0.1:8000 --concurrency 16 --requests 500
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

T = TypeVar("T")

Prompt = str | list[int]
ChatMessages = list[dict[str, Any]]


class HttpError(Exception):
    """The server answered with a non-200 status, or the HTTP framing was broken."""


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class RequestRecord:
    """What one request measured. Times are seconds; `start` is on `time.perf_counter()`."""

    start: float = 0.0
    ttft: float | None = None  # to the first chunk that carries a token
    e2e: float | None = None  # to the end of the response
    # Gap before each token chunk after the first: one entry per chunk, however many tokens
    # that chunk carries (see `chunk_tokens`).
    itl: list[float] = dataclasses.field(default_factory=list)
    # Tokens per token chunk, where the server says (usage on every chunk, or token ids in the
    # chunk); None where it cannot be known from the stream.
    chunk_tokens: list[int] | None = None
    chunks: int = 0  # token chunks seen
    output_tokens: int | None = None  # usage.completion_tokens
    prompt_tokens: int | None = None  # usage.prompt_tokens
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    finish_reason: str | None = None
    text_chars: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass(slots=True)
class LoadResult:
    records: list[RequestRecord]
    duration: float  # wall seconds from the first send to the last response
    concurrency: int | None = None  # None for open-loop runs
    started: float = 0.0  # open loop: the schedule's origin (`time.perf_counter()`)

    def summary(self) -> dict[str, Any]:
        return summarize(self)

    def send_lags(self, trace: Sequence[TraceRequest]) -> list[float]:
        """Open loop: how late (seconds) each request sent went out against its schedule: the
        client's own health (short of CPU, it sends late and every latency is suspect)."""
        return [r.start - self.started - t.at
                for r, t in zip(self.records, trace, strict=True) if r.start]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def summarize(result: LoadResult) -> dict[str, Any]:
    """Throughput and latency figures of a run; latencies in ms, only over successful requests."""
    ok = [r for r in result.records if r.ok]
    duration = result.duration if result.duration > 0 else float("nan")
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    itl = [gap for r in ok for gap in r.itl]
    # Time per output token after the first, per request (robust to multi-token chunks).
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.e2e is not None and r.ttft is not None and (r.output_tokens or 0) > 1]
    chunks = sum(r.chunks for r in ok)
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    errors: dict[str, int] = {}
    for r in result.records:
        if r.error is not None:
            key = r.error[:120]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(result.records),
        "completed": len(ok),
        "errors": len(result.records) - len(ok),
        "duration_s": round(result.duration, 3),
        "req_s": round(len(ok) / duration, 2),
        "output_tok_s": round(out_tokens / duration, 1),
        "ttft_ms_p50": _ms(percentile(ttft, 50)),
        "ttft_ms_p99": _ms(percentile(ttft, 99)),
        "itl_ms_p50": _ms(percentile(itl, 50)),
        "itl_ms_p99": _ms(percentile(itl, 99)),
        "tpot_ms_p50": _ms(percentile(tpot, 50)),
        "e2e_ms_p50": _ms(percentile(e2e, 50)),
        "e2e_ms_p99": _ms(percentile(e2e, 99)),
        "output_tokens_mean": round(out_tokens / len(ok), 2) if ok else None,
        "tokens_per_chunk": round(out_tokens / chunks, 3) if chunks else None,
        "prompt_tokens_mean": round(sum(prompt) / len(prompt), 2) if prompt else None,
        "cached_tokens_mean": round(sum(cached) / len(cached), 2) if cached else None,
        "error_kinds": errors,
    }


# ---------------------------------------------------------------------------------------------
# Stream chunk shapes: only the fields the client reads (msgspec skips the rest fast).
# ---------------------------------------------------------------------------------------------


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _ErrorBody(msgspec.Struct):
    message: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: _ErrorBody | str | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.Encoder().encode


# ---------------------------------------------------------------------------------------------
# One response being read: HTTP framing → SSE events → RequestRecord
# ---------------------------------------------------------------------------------------------

_STATUS, _HEADERS, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_TRAILER, _LENGTH_BODY, _CLOSE_BODY, _DONE = (
    range(8))


class _Response:
    """Incremental parser of one HTTP/1.1 response whose body is an SSE stream (or JSON)."""

    __slots__ = ("_buf", "_done", "_prev_completion", "_prev_t", "_remaining", "_sse", "_state",
                 "body", "keep_alive", "record", "status", "stream")

    def __init__(self, record: RequestRecord, stream: bool) -> None:
        self.record = record
        self.stream = stream
        self.status = 0
        self.keep_alive = True
        self.body = bytearray()  # non-stream bodies and error bodies
        self._buf = bytearray()
        self._sse = bytearray()
        self._state = _STATUS
        self._remaining = 0
        self._prev_t = 0.0
        self._prev_completion = 0
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> asyncio.Future[None]:
        return self._done

    def feed(self, data: bytes, now: float) -> None:
        self._buf += data
        try:
            self._parse(now)
        except Exception as exc:  # a broken frame fails this request, never the client
            self.fail(HttpError(f"bad response: {exc!r}"))

    def fail(self, exc: BaseException) -> None:
        self.keep_alive = False
        if not self._done.done():
            self._done.set_exception(exc)

    def eof(self, now: float) -> None:
        if self._state == _CLOSE_BODY:
            self._body(bytes(self._buf), now)
            self._buf.clear()
            self._finish(now)
        else:
            self.fail(ConnectionError("connection closed mid-response"))

    def _parse(self, now: float) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == _STATUS or state == _HEADERS:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(bytes(buf[:end]))
                del buf[:end + 4]
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[:end + 2]
                if size == 0:
                    self._state = _CHUNK_TRAILER
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                need = self._remaining
                if len(buf) < need + 2:
                    return
                self._body(bytes(buf[:need]), now)
                del buf[:need + 2]
                self._state = _CHUNK_SIZE
            elif state == _CHUNK_TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:end + 2]
                if end == 0:  # the empty line that ends the trailer
                    self._finish(now)
                    return
            elif state == _LENGTH_BODY:
                take = min(self._remaining, len(buf))
                if take:
                    self._body(bytes(buf[:take]), now)
                    del buf[:take]
                    self._remaining -= take
                if self._remaining == 0:
                    self._finish(now)
                return
            elif state == _CLOSE_BODY:
                if buf:
                    self._body(bytes(buf), now)
                    buf.clear()
                return
            else:
                return

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError(f"bad status line {lines[0][:80]!r}")
        self.status = int(parts[1])
        chunked = False
        length: int | None = None
        self.keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                self.keep_alive = value == b"keep-alive" or (
                    self.keep_alive and value != b"close")
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH_BODY
        else:
            self.keep_alive = False
            self._state = _CLOSE_BODY

    def _finish(self, now: float) -> None:
        self._state = _DONE
        rec = self.record
        rec.e2e = now - rec.start
        if self.status != 200:
            rec.error = f"HTTP {self.status}: {bytes(self.body[:300]).decode(errors='replace')}"
        elif self.stream and rec.error is None and rec.finish_reason is None:
            rec.error = "stream ended without a finish reason"
        if not self._done.done():
            self._done.set_result(None)

    def _body(self, data: bytes, now: float) -> None:
        if self.status != 200 or not self.stream:
            self.body += data
            return
        sse = self._sse
        sse += data
        if b"\r" in data:
            sse[:] = sse.replace(b"\r\n", b"\n")
        start = 0
        while True:
            end = sse.find(b"\n\n", start)
            if end < 0:
                break
            self._sse_event(bytes(sse[start:end]), now)
            start = end + 2
        if start:
            del sse[:start]

    def _sse_event(self, event: bytes, now: float) -> None:
        data = [line[6:] if line[5:6] == b" " else line[5:]
                for line in event.split(b"\n") if line.startswith(b"data:")]
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if not payload or payload == b"[DONE]":
            return
        self._event(payload, now)

    def _event(self, payload: bytes, now: float) -> None:
        chunk = _decode_chunk(payload)
        rec = self.record
        if chunk.error is not None:
            msg = chunk.error if isinstance(chunk.error, str) else chunk.error.message
            rec.error = f"stream error: {msg}"
            return
        usage = chunk.usage
        tokens_here: int | None = None
        if usage is not None:
            if usage.completion_tokens is not None:
                tokens_here = usage.completion_tokens - self._prev_completion
                self._prev_completion = usage.completion_tokens
                rec.output_tokens = usage.completion_tokens
            if usage.prompt_tokens is not None:
                rec.prompt_tokens = usage.prompt_tokens
            details = usage.prompt_tokens_details
            if details is not None and details.cached_tokens is not None:
                rec.cached_tokens = details.cached_tokens
        if not chunk.choices:
            return
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            rec.finish_reason = choice.finish_reason
        text = choice.text
        if text is None and choice.delta is not None:
            text = choice.delta.content or choice.delta.reasoning_content
        if choice.token_ids is not None:
            tokens_here = len(choice.token_ids)
        # A token chunk carries text, token ids or a usage increment; a bare finish chunk or a
        # chat role-only chunk carries none of them and is not timed.
        if not text and not tokens_here:
            return
        if text:
            rec.text_chars += len(text)
        if rec.ttft is None:
            rec.ttft = now - rec.start
        else:
            rec.itl.append(now - self._prev_t)
        self._prev_t = now
        rec.chunks += 1
        if tokens_here is not None:
            if rec.chunk_tokens is None:
                rec.chunk_tokens = []
            rec.chunk_tokens.append(tokens_here)


# ---------------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: _Response | None = None
        self.closed = False
        self._perf = time.perf_counter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.response is not None:
            self.response.feed(data, self._perf())

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None and not self.response.done.done():
            if exc is None:
                self.response.eof(self._perf())
            else:
                self.response.fail(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Endpoint:
    """Where requests go (scheme://host:port), and how to open connections to it."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url if "://" in base_url else "http://" + base_url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// is supported, got {base_url!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.host_header = f"{self.host}:{self.port}".encode()

    async def connect(self, timeout_s: float = 10.0) -> _Connection:
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(_Connection, self.host, self.port), timeout_s)
        return proto

    def request_bytes(self, method: str, path: str, body: bytes | None,
                      headers: dict[str, str] | None = None) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1".encode(), b"Host: " + self.host_header,
                 b"Connection: keep-alive"]
        if body is not None:
            lines.append(b"Content-Type: application/json")
            lines.append(b"Content-Length: " + str(len(body)).encode())
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}".encode())
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        return head + body if body is not None else head


async def _exchange(endpoint: Endpoint, conn: _Connection | None, payload: bytes,
                    record: RequestRecord, stream: bool, timeout_s: float | None,
                    ) -> tuple[_Response, _Connection | None]:
    """Send one request on `conn` (or a new connection); return the parsed response and the
    connection if it can be reused. Errors land in `record.error`."""
    reused = conn is not None and not conn.closed
    while True:
        response: _Response | None = None
        try:
            if conn is None or conn.closed:
                conn = await endpoint.connect()
            response = _Response(record, stream)
            conn.response = response
            record.start = time.perf_counter()
            assert conn.transport is not None
            if conn.transport.is_closing():  # closed under us, its connection_lost still due
                raise ConnectionError("connection closed before the request was sent")
            conn.transport.write(payload)
            if timeout_s is None:
                await response.done
            else:
                await asyncio.wait_for(asyncio.shield(response.done), timeout_s)
        except (OSError, HttpError, ConnectionError, TimeoutError) as exc:
            if conn is not None:
                conn.response = None  # nobody will read its outcome any more
                conn.close()
            conn = None
            # A server may close an idle keep-alive connection just as we reuse it: nothing of
            # the response arrived, so retry once on a fresh connection.
            if (reused and isinstance(exc, ConnectionError) and response is not None
                    and response.status == 0):
                reused = False
                continue
            record.error = record.error or f"{type(exc).__name__}: {exc}"
            if record.start and record.e2e is None:
                record.e2e = time.perf_counter() - record.start
        break
    if response is None:
        response = _Response(record, stream)
    elif conn is not None:
        conn.response = None
        if not response.keep_alive:
            conn.close()
            conn = None
    return response, conn


async def http_get(base_url: str, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET `path` on a fresh connection; (status, body). Raises OSError/TimeoutError if down."""
    endpoint = Endpoint(base_url)
    record = RequestRecord()
    payload = endpoint.request_bytes("GET", path, None)
    response, conn = await _exchange(endpoint, None, payload, record, stream=False,
                                     timeout_s=timeout_s)
    if conn is not None:
        conn.close()
    if response.status == 0:
        raise ConnectionError(record.error or "no response")
    return response.status, bytes(response.body)


async def wait_until_ok(base_url: str, path: str, timeout_s: float,
                        alive: Callable[[], bool] | None = None) -> bytes:
    """Poll GET `path` until it answers 200; its body. TimeoutError after `timeout_s` seconds;
    RuntimeError as soon as `alive()` says the server process is gone."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"server exited while waiting for {path} ({last})")
        try:
            status, body = await http_get(base_url, path, timeout_s=2.0)
            if status == 200:
                return body
            last = f"HTTP {status}"
        except (OSError, ConnectionError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{base_url}{path} not ready after {timeout_s:.0f}s ({last})")


async def served_models(base_url: str) -> list[str]:
    """Ids listed by GET /v1/models."""
    status, body = await http_get(base_url, "/v1/models")
    if status != 200:
        raise HttpError(f"/v1/models answered {status}")
    return [m["id"] for m in json.loads(body).get("data", [])]


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RequestSpec:
    """What every request of a run shares."""

    model: str
    max_tokens: int
    chat: bool = False
    stream: bool = True
    ignore_eos: bool = True
    extra_body: dict[str, Any] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self, prompt: Prompt | ChatMessages, max_tokens: int | None = None) -> bytes:
        body: dict[str, Any] = {"model": self.model,
                                "max_tokens": max_tokens or self.max_tokens,
                                "stream": self.stream}
        if self.chat:
            body["messages"] = ([{"role": "user", "content": prompt}]
                                if isinstance(prompt, str) else prompt)
        else:
            body["prompt"] = prompt
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return _encode(body)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


async def run_load(base_url: str, model: str, prompts: Sequence[Prompt | ChatMessages],
                   concurrency: int, max_tokens: int, n_requests: int, *, chat: bool = False,
                   ignore_eos: bool = True, extra_body: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None,
                   request_timeout: float | None = 300.0) -> LoadResult:
    """Closed loop: `concurrency` workers, each on its own keep-alive connection, send the next
    request as soon as their last one ends, until `n_requests` are done. Request i uses
    prompts[i % len(prompts)]."""
    if not prompts:
        raise ValueError("no prompts")
    endpoint = Endpoint(base_url)
    spec = RequestSpec(model, max_tokens, chat=chat, ignore_eos=ignore_eos,
                       extra_body=extra_body or {}, headers=headers or {})
    # Encode every body up front so the timed loop only writes bytes.
    payloads = [endpoint.request_bytes("POST", spec.path, spec.body(p), spec.headers)
                for p in prompts]
    records = [RequestRecord() for _ in range(n_requests)]
    next_index = 0
    workers = max(1, min(concurrency, n_requests))
    # Open every connection before the clock starts, so connects don't count as TTFT.
    conns: list[_Connection | None] = list(
        await asyncio.gather(*(endpoint.connect() for _ in range(workers))))

    async def worker(slot: int) -> None:
        nonlocal next_index
        conn = conns[slot]
        while next_index < n_requests:
            i = next_index
            next_index += 1
            _, conn = await _exchange(endpoint, conn, payloads[i % len(payloads)], records[i],
                                      stream=True, timeout_s=request_timeout)
        if conn is not None:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in range(workers)))
    return LoadResult(records, time.perf_counter() - started, concurrency)


@dataclasses.dataclass(slots=True)
class TraceRequest:
    """One request of an open-loop trace: when to send it (seconds from the start) and what."""

    at: float
    prompt: Prompt | ChatMessages
    max_tokens: int


async def run_trace(base_url: str, model: str, trace: Sequence[TraceRequest], *,
                    chat: bool = False, ignore_eos: bool = True,
                    extra_body: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None, max_connections: int = 4096,
                    request_timeout: float | None = 300.0) -> LoadResult:
    """Open loop: send each request at its `at` offset whatever is still in flight; idle
    keep-alive connections are reused, new ones opened as needed (at most `max_connections`
    requests in flight; a request past that waits, and its lateness shows in its start time)."""
    endpoint = Endpoint(base_url)
    spec = RequestSpec(model, 0, chat=chat, ignore_eos=ignore_eos,
                       extra_body=extra_body or {}, headers=headers or {})
    records = [RequestRecord() for _ in trace]
    idle: list[_Connection] = []
    limit = asyncio.Semaphore(max_connections)

    async def one(i: int, item: TraceRequest, payload: bytes) -> None:
        async with limit:
            conn = idle.pop() if idle else None
            _, conn = await _exchange(endpoint, conn, payload, records[i], stream=True,
                                      timeout_s=request_timeout)
            if conn is not None:
                idle.append(conn)

    order = sorted(range(len(trace)), key=lambda k: trace[k].at)
    tasks: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    for i in order:
        item = trace[i]
        payload = endpoint.request_bytes("POST", spec.path,
                                         spec.body(item.prompt, item.max_tokens), spec.headers)
        delay = started + item.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, item, payload)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - started
    for conn in idle:
        conn.close()
    return LoadResult(records, duration, None, started)


def random_token_prompts(n: int, length: int, vocab_size: int, seed: int = 0,
                         low: int = 10) -> list[list[int]]:
    """`n` prompts of exactly `length` token ids drawn from [low, vocab_size), reproducibly."""
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab_size) for _ in range(length)] for _ in range(n)]


def run(coro: Awaitable[T]) -> T:
    """Run `coro` on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> None:
    model = args.model or (await served_models(args.url))[0]
    prompts: list[Prompt]
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        prompts = list(random_token_prompts(max(args.requests, 1), args.input_tokens,
                                            args.vocab_size, seed=args.seed))
    result = await run_load(args.url, model, prompts, args.concurrency, args.output_tokens,
                            args.requests, chat=args.chat)
    print(json.dumps({"concurrency": args.concurrency, **result.summary()}))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: first of /v1/models")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1000,
                        help="token ids of random prompts are drawn below this")
    parser.add_argument("--prompt", default=None, help="one text prompt instead of token ids")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.chat and args.prompt is None:
        parser.error("--chat needs --prompt (chat messages are text)")
    run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
