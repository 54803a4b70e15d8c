"""RouterClient against a real ROUTER on loopback: streams flow, malformed replies are dropped,
and a router whose connection drops fails its streams at once."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from common.discovery import StaticDiscovery
from common.messages import (
    FINISH_ERROR,
    FINISH_LENGTH,
    KIND_GENERATE,
    KIND_TOKENS,
    GenerateRequest,
    SamplingParams,
    TokenBatch,
    TokenChunk,
    encoder,
    generate_decoder,
)
from common.transport import bind_socket
from services.frontend.upstream import RouterClient
from turnout.testing.deployment import eventually


def run_with_router(tmp_path: Path,
                    body: Callable[[RouterClient, zmq.asyncio.Socket], Awaitable[None]]) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        endpoint = bind_socket(router, "127.0.0.1", 0)
        records = tmp_path / "instances.json"
        records.write_text(json.dumps([
            {"id": "r1", "role": "router", "endpoints": {"request": endpoint}},
            {"id": "w1", "role": "worker", "model": "m", "metadata": {"max_model_len": 64}}]))
        discovery = StaticDiscovery(records)
        client = RouterClient(discovery)
        await client.start()
        try:
            await eventually(lambda: client.served_models() == ["m"], "the worker's model")
            await body(client, router)
        finally:
            await client.close()
            await discovery.close()
            router.close(linger=0)
            ctx.destroy(linger=0)

    asyncio.run(asyncio.wait_for(main(), 30))


def request(request_id: str) -> GenerateRequest:
    return GenerateRequest(request_id, "m", [1, 2, 3], SamplingParams(max_tokens=2))


async def received(router: zmq.asyncio.Socket) -> tuple[bytes, GenerateRequest]:
    ident, kind, payload = await asyncio.wait_for(router.recv_multipart(), 10)
    assert kind == KIND_GENERATE
    return ident, generate_decoder.decode(payload)


def test_malformed_replies_are_dropped_and_the_stream_still_flows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(client: RouterClient, router: zmq.asyncio.Socket) -> None:
        assert client.max_model_len("m") == 64
        stream = client.open(request("a"))
        ident, sent = await received(router)
        assert sent.request_id == "a"
        await router.send_multipart([ident, KIND_TOKENS, b"\xc1not msgpack"])
        await router.send_multipart([ident, b"?", b"", b""])
        chunks = [TokenChunk("a", [7]), TokenChunk("a", [8], FINISH_LENGTH)]
        await router.send_multipart([ident, KIND_TOKENS, encoder.encode(TokenBatch(chunks))])
        got = await asyncio.wait_for(stream.next_batch(), 10)
        assert [(c.token_ids, c.finish_reason) for c in got] == [([7], None), ([8], "length")]
        assert client.malformed.total == 2

    with caplog.at_level(logging.WARNING, logger="services.frontend.upstream"):
        run_with_router(tmp_path, body)
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1  # one per router, however many frames
    assert warnings[0].fields["source"] == "r1"  # type: ignore[attr-defined]


def test_a_router_that_drops_fails_its_streams_at_once(tmp_path: Path) -> None:
    async def body(client: RouterClient, router: zmq.asyncio.Socket) -> None:
        stream = client.open(request("b"))
        await received(router)  # connected, and the request is there
        router.close(linger=0)
        got = await asyncio.wait_for(stream.next_batch(), 10)
        assert [(c.finish_reason, c.error_code) for c in got] == [(FINISH_ERROR, 503)]
        assert client.served_models() == []  # no new request goes its way

    run_with_router(tmp_path, body)
