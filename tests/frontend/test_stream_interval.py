"""--stream-interval under real uvicorn in front of a fake upstream whose tokens have all piled
up before the app reads: merged into one event by default, N tokens per event when asked."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from services.frontend.app import FrontendApp
from services.frontend.args import FrontendConfig
from services.frontend.metrics import FrontendMetrics
from services.frontend.tokenizer import HfTokenizer
from tests.frontend.fake_upstream import FakeUpstream, Script
from tests.frontend.live_server import LiveServer
from tests.tiny_model import cached_tiny_model

WORDS = "one two three four five six seven eight nine ten eleven twelve"


def piled_up_server(stream_interval: int) -> tuple[LiveServer, int]:
    """A live frontend whose upstream has the whole reply ready before the app reads, and
    the reply's token count."""
    tokenizer = HfTokenizer(cached_tiny_model())
    reply = tokenizer.encode(WORDS, add_special_tokens=False)
    fake = FakeUpstream(models=["tiny"], script=Script(reply=reply, chunk_size=5, burst=True))
    app = FrontendApp(fake, tokenizer, served_model_name=None, max_model_len=1024,
                      metrics=FrontendMetrics(), stream_interval=stream_interval)
    return LiveServer(app).start(), len(reply)


def stream_texts(stream_interval: int) -> tuple[list[str], int]:
    """The text of every streamed event, and how many tokens were generated."""
    server, n = piled_up_server(stream_interval)
    try:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=10, json={
                "model": "tiny", "prompt": "count", "max_tokens": n,
                "stream": True}) as response:
            events: list[Any] = [json.loads(line[len("data: "):])
                                 for line in response.iter_lines()
                                 if line.startswith("data: {")]
    finally:
        server.stop()
    return [e["choices"][0]["text"] for e in events if e["choices"]], n


def chunked_frames(raw: bytes) -> list[bytes]:
    """The payloads of an HTTP/1.1 chunked body, one per frame the server wrote."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    frames = []
    while True:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return frames
        frames.append(body[:size])
        body = body[size + 2:]


def test_events_that_piled_up_leave_in_one_write() -> None:
    """One event per token, but not a write (a syscall, a TCP segment) per token: the events
    that were ready together go out in one chunked frame (after the first event, which leaves
    alone so that time to first token never waits for the rest)."""
    server, n = piled_up_server(1)
    request = json.dumps({"model": "tiny", "prompt": "count", "max_tokens": n,
                          "stream": True}).encode()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(request), request))
            raw = b""
            while chunk := conn.recv(65536):
                raw += chunk
    finally:
        server.stop()
    frames = chunked_frames(raw)
    events = b"".join(frames).count(b"data: {")
    assert events >= n  # still one event per token (plus the closing ones)
    assert len(frames) <= 3, f"{len(frames)} writes for {events} events"


def test_piled_up_tokens_merge_by_default_and_split_per_interval() -> None:
    merged, n = stream_texts(0)
    assert "".join(merged) == WORDS and len([t for t in merged if t]) == 1
    per_token, _ = stream_texts(1)
    assert "".join(per_token) == WORDS
    assert len(per_token) == n  # one event per token (every token of WORDS has text)
    per_three, _ = stream_texts(3)
    assert "".join(per_three) == WORDS and len(per_three) == -(-n // 3)


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="--stream-interval"):
        FrontendConfig(stream_interval=-1)
