"""--stream-interval under real uvicorn in front of a fake upstream whose tokens have all piled
up before the app reads: merged into one event by default, N tokens per event when asked."""

from __future__ import annotations

import json
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


def stream_texts(stream_interval: int) -> tuple[list[str], int]:
    """The text of every streamed event, and how many tokens were generated."""
    tokenizer = HfTokenizer(cached_tiny_model())
    reply = tokenizer.encode(WORDS, add_special_tokens=False)
    fake = FakeUpstream(models=["tiny"], script=Script(reply=reply, chunk_size=5, burst=True))
    app = FrontendApp(fake, tokenizer, served_model_name=None, max_model_len=1024,
                      metrics=FrontendMetrics(), stream_interval=stream_interval)
    server = LiveServer(app).start()
    try:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=10, json={
                "model": "tiny", "prompt": "count", "max_tokens": len(reply),
                "stream": True}) as response:
            events: list[Any] = [json.loads(line[len("data: "):])
                                 for line in response.iter_lines()
                                 if line.startswith("data: {")]
    finally:
        server.stop()
    return [e["choices"][0]["text"] for e in events if e["choices"]], len(reply)


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
