"""vLLM's KV cache events, turned into Turnout's: the feed the router's index is built from.

vLLM publishes `[topic, sequence (8 bytes, big-endian), MessagePack batch]` on a ZeroMQ PUB
socket; a batch is `[timestamp, events, dp_rank]` and each event a map tagged by `type`
(`BlockStored` with the block hashes, the parent's hash and every token of the new blocks;
`BlockRemoved`; `AllBlocksCleared`). Older vLLM and SGLang send the same events as positional
arrays led by the tag, so both forms are read. Missed sequences are asked for again on the
publisher's replay (ROUTER) socket. TensorRT-LLM's events (Python dicts) are converted into the
same event structs by its adapter and go through the same translator.

vLLM's block hashes are its own (a different hash function and seed), so the stored blocks are
re-hashed from their token ids with `common.block_hash`, chained from the translated parent: the
router computes exactly these ids from a request's tokens. A map from vLLM's hash to ours
translates parents and removals; it also answers `kv_dump` and `cached_prefix` for the engine.

Owns decoding, re-hashing and the subscription. Does not own vLLM's configuration (the engine
enables the publisher) or what happens to the translated events (the worker publishes them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import msgspec
import zmq
import zmq.asyncio

from common.block_hash import block_hash, root_hash
from common.malformed import MALFORMED
from common.messages import KvBlockRemoved, KvBlockStored, KvCleared, KvEvent

log = logging.getLogger("turnout.worker.vllm")

VllmHash = int | bytes  # ints with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES (the default), else bytes
# The device cache; an offloading connector reports its tiers ("CPU", "STORAGE") too.
_DEVICE_MEDIA: Final = (None, "GPU")
_END_SEQ: Final = (-1).to_bytes(8, "big", signed=True)
REPLAY_TIMEOUT_S: Final = 2.0


class VllmBlockStored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[VllmHash]
    parent_block_hash: VllmHash | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    group_idx: int | None = None
    # Per block: what else vLLM hashed into it (LoRA name, (image uuid, offset), salt, digest).
    extra_keys: list[Any] | None = None
    lora_name: str | None = None


class VllmBlockRemoved(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[VllmHash]
    medium: str | None = None
    group_idx: int | None = None


class VllmAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


VllmEvent = VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared


class _PositionalStored(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: list[VllmHash]
    parent_block_hash: VllmHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class _PositionalRemoved(msgspec.Struct, array_like=True, tag="BlockRemoved"):
    block_hashes: list[VllmHash]
    medium: str | None = None


class _PositionalCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


class VllmEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]  # decoded one by one: an event type we do not know is skipped
    data_parallel_rank: int | None = None


_batch_decoder: Final = msgspec.msgpack.Decoder(VllmEventBatch)
_event_decoder: Final = msgspec.msgpack.Decoder(VllmEvent)
_positional_decoder: Final = msgspec.msgpack.Decoder(
    _PositionalStored | _PositionalRemoved | _PositionalCleared)


def _is_array(raw: bytes) -> bool:
    first = raw[0] if raw else 0
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def _decode_event(raw: bytes) -> VllmEvent:
    if not _is_array(raw):
        return _event_decoder.decode(raw)
    event = _positional_decoder.decode(raw)
    if type(event) is _PositionalStored:
        return VllmBlockStored(event.block_hashes, event.parent_block_hash, event.token_ids,
                               event.block_size, event.medium)
    if type(event) is _PositionalRemoved:
        return VllmBlockRemoved(event.block_hashes, event.medium)
    return VllmAllBlocksCleared()


def decode_batch(payload: bytes) -> list[VllmEvent]:
    """The events of one published batch (unknown event types left out)."""
    out: list[VllmEvent] = []
    for raw in _batch_decoder.decode(payload).events:
        try:
            out.append(_decode_event(bytes(raw)))
        except msgspec.ValidationError:
            continue
    return out


class _Block:
    __slots__ = ("parent", "refs", "tokens")

    def __init__(self, parent: int | None, tokens: list[int]) -> None:
        self.parent = parent
        self.tokens = tokens
        self.refs = 0  # vLLM blocks carrying this content (extra keys such as LoRA can differ)


def _cache_salt(keys: Any, lora_name: str | None) -> str:
    """A first block's `cache_salt` from its extra keys: vLLM publishes them untagged, the
    LoRA name first, then image pairs, then the salt, the one string besides the LoRA name."""
    if not isinstance(keys, (list, tuple)):
        return ""
    found = [k for k in keys if isinstance(k, str)]
    if lora_name is not None and found and found[0] == lora_name:
        found = found[1:]
    return found[-1] if found else ""


class KvEventTranslator:
    """vLLM block events in, Turnout block events out; remembers what the cache holds."""

    def __init__(self, block_size: int, seed: int,
                 rekey: Callable[[list[int], Any], list[int]] | None = None) -> None:
        self.block_size = block_size
        # A block's tokens as the request had them, from the block's extra keys (images:
        # `vllm_images.py`); None: vLLM's tokens are the request's.
        self.rekey = rekey
        self.seed = seed
        self.root = root_hash(seed)
        self._ours: dict[VllmHash, int] = {}  # every block vLLM holds → our hash
        self._blocks: dict[int, _Block] = {}  # our hash → content, insertion (parent-first) order
        self.orphans = 0  # stored blocks whose parent we never saw (lost events)

    def __len__(self) -> int:
        return len(self._blocks)

    def translate(self, events: list[VllmEvent]) -> list[KvEvent]:
        out: list[KvEvent] = []
        for event in events:
            if type(event) is VllmBlockStored:
                if event.medium in _DEVICE_MEDIA and not event.group_idx:
                    self._stored(event, out)
            elif type(event) is VllmBlockRemoved:
                if event.medium in _DEVICE_MEDIA and not event.group_idx:
                    self._removed(event.block_hashes, out)
            elif type(event) is VllmAllBlocksCleared:
                self._ours.clear()
                self._blocks.clear()
                out.append(KvCleared())
        return out

    def _stored(self, event: VllmBlockStored, out: list[KvEvent]) -> None:
        bs = event.block_size
        if bs != self.block_size:
            log.error("vLLM block size %d differs from ours %d; event dropped", bs, self.block_size)
            return
        parent: int | None = None
        if event.parent_block_hash is not None:
            parent = self._ours.get(event.parent_block_hash)
            if parent is None:
                self.orphans += 1
                return
        new_hashes: list[int] = []
        new_tokens: list[int] = []
        first_parent = parent
        tokens = event.token_ids
        extra = event.extra_keys if self.rekey is not None else None
        root = self.root
        if parent is None and event.extra_keys:
            salt = _cache_salt(event.extra_keys[0], event.lora_name)
            if salt:
                root = root_hash(self.seed, salt)
        for i, vllm_hash in enumerate(event.block_hashes):
            chunk = tokens[i * bs:(i + 1) * bs]
            if len(chunk) != bs:
                break
            if extra is not None and i < len(extra) and extra[i]:
                chunk = self.rekey(chunk, extra[i])  # type: ignore[misc]
            ours = block_hash(root if parent is None else parent, chunk)
            is_new = False
            if vllm_hash not in self._ours:
                self._ours[vllm_hash] = ours
                block = self._blocks.get(ours)
                if block is None:
                    block = self._blocks[ours] = _Block(parent, chunk)
                    is_new = True
                block.refs += 1
            if is_new:
                if not new_hashes:
                    first_parent = parent
                new_hashes.append(ours)
                new_tokens.extend(chunk)
            elif new_hashes:  # a run of new blocks ended: emit it, each event one chain
                out.append(KvBlockStored(new_hashes, first_parent, new_tokens, bs))
                new_hashes, new_tokens = [], []
            parent = ours
        if new_hashes:
            out.append(KvBlockStored(new_hashes, first_parent, new_tokens, bs))

    def _removed(self, vllm_hashes: list[VllmHash], out: list[KvEvent]) -> None:
        gone: list[int] = []
        for vllm_hash in vllm_hashes:
            ours = self._ours.pop(vllm_hash, None)
            if ours is None:
                continue
            block = self._blocks.get(ours)
            if block is not None:
                block.refs -= 1
                if block.refs <= 0:
                    del self._blocks[ours]
                    gone.append(ours)
        if gone:
            out.append(KvBlockRemoved(gone))

    def dump(self) -> list[KvBlockStored]:
        """Every held block as a single-block stored event, parents before children."""
        out: list[KvBlockStored] = []
        done: set[int] = set()
        blocks = self._blocks
        for h in blocks:
            chain: list[int] = []
            cur: int | None = h
            while cur is not None and cur not in done and cur in blocks:
                chain.append(cur)
                cur = blocks[cur].parent
            for c in reversed(chain):
                done.add(c)
                b = blocks[c]
                out.append(KvBlockStored([c], b.parent, list(b.tokens), self.block_size))
        return out

    def cached_prefix(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n


class KvEventSubscriber:
    """Reads vLLM's publisher in order (asking for replays on gaps) and hands each batch's
    translated events to `deliver`."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, replay_endpoint: str | None,
                 translator: KvEventTranslator,
                 deliver: Callable[[list[KvEvent]], None]) -> None:
        self.translator = translator
        self.deliver = deliver
        self.replay_endpoint = replay_endpoint
        self.ctx = ctx
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)  # never drop here: vLLM's side bounds the queue
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoint)
        self.next_seq = 0
        self.gaps = 0
        self.lost = 0  # batches neither received nor replayed

    async def run(self) -> None:
        while True:
            frames = await self.sub.recv_multipart()
            if len(frames) != 3:
                continue
            seq = int.from_bytes(frames[1], "big")
            if seq < self.next_seq:
                continue  # already applied through a replay
            if seq > self.next_seq:
                self.gaps += 1
                await self._replay(seq)
            self._apply(seq, frames[2])

    def _apply(self, seq: int, payload: bytes) -> None:
        self.next_seq = seq + 1
        try:
            events = self.translator.translate(decode_batch(payload))
        except MALFORMED as exc:
            log.warning("undecodable vLLM KV event batch %d: %s", seq, exc)
            return
        if events:
            self.deliver(events)

    async def _replay(self, upto: int) -> None:
        """Fetch batches next_seq..upto-1 from vLLM's replay buffer; if that fails, start over
        from an empty cache view (the router's index drops this worker's blocks, and prefixes
        get indexed again as vLLM stores them anew)."""
        want = self.next_seq
        if self.replay_endpoint is not None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.replay_endpoint)
            try:
                await sock.send_multipart([b"", want.to_bytes(8, "big")])
                while await sock.poll(REPLAY_TIMEOUT_S * 1000):
                    # [b"", topic, seq, payload] from vLLM, [b"", seq, payload] from SGLang
                    frames = await sock.recv_multipart()
                    if len(frames) not in (3, 4) or frames[-2] == _END_SEQ:
                        break
                    seq = int.from_bytes(frames[-2], "big")
                    if self.next_seq <= seq < upto:
                        self._apply(seq, frames[-1])
            finally:
                sock.close()
        if self.next_seq < upto:
            self.lost += upto - self.next_seq
            log.error("lost vLLM KV event batches %d..%d; resetting the KV index view",
                      self.next_seq, upto - 1)
            self.translator.translate([VllmAllBlocksCleared()])
            self.deliver([KvCleared()])
        self.next_seq = upto

    def close(self) -> None:
        self.sub.close(linger=0)
