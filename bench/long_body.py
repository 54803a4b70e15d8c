"""Where a long prompt's time goes before the frontend hands it to the router.

For prompts of 1k/8k/32k/100k tokens, sent as a `prompt` token-id array on /v1/completions and as
text on /v1/chat/completions, times each stage the request passes through, in this process:

  read_body       the ASGI body arriving in 64 KiB messages (as uvicorn delivers it), joined
  decode_validate JSON decode + OpenAI-spec validation (`protocol.parse_*`)
  prompt          the prompt as token ids: the id checks (ids) or template + tokenizer (text)
  sampling        `protocol.sampling_params`
  encode_request  the `GenerateRequest` as the request plane's MessagePack frame
  router_decode   the router decoding that frame
  block_hashes    the router's chained block hashes (block size 64)
  http_to_router  end to end: the client starts sending the body over loopback HTTP (real
                  uvicorn + the frontend app) → the frontend calls `Upstream.open` (p50)

Prints one JSON line per (endpoint, size) with the median milliseconds of each stage.

    python bench/long_body.py [--model DIR] [--sizes 1000,8000,32000,100000] [--reps 15]

`--model` defaults to the tests' tiny model (built into .cache on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import uvicorn

from common.block_hash import block_hashes
from common.messages import GenerateRequest, TokenChunk, encoder, generate_decoder
from services.frontend import protocol
from services.frontend.app import _read_body, build_app
from services.frontend.metrics import FrontendMetrics
from services.frontend.tokenizer import HfTokenizer
from services.frontend.upstream import ChunkStream

MODEL_NAME = "long"
CHUNK = 64 * 1024
BLOCK = 64
MAX_MODEL_LEN = 200_000

TEXT = (
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than "
    "complex. Complex is better than complicated. Flat is better than nested. Sparse is better "
    "than dense. Readability counts. Special cases aren't special enough to break the rules. "
    "Although practicality beats purity. Errors should never pass silently. Unless explicitly "
    "silenced. In the face of ambiguity, refuse the temptation to guess. There should be one-- "
    "and preferably only one --obvious way to do it. Now is better than never. "
)


class RecordingUpstream:
    """Serves one model; notes when each request is opened and finishes it at once."""

    def __init__(self) -> None:
        self.opened_at: list[float] = []

    def served_models(self) -> list[str]:
        return [MODEL_NAME]

    def max_model_len(self, model: str) -> int | None:
        return MAX_MODEL_LEN

    def open(self, request: GenerateRequest) -> ChunkStream:
        self.opened_at.append(time.perf_counter())
        stream = ChunkStream(request.request_id)
        stream.push(TokenChunk(request.request_id, [65], "length"))
        return stream

    def cancel(self, request_id: str) -> None:
        pass


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 3)


async def median_ms_async(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 3)


def text_of(tokenizer: HfTokenizer, tokens: int) -> str:
    """Text that tokenizes to about `tokens` tokens."""
    per_copy = len(tokenizer.encode(TEXT, False))
    return TEXT * max(1, round(tokens / per_copy))


def bodies(tokenizer: HfTokenizer, n: int) -> dict[str, bytes]:
    ids = [(i * 7919 + 13) % tokenizer.vocab_size for i in range(n)]
    return {
        "completions_ids": json.dumps({"model": MODEL_NAME, "prompt": ids,
                                       "max_tokens": 1}).encode(),
        "chat_text": json.dumps({"model": MODEL_NAME, "max_tokens": 1, "messages": [
            {"role": "user", "content": text_of(tokenizer, n)}]}).encode(),
    }


async def stage_times(tokenizer: HfTokenizer, kind: str, raw: bytes, reps: int) -> dict[str, Any]:
    async def read() -> bytes | None:
        messages = [{"type": "http.request", "body": raw[i:i + CHUNK],
                     "more_body": i + CHUNK < len(raw)} for i in range(0, len(raw), CHUNK)]
        it = iter(messages)

        async def receive() -> dict[str, Any]:
            return next(it)

        return await _read_body(receive)

    chat = kind == "chat_text"
    parse = protocol.parse_chat if chat else protocol.parse_completion
    body = parse(raw)

    def prompt() -> list[int]:
        if chat:
            return tokenizer.render_chat(protocol.chat_messages(body))
        ids = protocol.completion_prompt(body, tokenizer.vocab_size)
        assert isinstance(ids, list)
        return ids

    ids = prompt()
    sampling = protocol.sampling_params(body, len(ids), MAX_MODEL_LEN, tokenizer.vocab_size)
    request = GenerateRequest(request_id="r" * 32, model=MODEL_NAME, token_ids=ids,
                              sampling=sampling)
    frame = encoder.encode(request)
    return {
        "prompt_tokens": len(ids),
        "body_bytes": len(raw),
        "read_body": await median_ms_async(read, reps),
        "decode_validate": median_ms(lambda: parse(raw), reps),
        "prompt": median_ms(prompt, reps),
        "sampling": median_ms(lambda: protocol.sampling_params(
            body, len(ids), MAX_MODEL_LEN, tokenizer.vocab_size), reps),
        "encode_request": median_ms(lambda: encoder.encode(request), reps),
        "router_decode": median_ms(lambda: generate_decoder.decode(frame), reps),
        "block_hashes": median_ms(lambda: block_hashes(ids, BLOCK), reps),
    }


async def http_to_router(tokenizer: HfTokenizer, cases: list[tuple[str, int, bytes]],
                         reps: int) -> dict[tuple[str, int], float]:
    upstream = RecordingUpstream()
    app = build_app(upstream, tokenizer, MODEL_NAME, MAX_MODEL_LEN, FrontendMetrics())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http="httptools", loop="none", lifespan="off",
                                           access_log=False, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(1000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    out: dict[tuple[str, int], float] = {}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for kind, n, raw in cases:
                path = "/v1/chat/completions" if kind == "chat_text" else "/v1/completions"
                lags = []
                for _ in range(reps + 1):  # the first warms the connection
                    upstream.opened_at.clear()
                    sent = time.perf_counter()
                    resp = await client.post(path, content=raw,
                                             headers={"content-type": "application/json"})
                    resp.raise_for_status()
                    lags.append(upstream.opened_at[0] - sent)
                out[(kind, n)] = round(statistics.median(lags[1:]) * 1000, 3)
    finally:
        server.should_exit = True
        await serving
        sock.close()
    return out


async def run(args: argparse.Namespace) -> None:
    model = args.model
    if not model:
        from tests.tiny_model import cached_tiny_model

        model = str(cached_tiny_model())
    tokenizer = HfTokenizer(model)
    cases = []
    for n in args.sizes:
        for kind, raw in bodies(tokenizer, n).items():
            cases.append((kind, n, raw))
    lines = []
    for kind, n, raw in cases:
        line = {"bench": "long_body", "endpoint": kind, "tokens": n,
                **await stage_times(tokenizer, kind, raw, args.reps)}
        lines.append(line)
    e2e = await http_to_router(tokenizer, cases, args.reps)
    for line in lines:
        line["http_to_router"] = e2e[(line["endpoint"], line["tokens"])]
        print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="HF model directory (tokenizer.json)")
    parser.add_argument("--sizes", default="1000,8000,32000,100000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
