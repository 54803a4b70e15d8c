"""The routers a worker serves: which are alive, and handing a live request to another router.

Routers ping their workers every heartbeat period over the request plane. A ROUTER socket does
not say which peer's connection dropped, so a router that pinged and has been silent
`timeout_s` is gone (killed or hung): the requests it sent are cancelled (with an error frame to
it, should it only have been slow: it then migrates them), instead of generating for nobody.

When a router is lost, its frontends resume each stream through another router, which usually
places it back here (`previous_worker`). If the request is still running here, the new router
takes it over without a recompute: replies go to the new router from now on, starting with the
tokens generated since those the frontend already had (they went to the lost router). For that
the worker keeps each running request's generated tokens.

Owns the per-router clocks, the token history and the handover decision. Does not own the
sockets or the engine (`main.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common.messages import GenerateRequest, TokenChunk


class RouterWatch:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.heard: dict[bytes, float] = {}  # identity of a router that pings → last frame
        self.generated: dict[str, list[int]] = {}  # request id → every token generated so far

    # -- router liveness -----------------------------------------------------------------------

    def on_ping(self, ident: bytes) -> None:
        self.heard[ident] = self.clock()

    def on_frame(self, ident: bytes) -> None:
        if ident in self.heard:
            self.heard[ident] = self.clock()

    def lost(self) -> list[bytes]:
        """Routers silent past the timeout, forgotten as they are returned (call it only when
        this worker itself ran on time)."""
        now = self.clock()
        gone = [i for i, t in self.heard.items() if now - t > self.timeout_s]
        for ident in gone:
            del self.heard[ident]
        return gone

    def pause(self) -> None:
        now = self.clock()
        for ident in self.heard:
            self.heard[ident] = now

    # -- token history and handover ------------------------------------------------------------

    def admitted(self, request: GenerateRequest) -> None:
        self.generated[request.request_id] = list(request.generated_token_ids)

    def on_chunk(self, chunk: TokenChunk) -> None:
        if chunk.finish_reason is not None:
            self.generated.pop(chunk.request_id, None)
        elif chunk.token_ids:
            history = self.generated.get(chunk.request_id)
            if history is not None:
                history.extend(chunk.token_ids)

    def forget(self, request_id: str) -> None:
        self.generated.pop(request_id, None)

    def handover(self, request: GenerateRequest) -> list[int] | None:
        """`request` resumes a stream this worker is running: the tokens the new router must be
        sent first (possibly none); None when what the frontend has is not what this worker
        generated (the old run must go, and the request starts afresh)."""
        history = self.generated.get(request.request_id)
        have = request.generated_token_ids
        if history is None or len(have) > len(history) or history[:len(have)] != have:
            return None
        return history[len(have):]
