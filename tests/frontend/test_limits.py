"""HTTP limits on real sockets against uvicorn running the frontend's limited protocol, the
admission queue, and the operator's token caps."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from common.messages import SamplingParams
from services.frontend import protocol
from services.frontend.errors import ApiError
from services.frontend.limits import AdmissionQueue, HttpLimits, cap_tokens, limited_http_protocol
from tests.frontend.live_server import LiveServer

LIMITS = HttpLimits(max_body_bytes=10_000, max_header_bytes=2_000, max_headers=20,
                    header_timeout_s=0.6, body_timeout_s=0.6)


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, optionally sleeps (?slow), answers its length."""
    if scope["type"] != "http":
        return
    if scope["query_string"] == b"late":
        await asyncio.sleep(1.5)  # busy before reading: the server's time, not the client's
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["query_string"] == b"slow":
        await asyncio.sleep(1.5)  # longer than both read timeouts: a slow answer is fine
    body = b'{"size":%d}' % size
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def refusals() -> list[str]:
    return []


@pytest.fixture(scope="module")
def server(refusals: list[str]) -> Iterator[LiveServer]:
    live = LiveServer(echo_app, http=limited_http_protocol(LIMITS, refusals.append)).start()
    yield live
    live.stop()


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_response(sock: socket.socket) -> bytes:
    """One response with a content-length, on a connection that stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n" % len(body)
            + extra + b"\r\n" + body)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_a_normal_request_and_keep_alive(server: LiveServer) -> None:
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(post("/", b"x" * 5000))
            response = read_response(sock)
            assert status_of(response) == 200 and b'{"size":5000}' in response
        # A slow answer is not cut by the read timeouts, and the connection stays usable.
        sock.sendall(post("/?slow", b"{}"))
        assert b'{"size":2}' in read_response(sock)


def test_headers_too_large_or_too_many_is_431(server: LiveServer, refusals: list[str]) -> None:
    with connect(server) as sock:
        sock.sendall(post("/", b"", b"x-big: " + b"a" * 3000 + b"\r\n"))
        response = read_all(sock)
    assert status_of(response) == 431 and b"header_bytes" in response
    with connect(server) as sock:
        sock.sendall(post("/", b"", b"".join(b"x-h%d: v\r\n" % i for i in range(30))))
        response = read_all(sock)
    assert status_of(response) == 431 and b"header_count" in response
    with connect(server) as sock:
        sock.sendall(b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        assert status_of(read_all(sock)) == 431
    # One header that never ends: cut once the bytes pass the limit, not buffered forever.
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\nx-endless: ")
        try:
            for _ in range(100):
                sock.sendall(b"a" * 1000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert status_of(read_all(sock)) == 431
    assert {"header_bytes", "header_count"} <= set(refusals)


def test_body_larger_than_the_limit_is_413_before_it_is_sent(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n")
        started = time.monotonic()
        response = read_all(sock)  # answered and closed without a byte of the body
    assert status_of(response) == 413 and time.monotonic() - started < 0.5
    # Chunked: no length to check up front; cut once the limit is passed.
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (4000, b"y" * 4000)
        try:
            for _ in range(10):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert status_of(read_all(sock)) == 413


def test_slow_headers_are_cut_at_the_timeout(server: LiveServer) -> None:
    request = post("/", b"{}")
    with connect(server) as sock:
        started = time.monotonic()
        closed_at = None
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            time.sleep(0.05)
            sock.setblocking(False)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            finally:
                sock.setblocking(True)
            assert status_of(data) == 408
            closed_at = time.monotonic()
            break
    assert closed_at is not None, "the slow client was never cut"
    assert closed_at - started < LIMITS.header_timeout_s + 0.5


def test_slow_body_is_cut_at_the_timeout(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
        started = time.monotonic()
        response = read_all(sock)
    assert status_of(response) == 408 and b"body_timeout" in response
    assert time.monotonic() - started < LIMITS.body_timeout_s + 0.5


def test_body_clock_stops_while_the_server_is_not_reading(server: LiveServer) -> None:
    # More than uvicorn buffers (64 KiB): reading pauses until the app asks for the body.
    body = b"z" * 9_000
    big = LiveServer(echo_app, http=limited_http_protocol(
        HttpLimits(max_body_bytes=1_000_000, header_timeout_s=0.6, body_timeout_s=0.6))).start()
    try:
        with socket.create_connection(("127.0.0.1", big.port), timeout=5) as sock:
            payload = b"q" * 500_000
            sock.sendall(post("/?late", payload))
            response = read_response(sock)
        assert status_of(response) == 200 and b'{"size":500000}' in response
        with connect(server) as sock:
            sock.sendall(post("/?late", body))
            assert b'{"size":9000}' in read_response(sock)
    finally:
        big.stop()


def test_idle_kept_alive_connection_is_not_cut_by_the_header_timeout(
        server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(post("/", b"{}"))
        assert status_of(read_response(sock)) == 200
        time.sleep(LIMITS.header_timeout_s + 0.2)  # idle between requests: keep-alive's rule
        sock.sendall(post("/", b"{}"))
        assert status_of(read_response(sock)) == 200


def test_garbage_is_400(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"\x00\xff\xfe not http at all\r\n\r\n")
        assert status_of(read_all(sock)) == 400


# --- admission queue --------------------------------------------------------------------------

def test_admission_queue_bounds_waiters_and_hands_slots_in_order() -> None:
    async def main() -> None:
        queue = AdmissionQueue(max_active=2, max_waiting=2, wait_timeout_s=5)
        await queue.enter()
        await queue.enter()
        order: list[str] = []

        async def waiter(name: str) -> None:
            await queue.enter()
            order.append(name)

        first = asyncio.create_task(waiter("first"))
        second = asyncio.create_task(waiter("second"))
        await asyncio.sleep(0)
        assert queue.waiting == 2
        with pytest.raises(ApiError) as full:
            await queue.enter()
        assert full.value.status == 503
        assert dict(full.value.headers)[b"retry-after"] == b"1"
        queue.leave()
        await first
        queue.leave()
        await second
        assert order == ["first", "second"] and queue.active == 2 and queue.waiting == 0
        queue.leave()
        queue.leave()
        assert queue.active == 0

    asyncio.run(asyncio.wait_for(main(), 10))


def test_admission_hands_slots_by_priority_then_arrival() -> None:
    async def main() -> None:
        queue = AdmissionQueue(max_active=1, max_waiting=5, wait_timeout_s=5)
        await queue.enter()
        order: list[str] = []

        async def waiter(name: str, priority: int) -> None:
            await queue.enter(priority=priority)
            order.append(name)
            queue.leave()

        tasks = [asyncio.create_task(waiter(name, priority)) for name, priority in (
            ("late", 5), ("a", 0), ("urgent", -2), ("b", 0), ("urgent2", -2))]
        await asyncio.sleep(0)
        assert queue.waiting == 5
        queue.leave()
        await asyncio.gather(*tasks)
        assert order == ["urgent", "urgent2", "a", "b", "late"] and queue.active == 0

    asyncio.run(asyncio.wait_for(main(), 10))


def test_admission_wait_times_out_and_a_cancelled_waiter_leaves() -> None:
    async def main() -> None:
        queue = AdmissionQueue(max_active=1, max_waiting=5, wait_timeout_s=0.1)
        await queue.enter()
        with pytest.raises(ApiError) as timed_out:
            await queue.enter()
        assert timed_out.value.status == 503 and queue.waiting == 0
        task = asyncio.create_task(queue.enter())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert queue.waiting == 0
        queue.leave()
        assert queue.active == 0
        unlimited = AdmissionQueue(0, 0, 1.0)
        for _ in range(1000):
            await unlimited.enter()
        assert unlimited.active == 1000

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_request_for_several_completions_takes_its_slots_at_once() -> None:
    async def main() -> None:
        queue = AdmissionQueue(max_active=4, max_waiting=5, wait_timeout_s=5)
        with pytest.raises(ApiError) as never:
            await queue.enter(5)
        assert (never.value.status, never.value.param) == (400, "n")
        await queue.enter(2)
        order: list[str] = []

        async def waiter(name: str, count: int) -> None:
            await queue.enter(count)
            order.append(name)

        big = asyncio.create_task(waiter("big", 3))
        await asyncio.sleep(0)
        small = asyncio.create_task(waiter("small", 1))  # fits, but waits its turn
        await asyncio.sleep(0)
        assert queue.waiting == 2 and queue.active == 2
        queue.leave()
        await big
        assert queue.active == 4 and order == ["big"]
        queue.leave(3)
        await small
        assert order == ["big", "small"] and queue.active == 2
        # A waiter that gives up lets the smaller one behind it in.
        await queue.enter(2)
        stuck = asyncio.create_task(waiter("stuck", 3))
        await asyncio.sleep(0)
        after = asyncio.create_task(waiter("after", 1))
        await asyncio.sleep(0)
        queue.leave()
        await asyncio.sleep(0)
        assert queue.active == 3 and order == ["big", "small"]
        stuck.cancel()
        await after
        assert order[-1] == "after" and queue.active == 4 and queue.waiting == 0

    asyncio.run(asyncio.wait_for(main(), 10))


# --- token caps -------------------------------------------------------------------------------

def chat(**fields: Any) -> protocol.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return protocol.parse_chat(json.dumps(body).encode())


def test_token_caps() -> None:
    sampling = SamplingParams(max_tokens=900)
    cap_tokens(chat(), 100, sampling, max_prompt_tokens=0, max_output_tokens=50)
    assert sampling.max_tokens == 50  # the default is lowered to the cap
    with pytest.raises(ApiError) as prompt:
        cap_tokens(chat(), 101, SamplingParams(max_tokens=1), 100, 0)
    assert (prompt.value.status, prompt.value.param) == (400, "messages")
    with pytest.raises(ApiError) as explicit:
        cap_tokens(chat(max_completion_tokens=60), 1, SamplingParams(max_tokens=60), 0, 50)
    assert explicit.value.param == "max_completion_tokens"
    assert "--max-output-tokens" in explicit.value.message
    with pytest.raises(ApiError) as legacy:
        cap_tokens(chat(max_tokens=60), 1, SamplingParams(max_tokens=60), 0, 50)
    assert legacy.value.param == "max_tokens"
    within = SamplingParams(max_tokens=50)
    cap_tokens(chat(max_tokens=50), 1, within, 0, 50)
    assert within.max_tokens == 50
    with pytest.raises(ApiError) as min_tokens:
        cap_tokens(chat(), 1, SamplingParams(max_tokens=900, min_tokens=80), 0, 50)
    assert min_tokens.value.param == "min_tokens"
