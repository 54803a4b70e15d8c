"""Host-memory KV tier: copies of peers' blocks kept so a request survives its worker.

With `--kv-replicas N` every worker streams its newly completed blocks to N peers, which keep
them here (bounded, least recently used out first). When the owner dies, the worker that
resumes one of its requests promotes the blocks it finds here into its engine's cache, or serves
them to whichever worker asks. For the mocker an entry is the block's identity (hash, parent,
token ids); an engine with real KV would carry the bytes alongside.
"""

from __future__ import annotations

from collections import OrderedDict

from common.messages import KvBlockStored


class HostKvTier:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, KvBlockStored] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def put(self, events: list[KvBlockStored]) -> None:
        """Store stored-block events (one or many blocks each) as single-block entries."""
        blocks = self._blocks
        for event in events:
            bs = event.block_size
            parent = event.parent_hash
            for i, h in enumerate(event.block_hashes):
                if h in blocks:
                    blocks.move_to_end(h)
                else:
                    blocks[h] = KvBlockStored([h], parent, event.token_ids[i * bs:(i + 1) * bs],
                                              bs)
                parent = h
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
            self.evicted += 1

    def chain(self, hashes: list[int]) -> list[KvBlockStored]:
        """The entries for the leading run of `hashes` held here (stops at the first miss)."""
        out = []
        for h in hashes:
            entry = self._blocks.get(h)
            if entry is None:
                break
            self._blocks.move_to_end(h)
            out.append(entry)
        return out

    def get(self, hashes: list[int]) -> list[KvBlockStored]:
        """Every entry among `hashes` held here, in order (gaps skipped)."""
        return [e for h in hashes if (e := self._blocks.get(h)) is not None]
