"""An in-process stand-in for the router side, for frontend tests only.

`FakeUpstream` implements the `Upstream` protocol: it serves a configurable list of models and
answers every request with a `Script` (the token ids to generate, how to cut them into chunks,
delays, an optional error), records what it was asked to open and cancel, and stops producing
when cancelled. Production code never imports this.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from common.messages import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, GenerateRequest, TokenChunk
from services.frontend.upstream import ChunkStream, NoWorkersError


@dataclasses.dataclass
class Script:
    reply: list[int]  # tokens generated (cut at max_tokens → finish "length", else "stop")
    chunk_size: int = 1
    delay_s: float = 0.0  # between chunks; 0 with burst=True pushes everything inside open()
    burst: bool = False
    cached_tokens: int = 0
    error_at_chunk: int | None = None  # index of the chunk replaced by an error chunk
    error_code: int = 500
    error_message: str = "engine exploded"
    stop_token: int | None = None  # appended (finish "stop") when the reply fits
    failing_request: int | None = None  # error_at_chunk hits only the request opened n-th (0-based)
    opened: int = 0  # requests opened under this script


class FakeUpstream:
    def __init__(self, models: list[str] | None = None, script: Script | None = None) -> None:
        self.models = ["tiny"] if models is None else models
        self.script = script or Script(reply=[])
        self.no_workers = False
        self.max_model_len_by_model: dict[str, int] = {}
        self.opened: list[GenerateRequest] = []
        self.cancelled: list[str] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._lock = threading.Lock()

    # --- Upstream protocol ----------------------------------------------------------------

    def served_models(self) -> list[str]:
        return list(self.models)

    def max_model_len(self, model: str) -> int | None:
        return self.max_model_len_by_model.get(model)

    def open(self, request: GenerateRequest) -> ChunkStream:
        if self.no_workers:
            raise NoWorkersError("fake: no workers")
        with self._lock:
            self.opened.append(request)
        stream = ChunkStream(request.request_id)
        chunks = self._chunks(request)
        if self.script.burst:
            for chunk in chunks:
                stream.push(chunk)
        else:
            self._tasks[request.request_id] = asyncio.get_running_loop().create_task(
                self._produce(stream, chunks))
        return stream

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self.cancelled.append(request_id)
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    # --- script ---------------------------------------------------------------------------

    def _chunks(self, request: GenerateRequest) -> list[TokenChunk]:
        s = self.script
        rid = request.request_id
        limit = request.sampling.max_tokens
        tokens = list(s.reply[:limit])
        finish = FINISH_LENGTH if len(s.reply) >= limit else FINISH_STOP
        if finish == FINISH_STOP and s.stop_token is not None and len(tokens) < limit:
            tokens.append(s.stop_token)
        pieces = [tokens[i:i + s.chunk_size] for i in range(0, len(tokens), s.chunk_size)] or [[]]
        chunks = [TokenChunk(rid, piece) for piece in pieces]
        chunks[0].num_prompt_tokens = len(request.token_ids)
        chunks[0].cached_tokens = s.cached_tokens
        chunks[-1].finish_reason = finish
        nth = s.opened
        s.opened += 1
        fails = s.failing_request is None or s.failing_request == nth
        if fails and s.error_at_chunk is not None and s.error_at_chunk < len(chunks):
            chunks = chunks[: s.error_at_chunk]
            chunks.append(TokenChunk(rid, [], FINISH_ERROR, error_code=s.error_code,
                                     error_message=s.error_message))
        return chunks

    async def _produce(self, stream: ChunkStream, chunks: list[TokenChunk]) -> None:
        for i, chunk in enumerate(chunks):
            if i and self.script.delay_s:
                await asyncio.sleep(self.script.delay_s)
            stream.push(chunk)
        self._tasks.pop(stream.request_id, None)
