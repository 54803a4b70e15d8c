"""The bare HTTP floor: an OpenAI-shaped streaming server that does no work between request and
answer, for `bench/overhead.py --floor` to measure what serving costs before any routing.

Owns one process: the same HTTP stack as Turnout's frontend (uvicorn, httptools, uvloop, a raw
ASGI application, no access log), answering `POST /v1/completions` and `/v1/chat/completions`
by parsing the JSON body and streaming `max_tokens` one-token SSE events (one write each; the
frontend at `--stream-interval 1` writes events that are ready together at once), a usage event
and `[DONE]` at once; `GET /health` and
`/v1/models` for the benchmark's readiness checks. TTFT against it is the floor: the client, the
loopback and the HTTP server alone. Does not own the client or the comparison (`overhead.py`).

    python bench/http_floor.py --port 18300
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import uvicorn

MODEL = "floor"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_JSON_HEADERS = [(b"content-type", b"application/json")]


async def _read_body(receive: Any) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)


async def _json(send: Any, status: int, payload: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def _stream(send: Any, request: dict[str, Any], chat: bool) -> None:
    tokens = int(request.get("max_tokens") or 16)
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    for i in range(tokens):
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": "length" if i == tokens - 1 else None}
        if chat:
            choice["delta"] = {"content": "a"}
        else:
            choice["text"] = "a"
        event = {"id": "cmpl-floor", "object": kind, "created": created,
                 "model": request.get("model", MODEL), "choices": [choice]}
        await send({"type": "http.response.body", "more_body": True,
                    "body": b"data: " + json.dumps(event).encode() + b"\n\n"})
    usage = {"prompt_tokens": len(request.get("prompt") or ()), "completion_tokens": tokens,
             "total_tokens": len(request.get("prompt") or ()) + tokens}
    last = {"id": "cmpl-floor", "object": kind, "created": created,
            "model": request.get("model", MODEL), "choices": [], "usage": usage}
    await send({"type": "http.response.body", "more_body": False,
                "body": b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n"})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan is off: nothing to set up
        return
    method, path = scope["method"], scope["path"]
    if method == "GET" and path == "/health":
        await _json(send, 200, {"status": "ok"})
    elif method == "GET" and path == "/v1/models":
        await _json(send, 200, {"object": "list",
                                "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]})
    elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
        try:
            request = json.loads(await _read_body(receive))
        except ValueError as exc:
            await _json(send, 400, {"error": {"message": f"invalid JSON: {exc}",
                                              "type": "invalid_request_error"}})
            return
        await _stream(send, request, chat=path.endswith("chat/completions"))
    else:
        await _json(send, 404, {"error": {"message": f"no route {method} {path}",
                                          "type": "invalid_request_error"}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools",
                lifespan="off", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
