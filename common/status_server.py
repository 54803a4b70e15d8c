"""A tiny asyncio HTTP/1.1 server for the non-HTTP services' /metrics, /health and /live.

Router and worker speak ZeroMQ, not HTTP; they still need a scrape target and probes. This serves
GET requests from a table of routes, one response per connection (Prometheus and kubelet probes
open short connections), with no threads and no framework.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Response]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable",
            400: "Bad Request", 500: "Internal Server Error"}


def json_response(status: int, body: bytes) -> Response:
    return status, "application/json", body


class StatusServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 health: Callable[[], bool] = lambda: True) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.routes: dict[str, Route] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(self.registry)),
            "/live": lambda: json_response(200, b'{"status":"ok"}'),
            "/health": lambda: json_response(200, b'{"status":"ok"}') if health()
            else json_response(503, b'{"status":"unavailable"}'),
        }
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
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                method, target = parts[0], parts[1].decode("latin-1").split("?", 1)[0]
                route = self.routes.get(target)
                if route is None:
                    status, ctype, body = 404, "text/plain", b"not found\n"
                elif method not in (b"GET", b"HEAD"):
                    status, ctype, body = 405, "text/plain", b"method not allowed\n"
                else:
                    status, ctype, body = route()
                    if method == b"HEAD":
                        body = b""
            head_out = (f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
                        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n")
            writer.write(head_out.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # a broken route must not take the service down
            log.exception("status server route failed")
        finally:
            writer.close()
