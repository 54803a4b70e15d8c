"""Streams that outlive their router: what the frontend keeps of each open stream, and the resume
request that continues it through another router.

The frontend relays every token to its client, so it knows exactly what the client has: the
prompt, every token pushed into the stream, and the worker that produced them (routers name it
on the first chunk; a draining router names it for every stream it gives back, one with no
token yet too). When a router dies, hangs or drains, each of its streams is re-sent to another
router with those tokens as `generated_token_ids` and the worker as `previous_worker`: the new
router places it back on that worker (which hands over the request it still runs, or holds its
KV), and the client sees one unbroken stream. Chunks still arriving from the old router are ignored,
so no token is repeated, and prompt/cached counts are only taken from the first chunk, so usage
stays right.

Owns the per-stream record and the resume request. Does not own sockets, router choice or the
liveness of routers (`upstream.py`).
"""

from __future__ import annotations

import msgspec

from common.messages import GenerateRequest, TokenChunk


class OpenStream:
    """One stream in flight through a router."""

    __slots__ = ("gap_from", "request", "resumes", "router", "started", "stream", "tokens",
                 "worker")

    def __init__(self, stream: object, request: GenerateRequest, router: str) -> None:
        self.stream = stream  # the ChunkStream the HTTP handler reads
        self.request = request
        self.router = router  # id of the router carrying it now
        self.tokens: list[int] = []  # every token pushed to the client so far
        self.worker = ""  # the worker producing it (as the router last said)
        self.started = False  # the first chunk (with prompt and cached counts) went through
        self.resumes = 0
        # Resumed and waiting for its next token: when the old router was last heard from
        # (the start of the gap the client sees); 0.0 otherwise.
        self.gap_from = 0.0

    def accept(self, chunk: TokenChunk, router: str) -> bool:
        """Record `chunk` from `router`; False when it must be dropped (a router the stream has
        left: its tokens are, or will be, resent by the new one)."""
        if router != self.router:
            return False
        if chunk.worker_id:
            self.worker = chunk.worker_id
        if self.started:
            chunk.num_prompt_tokens = 0  # the client has them from the first chunk
            chunk.cached_tokens = 0
        else:
            self.started = True
        if chunk.token_ids:
            self.tokens.extend(chunk.token_ids)
        return True

    def resume_request(self) -> GenerateRequest:
        """The request that continues this stream after the tokens the client has."""
        return msgspec.structs.replace(
            self.request,
            generated_token_ids=[*self.request.generated_token_ids, *self.tokens],
            previous_worker=self.worker, resumed=True)

    def move_to(self, router: str, last_heard: float) -> None:
        self.router = router
        self.resumes += 1
        self.gap_from = last_heard
