"""Fakes for the router's unit tests: a clock, sockets that record what is sent, worker
handles, and a router wired from them (no processes, no network)."""

from __future__ import annotations

import asyncio
from typing import Any

from common.messages import (
    KIND_TOKENS,
    GenerateRequest,
    Instance,
    SamplingParams,
    TokenChunk,
    token_batch_decoder,
)
from services.router.accounting import Accounting
from services.router.metrics import RouterMetrics
from services.router.migration import Migration
from services.router.policies import Policy
from services.router.selection import Selector
from services.router.streams import Streams, send_error
from services.router.worker_pool import WorkerHandle, WorkerPool

MODEL = "m"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SocketDone(Exception):
    """A fake source ran out of things to hand out (ends the loop under test)."""


class FakeSocket:
    """Records every multipart message sent."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.closed = False

    def send_multipart(self, frames: list[bytes]) -> None:
        self.sent.append(list(frames))

    def close(self) -> None:
        self.closed = True

    def kinds(self) -> list[bytes]:
        return [f[0] for f in self.sent]


def worker(worker_id: str, block_size: int = 4, model: str = MODEL, started: float = 1.0,
           **endpoints: str) -> WorkerHandle:
    instance = Instance(id=worker_id, role="worker", model=model, endpoints={
        "request": f"tcp://{worker_id}:1", **endpoints},
        metadata={"block_size": block_size, "started": started})
    return WorkerHandle(instance, FakeDealer(instance.endpoints["request"]))  # type: ignore[arg-type]


def sent(handle: WorkerHandle) -> list[list[bytes]]:
    return handle.socket.sent  # type: ignore[attr-defined, no-any-return]


def request(rid: str = "r1", tokens: int = 8, model: str = MODEL, target: str | None = None,
            generated: int = 0) -> GenerateRequest:
    return GenerateRequest(rid, model, list(range(100, 100 + tokens)),
                           SamplingParams(max_tokens=16), target,
                           list(range(500, 500 + generated)))


def pool_of(*handles: WorkerHandle) -> WorkerPool:
    pool = WorkerPool(None, lambda worker, frames: None)  # type: ignore[arg-type]
    for h in handles:
        pool.workers[h.id] = h
    return pool


def counter(metric: Any, *labels: str) -> float:
    """The value of a prometheus counter/gauge (with `labels`)."""
    child = metric.labels(*labels) if labels else metric
    return float(child._value.get())


def histogram_count(metric: Any) -> float:
    return sum(b.get() for b in metric._buckets)


def frontend_chunks(frames: list[bytes]) -> tuple[bytes, list[TokenChunk]]:
    """(frontend identity, chunks) of one frame sent to a frontend."""
    ident, kind, payload = frames
    assert kind == KIND_TOKENS
    return ident, token_batch_decoder.decode(payload).chunks


class Wiring:
    """Selection, accounting, migration and streams over fakes, as `Router` wires them."""

    def __init__(self, policy: Policy, *handles: WorkerHandle, limit: int = 3,
                 wait_s: float = 2.0, kv_index: Any = None, approx_index: Any = None) -> None:
        self.clock = FakeClock()
        self.pool = pool_of(*handles)
        self.metrics = RouterMetrics("test-router")
        self.frontends = FakeSocket()
        self.accounting = Accounting(self.clock)
        self.selector = Selector(self.pool, policy, self.metrics, approx_index,
                                 clock=self.clock)
        self.migration = Migration(
            self.pool, self.accounting, self.selector, self.metrics,
            lambda *a: send_error(self.frontends, *a), kv_index, limit, wait_s, self.clock)
        self.streams = Streams(self.frontends, self.pool, self.selector, self.accounting,
                               self.migration, self.metrics, wait_s, self.clock)

    def errors(self) -> list[tuple[bytes, str, int, str]]:
        """Error frames sent to frontends: (frontend, request id, code, message)."""
        out = []
        for frames in self.frontends.sent:
            ident, chunks = frontend_chunks(frames)
            out += [(ident, c.request_id, c.error_code, c.error_message) for c in chunks
                    if c.error_code]
        return out



class FakeDealer:
    """A worker connection (what `MonitoredDealer` is to the router): `socket` records what is
    sent; `wait_lost` returns once the test sets `lost` (the connection dropped)."""

    def __init__(self, endpoint: str = "") -> None:
        self.endpoint = endpoint
        self.socket = FakeSocket()
        self.lost = asyncio.Event()

    async def wait_lost(self) -> None:
        await self.lost.wait()

    def close(self) -> None:
        self.socket.close()
