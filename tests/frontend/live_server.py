"""Runs an ASGI app under real uvicorn (httptools) on 127.0.0.1 in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from turnout.testing.deployment import wait_for


class LiveServer:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server = uvicorn.Server(uvicorn.Config(
            app, http="httptools", loop="none", lifespan="on", access_log=False,
            log_level="warning"))
        self._thread = threading.Thread(target=self._run, name="uvicorn", daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        self.loop.close()

    def start(self, timeout: float = 10.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the server's loop thread (for poking the fake upstream)."""
        assert self.loop is not None
        done = threading.Event()
        box: list[Any] = []
        self.loop.call_soon_threadsafe(lambda: (box.append(fn(*args)), done.set()))
        if not done.wait(5):
            raise TimeoutError("server loop did not run the call")
        return box[0]


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> Any:
    return wait_for(predicate, timeout, "the condition", interval)
