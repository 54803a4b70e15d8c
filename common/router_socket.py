"""The request plane's listening end (a ROUTER): what frontends connect to on a router, and
routers (and peer workers) on a worker.

On plain planes it is `ZmtpServer` (ZeroMQ's protocol on the loop, no I/O thread); on a context
with fleet keys a libzmq CURVE ROUTER read through `LoopSocket`. Either way messages arrive as
`[routing id, *frames]` and go out the same way. Owns choosing and binding the backend and
handing its send calls to callers; does not own what the messages mean.
"""

from __future__ import annotations

import zmq

from common.loop_socket import LoopSocket, MessageHandler
from common.transport import advertised_endpoint, bind_socket, fleet_keys, tune_stream_socket
from common.zmtp import ZmtpServer


class RouterSocket:
    """Constructed unbound (so services can hand it to their parts early); `bind()` picks the
    backend by `ctx` (secured: CURVE) and listens. Messages are delivered from `start()` (or
    `run()`) on; those that arrive after `bind()` and before wait. Sending before `bind()` is
    an error."""

    def __init__(self, ctx: zmq.Context, on_message: MessageHandler) -> None:
        self.ctx = ctx
        self._on_message = on_message
        self._backend: ZmtpServer | LoopSocket | None = None

    async def bind(self, host: str, port: int, advertise_host: str | None = None) -> str:
        """Listen on host:port (0: any free port); the endpoint peers should connect to."""
        if self._backend is not None:
            raise RuntimeError("already bound")
        if fleet_keys(self.ctx) is not None:
            socket = self.ctx.socket(zmq.ROUTER, socket_class=zmq.Socket)
            tune_stream_socket(socket)
            endpoint = bind_socket(socket, host, port, advertise_host)
            backend: ZmtpServer | LoopSocket = LoopSocket(socket, self._on_message)
        else:
            backend = ZmtpServer(self._on_message)
            endpoint = advertised_endpoint(host, await backend.bind(host, port), advertise_host)
        self._backend = backend
        # The hot path calls the backend's own methods, not a forwarding one.
        self.send_multipart = backend.send_multipart  # type: ignore[method-assign]
        return endpoint

    def send_multipart(self, frames: list[bytes]) -> None:
        raise RuntimeError("RouterSocket: bind() first")

    @property
    def closed(self) -> bool:
        return self._backend is None or bool(self._backend.closed)

    def start(self) -> None:
        if self._backend is None:
            raise RuntimeError("RouterSocket: bind() first")
        self._backend.start()

    async def run(self) -> None:
        """Deliver messages until `close()`; raise what the handler raised. Cancelling stops
        the reading (sends still go out until `close()`)."""
        if self._backend is None:
            raise RuntimeError("RouterSocket: bind() first")
        await self._backend.run()

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
