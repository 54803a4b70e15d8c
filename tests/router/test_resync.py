"""KV resync against a real worker process: a lost stretch of KV events (a gap in sequence
numbers) makes the router ask for a full dump, after which its index equals the worker's state.

The router runs in this process (its own thread and event loop) so the test can read its index;
the worker and the frontend are real processes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
import zmq

from common.messages import (
    KIND_KV_DUMP,
    TOPIC_KV,
    KvBlockStored,
    KvDumpRequest,
    encoder,
    envelope_decoder,
    kv_batch_decoder,
)
from services.router.args import RouterConfig
from services.router.main import Router
from turnout.testing.deployment import Deployment, scrape, wait_for

pytestmark = pytest.mark.e2e


def worker_state(dep: Deployment, record: dict) -> set[int]:
    """The worker's own account of its cache: ask it for a dump and read it off its PUB."""
    ctx = zmq.Context()
    sub = dep.fleet_socket(ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_KV)
    sub.connect(record["endpoints"]["events"])
    req = dep.fleet_socket(ctx, zmq.DEALER)
    req.connect(record["endpoints"]["request"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            req.send_multipart([KIND_KV_DUMP, encoder.encode(KvDumpRequest("test"))])
            if sub.poll(200):
                while sub.poll(200):
                    _, raw = sub.recv_multipart()
                    batch = kv_batch_decoder.decode(envelope_decoder.decode(raw).payload)
                    if batch.dump:
                        return {h for e in batch.events if isinstance(e, KvBlockStored)
                                for h in e.block_hashes}
        raise TimeoutError("no dump from the worker")
    finally:
        sub.close(0)
        req.close(0)
        ctx.term()


def test_event_gap_triggers_resync_and_index_matches_worker(tmp_path: Path) -> None:
    dep = Deployment(tmp_path)
    router = Router(RouterConfig(discovery=f"file:{dep.discovery}", lease_ttl_s=2,
                                 router_mode="kv", keys_dir=str(dep.keys_dir or "")))
    thread = threading.Thread(target=lambda: asyncio.run(router.run(install_signals=False)),
                              daemon=True)
    thread.start()
    try:
        dep.start_worker("--speedup-ratio", "0")
        dep.start_frontend()
        dep.wait_healthy()
        record = dep.record("w1")
        assert record is not None

        def complete(prompt: str) -> None:
            r = httpx.post(dep.url + "/v1/completions", timeout=30,
                           json={"model": "mock", "prompt": prompt, "max_tokens": 70})
            assert r.status_code == 200, r.text

        def index_matches() -> bool:
            assert router.kv_index is not None
            return router.kv_index.blocks_of("w1") == worker_state(dep, record)

        def router_metric(name: str) -> float:
            """From the router's own /metrics, as any scraper reads it."""
            rec = next(r for r in dep.records() if r["role"] == "router")
            return scrape(rec["endpoints"]["metrics"]).value(name)

        complete("first document " * 30)
        wait_for(index_matches, 10, "the index to follow the worker's events", interval=0.2)
        resyncs = router_metric("turnout_router_kv_resyncs_total")

        def on_router_loop(option: int, value: bytes) -> None:
            """Set a socket option of the router's subscriber on its own loop; returns once
            it is set."""
            done = threading.Event()

            def apply() -> None:
                router.subscriber.socket.setsockopt(option, value)
                done.set()

            router.loop.call_soon_threadsafe(apply)
            assert done.wait(5), "the router's loop did not run the change"

        # Lose a stretch of KV events (heartbeats still flow): the router stops listening to
        # the kv topic while the worker caches more. The unsubscription reaches the worker's
        # PUB socket asynchronously: send new documents until one's events were lost.
        on_router_loop(zmq.UNSUBSCRIBE, TOPIC_KV)
        n = 0

        def lost_some() -> bool:
            nonlocal n
            n += 1
            complete(f"document {n}, never seen by the router " * 10)
            assert router.kv_index is not None
            return router.kv_index.blocks_of("w1") != worker_state(dep, record)

        wait_for(lost_some, 10, "the router to miss a document's KV events", interval=0.1)
        on_router_loop(zmq.SUBSCRIBE, TOPIC_KV)

        def resynced() -> bool:
            # The next events arrive with a jump in sequence numbers (once the subscription
            # is back at the publisher).
            nonlocal n
            n += 1
            complete(f"later document {n} " * 30)
            return router_metric("turnout_router_kv_resyncs_total") > resyncs

        wait_for(resynced, 10, "a resync", interval=0.1)
        wait_for(index_matches, 10, "the index to equal the worker's state", interval=0.2)
        assert router_metric("turnout_router_event_gaps_total") >= 1
    finally:
        dep.close()
        if getattr(router, "loop", None) is not None:
            router.loop.call_soon_threadsafe(router.service.request_stop)
        thread.join(timeout=10)

