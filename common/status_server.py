"""A tiny asyncio HTTP/1.1 server for the non-HTTP services' /metrics, /health and /live.

Router and worker speak ZeroMQ, not HTTP; they still need a scrape target and probes. This serves
GET requests from `routes` and POST requests (a body of at most `max_body` bytes, announced by
Content-Length) from `post_routes`, one response per connection (Prometheus and kubelet probes
open short connections), with no threads and no framework. Malformed requests get a 4xx and a
failing route a 500; neither reaches the service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Response]
PostRoute = Callable[[bytes], Response]  # called with the request body

MAX_BODY_BYTES = 16 * 1024 * 1024

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable",
            400: "Bad Request", 411: "Length Required", 413: "Content Too Large",
            500: "Internal Server Error"}


def json_response(status: int, body: bytes) -> Response:
    return status, "application/json", body


class StatusServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 health: Callable[[], bool] = lambda: True,
                 max_body: int = MAX_BODY_BYTES) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.max_body = max_body
        self.routes: dict[str, Route] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(self.registry)),
            "/live": lambda: json_response(200, b'{"status":"ok"}'),
            "/health": lambda: json_response(200, b'{"status":"ok"}') if health()
            else json_response(503, b'{"status":"unavailable"}'),
        }
        self.post_routes: dict[str, PostRoute] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            status, ctype, body = await self._respond(head, reader)
            head_out = (f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n")
            writer.write(head_out.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # a broken connection must not take the service down
            log.exception("status server connection failed")
        finally:
            writer.close()

    async def _respond(self, head: bytes, reader: asyncio.StreamReader) -> Response:
        lines = head.split(b"\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].decode("latin-1").split("?", 1)[0]
        get, post = self.routes.get(target), self.post_routes.get(target)
        if get is None and post is None:
            return 404, "text/plain", b"not found\n"
        try:
            if method in (b"GET", b"HEAD") and get is not None:
                status, ctype, body = get()
                return status, ctype, b"" if method == b"HEAD" else body
            if method == b"POST" and post is not None:
                length = _content_length(lines[1:])
                if length is None:
                    return 411, "text/plain", b"a POST needs a valid Content-Length\n"
                if length > self.max_body:
                    return 413, "text/plain", f"body over {self.max_body} bytes\n".encode()
                body = await asyncio.wait_for(reader.readexactly(length), timeout=10)
                return post(body)
        except (TimeoutError, asyncio.IncompleteReadError):
            raise
        except Exception:  # a broken route must not take the service down
            log.exception("status server route %s failed", target)
            return 500, "text/plain", b"internal error\n"
        return 405, "text/plain", b"method not allowed\n"


def _content_length(header_lines: list[bytes]) -> int | None:
    """The Content-Length header's value; None if missing, repeated differently or invalid
    (chunked bodies are not accepted)."""
    found: int | None = None
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            text = value.strip()
            if not text.isdigit() or len(text) > 12:
                return None
            n = int(text)
            if found is not None and found != n:
                return None
            found = n
    return found
