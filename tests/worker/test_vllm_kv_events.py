"""vLLM KV event translation and subscription, without vLLM: batches are built the way vLLM's
ZeroMQ publisher frames them (`[topic, seq, msgpack([ts, [maps tagged by "type"], rank])]`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from common.block_hash import DEFAULT_SEED, block_hashes
from common.messages import KvBlockRemoved, KvBlockStored, KvCleared, KvEvent
from services.worker.engines.vllm_kv_events import (
    KvEventSubscriber,
    KvEventTranslator,
    decode_batch,
)

BS = 4
TOKENS = list(range(10, 26))  # four full blocks
OURS = block_hashes(TOKENS, BS, DEFAULT_SEED)


def stored(hashes: list[object], parent: object, tokens: list[int], **extra: object) -> dict:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BS, "lora_id": None, "medium": "GPU",
            "lora_name": None, **extra}


def removed(hashes: list[object], **extra: object) -> dict:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", **extra}


def batch(*events: dict) -> bytes:
    return msgspec.msgpack.encode([1.5, list(events), 0, "a future field"])


class Collected(list[KvEvent]):
    """What a subscriber delivered, with an event to wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    def __call__(self, events: list[KvEvent]) -> None:
        self.extend(events)
        self.arrived.set()

    async def until(self, n: int, within: float = 5) -> None:
        async def wait() -> None:
            while len(self) < n:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(wait(), within)


def translate(t: KvEventTranslator, *events: dict) -> list[KvEvent]:
    return t.translate(decode_batch(batch(*events)))


def test_stored_blocks_are_rehashed_with_turnout_chain() -> None:
    t = KvEventTranslator(BS, DEFAULT_SEED)
    out = translate(t, stored([101, 102], None, TOKENS[:8]), stored([103, 104], 102, TOKENS[8:]))
    assert out == [KvBlockStored(OURS[:2], None, TOKENS[:8], BS),
                   KvBlockStored(OURS[2:], OURS[1], TOKENS[8:], BS)]
    assert t.cached_prefix(OURS) == 4
    assert [e.block_hashes for e in t.dump()] == [[h] for h in OURS]
    assert [e.parent_hash for e in t.dump()] == [None, *OURS[:3]]


@pytest.mark.parametrize("extra", [
    [["tenant-a"], None],  # vLLM untags the salt: a bare string, on the first block only
    [["lora-x", ["image-1", 2], "tenant-a"], None],  # after the LoRA name and image pairs
])
def test_a_salted_first_block_is_hashed_under_its_salt(extra: list[object]) -> None:
    """vLLM hashes a request's `cache_salt` into its first block; the translated chain is the
    one the router computes for the request with that salt."""
    t = KvEventTranslator(BS, DEFAULT_SEED)
    salted = block_hashes(TOKENS, BS, DEFAULT_SEED, salt="tenant-a")
    lora = {"lora_name": "lora-x"} if "lora-x" in extra[0] else {}  # type: ignore[operator]
    out = translate(t, stored([201, 202], None, TOKENS[:8], extra_keys=extra, **lora),
                    stored([203, 204], 202, TOKENS[8:]),
                    stored([101, 102], None, TOKENS[:8]))
    assert out == [KvBlockStored(salted[:2], None, TOKENS[:8], BS),
                   KvBlockStored(salted[2:], salted[1], TOKENS[8:], BS),
                   KvBlockStored(OURS[:2], None, TOKENS[:8], BS)]
    assert t.cached_prefix(salted) == 4 and t.cached_prefix(OURS) == 2
    # A LoRA name alone is no salt.
    t = KvEventTranslator(BS, DEFAULT_SEED)
    assert translate(t, stored([101], None, TOKENS[:4], extra_keys=[["lora-x"]],
                               lora_name="lora-x")) == [
        KvBlockStored(OURS[:1], None, TOKENS[:4], BS)]


def test_byte_hashes_and_unknown_events_and_other_media() -> None:
    t = KvEventTranslator(BS, DEFAULT_SEED)
    out = translate(t, stored([b"\x01" * 32], None, TOKENS[:4]),
                    {"type": "SomethingNew", "x": 1},
                    stored([b"\x02" * 32], b"\x01" * 32, TOKENS[4:8], medium="CPU"),
                    stored([b"\x03" * 32], b"\x01" * 32, TOKENS[4:8], group_idx=1))
    assert out == [KvBlockStored(OURS[:1], None, TOKENS[:4], BS)]  # offload tiers ignored
    assert len(t) == 1


def test_same_content_under_two_vllm_hashes_is_one_block_until_both_go() -> None:
    t = KvEventTranslator(BS, DEFAULT_SEED)
    assert translate(t, stored([1], None, TOKENS[:4])) == [
        KvBlockStored(OURS[:1], None, TOKENS[:4], BS)]
    # e.g. the same tokens under another LoRA/salt: vLLM hash differs, ours does not
    assert translate(t, stored([2], None, TOKENS[:4])) == []
    assert translate(t, removed([1])) == []
    assert translate(t, removed([2])) == [KvBlockRemoved(OURS[:1])]
    assert translate(t, removed([2, 99])) == []  # unknown hashes: nothing


