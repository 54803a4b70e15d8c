"""The status server: GET routes, POST routes with a body, and bad requests that never hurt it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, Counter

from common.status_server import StatusServer, json_response

TIMEOUT = 5.0


@pytest_asyncio.fixture
async def server() -> AsyncIterator[StatusServer]:
    registry = CollectorRegistry()
    Counter("turnout_test_things", "Things", registry=registry).inc()
    status = StatusServer(registry, "127.0.0.1", 0, max_body=1024)
    status.post_routes["/echo"] = lambda body: json_response(
        200, json.dumps({"got": body.decode()}).encode())
    status.post_routes["/boom"] = lambda body: 1 / 0  # type: ignore[return-value]
    status.routes["/broken"] = lambda: 1 / 0  # type: ignore[return-value]
    await status.start()
    try:
        yield status
    finally:
        await status.close()


async def raw(server: StatusServer, data: bytes) -> tuple[int, bytes]:
    """Send `data` as is; (status, body) of the answer, status 0 if the server just closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    if not answer:
        return 0, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
            + extra + b"\r\n" + body)


@pytest.mark.asyncio
async def test_get_routes(server: StatusServer) -> None:
    status, body = await raw(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and b"turnout_test_things_total 1.0" in body
    status, body = await raw(server, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b""
    assert (await raw(server, b"GET /health?probe=1 HTTP/1.1\r\n\r\n"))[0] == 200
    assert (await raw(server, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404


@pytest.mark.asyncio
async def test_post_routes_get_their_body(server: StatusServer) -> None:
    status, body = await raw(server, post("/echo", b'{"a": 1}'))
    assert status == 200 and json.loads(body) == {"got": '{"a": 1}'}
    status, body = await raw(server, post("/echo", b"", b"content-length: 0\r\n"))
    assert status == 200 and json.loads(body) == {"got": ""}


@pytest.mark.asyncio
async def test_bad_requests_get_a_4xx_and_the_server_stays_up(server: StatusServer) -> None:
    assert (await raw(server, b"GARBAGE\r\n\r\n"))[0] == 400
    assert (await raw(server, b"POST /metrics HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"))[0] == 405
    assert (await raw(server, b"GET /echo HTTP/1.1\r\n\r\n"))[0] == 405
    assert (await raw(server, b"PUT /echo HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"))[0] == 405
    assert (await raw(server, b"POST /echo HTTP/1.1\r\n\r\n"))[0] == 411
    assert (await raw(server, b"POST /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n"))[0] == 411
    assert (await raw(server, b"POST /echo HTTP/1.1\r\nContent-Length: abc\r\n\r\n"))[0] == 411
    assert (await raw(server, b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\n"
                              b"Content-Length: 2\r\n\r\nxx"))[0] == 411
    assert (await raw(server, b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"1\r\nx\r\n0\r\n\r\n"))[0] == 411
    assert (await raw(server, post("/echo", b"x" * 2000)))[0] == 413
    # A body shorter than announced: the server gives up on that connection only.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    # Routes that raise answer 500.
    assert (await raw(server, post("/boom", b"{}")))[0] == 500
    assert (await raw(server, b"GET /broken HTTP/1.1\r\n\r\n"))[0] == 500
    status, body = await raw(server, post("/echo", b"still here"))
    assert status == 200 and json.loads(body) == {"got": "still here"}
