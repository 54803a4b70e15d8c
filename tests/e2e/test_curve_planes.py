"""CURVE on the planes, against real processes: with fleet keys, a process without them cannot
get a request, steer the router's KV index, or hear anything from a router or worker; the
fleet itself serves as before (through the openai SDK)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import openai
import pytest
import zmq

from common.fleet_keys import generate
from common.messages import (
    KIND_GENERATE,
    KIND_PING,
    KIND_PONG,
    TOPIC_HEARTBEAT,
    TOPIC_KV,
    EventEnvelope,
    GenerateRequest,
    Heartbeat,
    KvBlockStored,
    KvEventBatch,
    SamplingParams,
    encoder,
)
from turnout.testing.deployment import ROOT, Deployment, reaped, wait_for

pytestmark = pytest.mark.e2e

FAST = ("--speedup-ratio", "0")
APPLIED = "turnout_router_kv_events_applied_total"


@pytest.fixture
def curve_deployment(tmp_path: Path) -> Iterator[Deployment]:
    yield from reaped(Deployment(tmp_path, curve=True))


def client(dep: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=dep.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def drain(sock: zmq.Socket) -> list[list[bytes]]:
    got = []
    while True:
        try:
            got.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return got


def register(dep: Deployment, record: dict[str, object]) -> None:
    """Write a discovery record as any process that can write the directory could."""
    (dep.discovery / f"{record['id']}.json").write_text(json.dumps(record))


class RoguePublisher:
    """A PUB socket that claims to be a worker's event plane and says it holds many blocks."""

    def __init__(self, ctx: zmq.Context, worker_id: str, curve: bool) -> None:
        self.worker_id = worker_id
        self.socket = ctx.socket(zmq.PUB)
        if curve:  # a CURVE server with a key pair of its own
            self.socket.curve_server = True
            self.socket.curve_secretkey = zmq.curve_keypair()[1]
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.sequence = 0

    def publish(self) -> None:
        self.sequence += 1
        stored = KvEventBatch(self.worker_id, [KvBlockStored(
            [self.sequence * 1000 + i for i in range(16)], None, list(range(16 * 16)), 16)])
        for topic, body in ((TOPIC_HEARTBEAT, Heartbeat(self.worker_id, self.sequence, 0)),
                            (TOPIC_KV, stored)):
            self.socket.send_multipart([topic, encoder.encode(EventEnvelope(
                self.worker_id, self.sequence, time.time(),
                msgspec.Raw(encoder.encode(body))))])


def test_rogue_worker_publisher_and_dealer_get_nothing_fleet_serves(
        curve_deployment: Deployment) -> None:
    dep = curve_deployment
    dep.start(workers=1, worker_args=FAST)
    oai = client(dep)
    router = next(r for r in dep.records() if r["role"] == "router")
    worker = dep.record("w1")
    assert worker is not None
    fleet_key = worker["metadata"]["curve_key"]
    assert router["metadata"]["curve_key"] == fleet_key  # every record says its key
    ctx = zmq.Context()
    try:
        # Rogue workers for the same model: one advertises no key, one a key of its own, and
        # one copies the fleet's public key from a record (it has no secret to prove it).
        rogues: list[tuple[zmq.Socket, RoguePublisher]] = []
        for name, advertised in (("rogue-nokey", None), ("rogue-ownkey", "own"),
                                 ("rogue-copykey", fleet_key)):
            sock = ctx.socket(zmq.ROUTER)
            if advertised is not None:
                public, secret = zmq.curve_keypair()
                sock.curve_server = True
                sock.curve_secretkey = secret
                advertised = public.decode() if advertised == "own" else advertised
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            pub = RoguePublisher(ctx, name, advertised is not None)
            metadata: dict[str, object] = {"started": time.time(), "mode": "aggregated",
                                           "block_size": 16}
            if advertised is not None:
                metadata["curve_key"] = advertised
            register(dep, {"id": name, "role": "worker", "model": "mock",
                           "endpoints": {"request": f"tcp://127.0.0.1:{port}",
                                         "events": pub.endpoint},
                           "metadata": metadata})
            rogues.append((sock, pub))
        # Requests while the rogues are listed (and publishing, each a heartbeat and 16 KV
        # blocks a round): all served by w1, none reaches a rogue, no rogue event is applied.
        deadline = time.monotonic() + 60
        for i in range(12):
            for _, pub in rogues:
                pub.publish()
            out = oai.completions.create(model="mock", prompt=f"request {i}", max_tokens=4)
            assert out.usage is not None and out.usage.completion_tokens == 4
            assert time.monotonic() < deadline
        for sock, _ in rogues:
            assert drain(sock) == []
        router_metrics = dep.metrics_of(router["id"])
        # Only w1's own blocks were indexed: a rogue batch alone would add 16 per round.
        w1_metrics = dep.metrics_of("w1")
        assert w1_metrics.value("turnout_worker_prompt_tokens_total") > 0
        assert router_metrics.value(APPLIED) <= 12 * 2  # w1: stored (+ removed) per request
        assert router_metrics.value("turnout_router_kv_index_blocks") <= 12 * 4

        # A rogue DEALER, plain or with a key pair of its own (knowing the fleet public key),
        # asks the router and the worker for a generation and a ping: no answer comes.
        request = encoder.encode(GenerateRequest("rogue-1", "mock", [1, 2, 3],
                                                 SamplingParams(max_tokens=4)))
        dealers = []
        for endpoint in (router["endpoints"]["request"], worker["endpoints"]["request"]):
            for keyed in (False, True):
                sock = ctx.socket(zmq.DEALER)
                if keyed:
                    public, secret = zmq.curve_keypair()
                    sock.curve_serverkey = fleet_key.encode()
                    sock.curve_publickey, sock.curve_secretkey = public, secret
                sock.connect(endpoint)
                sock.send_multipart([KIND_GENERATE, request])
                sock.send_multipart([KIND_PING, b""])
                dealers.append(sock)
        poller = zmq.Poller()
        for sock in dealers:
            poller.register(sock, zmq.POLLIN)
        assert poller.poll(2000) == []
        assert all(drain(sock) == [] for sock in dealers)
        # Still serving, and the router never let the rogues in.
        out = oai.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "still here?"}], max_tokens=3)
        assert out.usage is not None and out.usage.completion_tokens == 3
        assert all(s.alive() for s in dep.services)
        assert "worker not admitted: its record has no fleet CURVE key" in dep.router.output()
        # `turnout status` hears the fleet's event plane with the keys, and only with them.
        for keys, health in ((str(dep.keys_dir), "alive"), ("", None)):
            out = subprocess.run(
                [sys.executable, "-m", "turnout", "status", "--discovery", f"file:{dep.discovery}",
                 "--json", "--keys-dir", keys], capture_output=True, text=True, cwd=ROOT,
                timeout=30, check=True)
            w1 = next(w for w in json.loads(out.stdout)["workers"] if w["id"] == "w1")
            assert (w1["health"] == "alive") == (health == "alive"), w1
    finally:
        ctx.destroy(linger=0)