def test_a_known_block_inside_a_stored_run_splits_it_into_chains() -> None:
    t = KvEventTranslator(BS, DEFAULT_SEED)
    translate(t, stored([1], None, TOKENS[:4]), stored([5], 1, TOKENS[4:8]))
    translate(t, removed([1]))  # ours[0] gone, ours[1] still held
    out = translate(t, stored([7, 8, 9], None, TOKENS[:12]))  # re-stored under new hashes
    # ours[1] was still held under vLLM hash 5: events are ours[0], then ours[2] after ours[1]
    assert out == [KvBlockStored(OURS[:1], None, TOKENS[:4], BS),
                   KvBlockStored(OURS[2:3], OURS[1], TOKENS[8:12], BS)]


def test_orphans_and_clear() -> None:
    t = KvEventTranslator(BS, DEFAULT_SEED)
    assert translate(t, stored([5], 4, TOKENS[4:8])) == []  # parent never seen
    assert t.orphans == 1
    translate(t, stored([1], None, TOKENS[:4]))
    assert translate(t, {"type": "AllBlocksCleared"}) == [KvCleared()]
    assert len(t) == 0 and t.dump() == []


def test_block_size_mismatch_is_dropped() -> None:
    t = KvEventTranslator(8, DEFAULT_SEED)
    assert translate(t, stored([1], None, TOKENS[:4])) == []


@pytest.mark.asyncio
async def test_subscriber_replays_a_gap_in_order(tmp_path: Path) -> None:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    replay = ctx.socket(zmq.ROUTER)
    pub_ep, replay_ep = f"ipc://{tmp_path}/kv", f"ipc://{tmp_path}/replay"
    pub.bind(pub_ep)
    replay.bind(replay_ep)
    payloads = [batch(stored([1], None, TOKENS[:4])), batch(stored([2], 1, TOKENS[4:8])),
                batch(stored([3], 2, TOKENS[8:12]))]
    got = Collected()
    sub = KvEventSubscriber(ctx, pub_ep, replay_ep, KvEventTranslator(BS, DEFAULT_SEED), got)
    task = asyncio.create_task(sub.run())

    async def serve_replay() -> None:
        ident, _, start = await replay.recv_multipart()
        first = int.from_bytes(start, "big")
        for seq in range(first, 2):
            await replay.send_multipart([ident, b"", b"kv", seq.to_bytes(8, "big"),
                                         payloads[seq]])
        await replay.send_multipart([ident, b"", b"", (-1).to_bytes(8, "big", signed=True),
                                     b""])

    server = asyncio.create_task(serve_replay())
    try:
        # PUB drops until the SUB has joined: resend seq 0 until it is seen.
        async def first_seen() -> None:
            while not got:
                await pub.send_multipart([b"kv", (0).to_bytes(8, "big"), payloads[0]])
                await asyncio.sleep(0.02)

        await asyncio.wait_for(first_seen(), 5)
        await pub.send_multipart([b"kv", (2).to_bytes(8, "big"), payloads[2]])  # 1 is lost
        await asyncio.wait_for(server, 5)
        await got.until(3)
        assert [e.block_hashes for e in got] == [[OURS[0]], [OURS[1]], [OURS[2]]]
        assert sub.gaps == 1 and sub.lost == 0
    finally:
        task.cancel()
        server.cancel()
        sub.close()
        pub.close(linger=0)
        replay.close(linger=0)
        ctx.term()


@pytest.mark.asyncio
async def test_subscriber_without_replay_resets_the_view(tmp_path: Path) -> None:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub_ep = f"ipc://{tmp_path}/kv"
    pub.bind(pub_ep)
    got = Collected()
    translator = KvEventTranslator(BS, DEFAULT_SEED)
    sub = KvEventSubscriber(ctx, pub_ep, None, translator, got)
    task = asyncio.create_task(sub.run())
    try:
        async def first_seen() -> None:
            while not got:
                await pub.send_multipart([b"kv", (0).to_bytes(8, "big"),
                                          batch(stored([1], None, TOKENS[:4]))])
                await asyncio.sleep(0.02)

        await asyncio.wait_for(first_seen(), 5)
        await pub.send_multipart([b"kv", (5).to_bytes(8, "big"),
                                  batch(stored([9], None, TOKENS[4:8]))])
        await got.until(3)
        assert type(got[1]) is KvCleared
        assert sub.lost == 4 and len(translator) == 1
    finally:
        task.cancel()
        sub.close()
        pub.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("payload", [b"\x00garbage", msgspec.msgpack.encode({"a": 1})])
def test_garbage_batches_raise_decode_errors(payload: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        decode_batch(payload)


def test_positional_events_as_sglang_and_older_vllm_send_them() -> None:
    t = KvEventTranslator(BS, DEFAULT_SEED)
    payload = msgspec.msgpack.encode([2.0, [
        ["BlockStored", [1, 2], None, TOKENS[:8], BS, None],
        ["BlockStored", [3], 2, TOKENS[8:12], BS, None, "GPU"],
        ["BlockRemoved", [3]],
        ["Unknown", 1],
        ["AllBlocksCleared"],
    ]])
    assert t.translate(decode_batch(payload)) == [
        KvBlockStored(OURS[:2], None, TOKENS[:8], BS),
        KvBlockStored(OURS[2:3], OURS[1], TOKENS[8:12], BS),
        KvBlockRemoved(OURS[2:3]),
        KvCleared(),
    ]
