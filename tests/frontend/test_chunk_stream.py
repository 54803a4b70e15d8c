"""ChunkStream: whatever piled up comes out as one batch, or a fixed number of tokens at a time
(split where the count falls, the finish with the last tokens)."""

from __future__ import annotations

import asyncio

from common.messages import FINISH_LENGTH, TokenChunk
from services.frontend.upstream import ChunkStream


def ids(batch: list[TokenChunk]) -> list[int]:
    return [t for c in batch for t in c.token_ids]


def test_everything_that_piled_up_comes_as_one_batch() -> None:
    async def main() -> None:
        stream = ChunkStream("r")
        stream.push(TokenChunk("r", [1], num_prompt_tokens=5))
        stream.push(TokenChunk("r", [2, 3]))
        assert ids(await stream.next_batch()) == [1, 2, 3]
        waiting = asyncio.create_task(stream.next_batch())
        await asyncio.sleep(0)
        assert not waiting.done()  # nothing pending: it waits
        stream.push(TokenChunk("r", [4], FINISH_LENGTH))
        last = await asyncio.wait_for(waiting, 1)
        assert ids(last) == [4] and last[-1].finish_reason == FINISH_LENGTH
        assert await stream.next_batch() == []

    asyncio.run(main())


def test_a_fixed_number_of_tokens_per_batch_splits_chunks_and_waits_for_the_rest() -> None:
    async def main() -> None:
        stream = ChunkStream("r")
        stream.push(TokenChunk("r", [1, 2, 3], num_prompt_tokens=5, cached_tokens=2))
        stream.push(TokenChunk("r", [4, 5]))
        first = await stream.next_batch(2)
        assert ids(first) == [1, 2]
        assert (first[0].num_prompt_tokens, first[0].cached_tokens) == (5, 2)
        second = await stream.next_batch(2)
        assert ids(second) == [3, 4]
        assert all(c.num_prompt_tokens == 0 for c in second)  # counted once, with the head
        waiting = asyncio.create_task(stream.next_batch(2))
        await asyncio.sleep(0)
        assert not waiting.done()  # one token is not two
        stream.push(TokenChunk("r", [6]))
        assert ids(await asyncio.wait_for(waiting, 1)) == [5, 6]
        stream.push(TokenChunk("r", [7, 8, 9], FINISH_LENGTH))
        assert [(ids([c]), c.finish_reason) for c in await stream.next_batch(2)] == [
            ([7, 8], None)]
        last = await stream.next_batch(2)  # the end of the stream: fewer, with the finish
        assert ids(last) == [9] and last[-1].finish_reason == FINISH_LENGTH
        assert stream.finished and await stream.next_batch(2) == []

    asyncio.run(main())


def test_one_token_per_batch_gives_every_token_its_own_batch() -> None:
    async def main() -> None:
        stream = ChunkStream("r")
        for t in range(1, 5):
            stream.push(TokenChunk("r", [t], FINISH_LENGTH if t == 4 else None))
        batches = []
        while batch := await stream.next_batch(1):
            batches.append(ids(batch))
        assert batches == [[1], [2], [3], [4]]

    asyncio.run(main())
