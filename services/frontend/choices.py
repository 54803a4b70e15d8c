"""The upstream streams of a request that asks for several completions (`n`, a batch of
prompts): one generation each.

Owns when each opens and when what is left is aborted. The first completion of each prompt
opens at once; the prompt's others once that one has its first token. By then its prompt is
in a worker's prefix cache (and in the routers' KV index), so KV-aware routing can send them
where they skip the prompt's compute, instead of n copies arriving together and each
computing it on whichever worker looked least loaded. `close` aborts every stream still open.
Does not own reading the streams or the response (`app`).
"""

from __future__ import annotations

import asyncio

from common.messages import GenerateRequest
from services.frontend.upstream import ChunkStream, Upstream


class ChoiceStreams:
    def __init__(self, upstream: Upstream, requests: list[GenerateRequest],
                 per_prompt: int) -> None:
        """`requests`: one per completion, a prompt's `per_prompt` completions together."""
        self._upstream = upstream
        self._requests = requests
        self._per_prompt = per_prompt
        self._streams: list[ChunkStream | None] = [None] * len(requests)
        self._first_token = [asyncio.Event() for _ in range(len(requests) // per_prompt)]

    def open_first(self) -> None:
        """Opens the first completion of each prompt; `NoWorkersError` as `Upstream.open` (with
        what it had opened aborted)."""
        try:
            for i in range(0, len(self._requests), self._per_prompt):
                self._streams[i] = self._upstream.open(self._requests[i])
        except BaseException:
            self.close()
            raise

    async def stream(self, index: int) -> ChunkStream:
        """Completion `index`'s stream, opened once its prompt's first completion has its first
        token; `NoWorkersError` when no worker is left to open it on."""
        stream = self._streams[index]
        if stream is None:
            await self._first_token[index // self._per_prompt].wait()
            stream = self._streams[index] = self._upstream.open(self._requests[index])
        return stream

    def started(self, index: int) -> None:
        """Completion `index` has its first token: its prompt's others may open."""
        if index % self._per_prompt == 0:
            self._first_token[index // self._per_prompt].set()

    def close(self) -> None:
        """Aborts upstream every stream opened and not read to its end (call it once nothing
        can open more: the readers that call `stream` cancelled)."""
        for request, stream in zip(self._requests, self._streams, strict=True):
            if stream is not None and not stream.finished:
                self._upstream.cancel(request.request_id)