def test_without_keys_the_same_rogue_publisher_steers_the_index(tmp_path: Path) -> None:
    """The control: the rogue above does reach a router that runs without keys (so the test
    above fails if CURVE stops being applied)."""
    with Deployment(tmp_path, curve=False) as dep:
        router = dep.start_router()
        record = dep.wait_registered(router)
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.ROUTER)
            port = sock.bind_to_random_port("tcp://127.0.0.1")
            pub = RoguePublisher(ctx, "rogue", False)
            register(dep, {"id": "rogue", "role": "worker", "model": "mock",
                           "endpoints": {"request": f"tcp://127.0.0.1:{port}",
                                         "events": pub.endpoint},
                           "metadata": {"started": time.time(), "block_size": 16}})
            deadline = time.monotonic() + 30
            applied = 0.0
            while time.monotonic() < deadline and applied == 0:
                pub.publish()
                time.sleep(0.05)
                applied = dep.metrics_of(record["id"]).value(APPLIED)
            assert applied > 0
        finally:
            ctx.destroy(linger=0)


def test_an_empty_keys_dir_runs_plain_a_partial_one_refuses_to_start(tmp_path: Path) -> None:
    """What a pod sees with k8s/'s optional keys Secret: absent, the mount is an empty directory
    and the process runs plain (and says so); a directory holding part of the keys is a start-up
    error naming what is missing, never a silent fallback to plain."""
    empty = tmp_path / "empty-mount"
    (empty / "..data").mkdir(parents=True)  # a Secret volume's own entries are dot-names
    partial = tmp_path / "partial"
    generate(partial)
    (partial / "fleet.key_secret").unlink()
    with Deployment(tmp_path / "dep", curve=False,
                    env=dict(os.environ, TURNOUT_KEYS_DIR=str(empty))) as dep:
        router = dep.start_router()
        record = dep.wait_registered(router)
        assert "curve_key" not in record["metadata"]
        assert "keys directory is empty: the planes run without CURVE" in router.output()
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)  # a plain peer is served: the planes are plain
            sock.connect(record["endpoints"]["request"])
            sock.send_multipart([KIND_PING, b""])
            assert sock.poll(10_000) and sock.recv_multipart()[0] == KIND_PONG
        finally:
            ctx.destroy(linger=0)
        refused = dep.start_router("--keys-dir", str(partial), wait=False, name="refused")
        wait_for(lambda: not refused.alive(), 30, "the router with part of the keys to exit")
        assert refused.returncode == 1
        assert "fleet.key_secret is missing" in refused.output()
        assert refused.record() is None
