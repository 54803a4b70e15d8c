"""The routers a worker serves: which are alive, and handing a live request to another router.

Routers ping their workers every heartbeat period over the request plane. A ROUTER socket does
not say which peer's connection dropped, so a router that pinged and has been silent
`timeout_s` is gone (killed or hung): the requests it sent are cancelled (with an error frame to
it, should it only have been slow: it then migrates them), instead of generating for nobody.
After a pause of the worker's own the routers most likely stopped too, and may run again a
while after it does: none is lost for as long again as the pause lasted (a ping read just after
the pause may have been sent before it).

When a router is lost, its frontends resume each stream through another router, which usually
places it back here (`previous_worker`). If the request is still running here, the new router
takes it over without a recompute: replies go to the new router from now on, starting with the
tokens generated since those the frontend already had (they went to the lost router). For that
the worker keeps each running request's generated tokens (and their logprobs, when asked for).

A stream may also end here after its router stopped listening (hung, or killed before this
worker's verdict): its last tokens went nowhere. So an ended stream's tokens stay until its
router's second ping after it proves the router was alive once they landed; a resume that
finds them gets the tokens it lacks and the finish at once (a replay) instead of running the
request again.

Each chunk says where its tokens start in the response (`TokenChunk.offset`) and, for a
resumed request, the run number its router gave it (`TokenChunk.run`): that router may have
cancelled an earlier run here whose chunks are still on their way, and tells them apart.

Owns the per-router clocks, the token history, the run numbers and the handover decision. Does
not own the sockets or the engine (`main.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from common.logprob_history import LogprobHistory
from common.messages import GenerateRequest, TokenChunk
from common.pause_grace import PauseGrace


@dataclass(slots=True)
class _Ended:
    """A stream that ended here, kept until its router has pinged twice since."""

    tokens: list[int]  # every token it generated
    finish_reason: str
    at: float  # when it ended (monotonic)
    logprobs: LogprobHistory | None  # None: not asked for


class RouterWatch:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.heard: dict[bytes, float] = {}  # identity of a router that pings → last frame
        self.grace = PauseGrace(10 * timeout_s)  # after a pause of this worker's own
        self.generated: dict[str, list[int]] = {}  # request id → every token generated so far
        self.runs: dict[str, int] = {}  # request id → its router's run number (when not 0)
        self.logprobs: dict[str, LogprobHistory] = {}  # of the requests that ask for them
        # Router identity → its streams that ended since its last ping, by request id.
        self.ended: dict[bytes, dict[str, _Ended]] = {}
        self._lost_at: dict[bytes, float] = {}  # lost routers with streams that ended → when
        self._pinged: dict[bytes, float] = {}  # router identity → when its last ping came

    # -- router liveness -----------------------------------------------------------------------

    def on_ping(self, ident: bytes) -> None:
        now = self.heard[ident] = self.clock()
        previous = self._pinged.get(ident)
        self._pinged[ident] = now
        if self.ended and previous is not None:
            self._lost_at.pop(ident, None)
            streams = self.ended.get(ident)
            if streams:
                # It is alive: what ended before its previous ping reached it (in order, on one
                # connection) before it sent this one, a period later. (A ping sent just before
                # the last chunk landed proves nothing of it.)
                for request_id in [r for r, e in streams.items() if e.at <= previous]:
                    del streams[request_id]
                if not streams:
                    del self.ended[ident]

    def on_frame(self, ident: bytes) -> None:
        if ident in self.heard:
            self.heard[ident] = self.clock()

    def lost(self, now: float | None = None) -> list[bytes]:
        """Routers silent past the timeout at `now` (the clock, unless given), forgotten as they
        are returned (call it only when this worker itself ran on time)."""
        now = self.clock() if now is None else now
        gone = [i for i, t in self.heard.items() if now - t > self.timeout_s] \
            if self.grace.judging(now) else []
        for ident in gone:
            del self.heard[ident]
            self._pinged.pop(ident, None)
            if ident in self.ended:
                self._lost_at[ident] = now
        for ident, at in list(self._lost_at.items()):
            # Its streams resume within moments of the loss, or never.
            if now - at > self.timeout_s:
                del self._lost_at[ident]
                self.ended.pop(ident, None)
        return gone

    def pause(self, paused_s: float = 0.0) -> None:
        """This worker did not run for `paused_s`: nobody's silence meanwhile counts, and none
        is lost for as long again (at most 10 timeouts)."""
        now = self.clock()
        self.grace.paused(now, paused_s)
        for ident in self.heard:
            self.heard[ident] = now

    # -- token history, handover and replay ----------------------------------------------------

    def admitted(self, request: GenerateRequest) -> None:
        self.generated[request.request_id] = list(request.generated_token_ids)
        if request.sampling.logprobs >= 0:
            self.logprobs[request.request_id] = LogprobHistory(
                len(request.generated_token_ids))
        elif self.logprobs:
            self.logprobs.pop(request.request_id, None)
        self._run(request)

    def _run(self, request: GenerateRequest) -> None:
        if request.run:
            self.runs[request.request_id] = request.run
        elif self.runs:
            self.runs.pop(request.request_id, None)

    def on_chunk(self, chunk: TokenChunk) -> None:
        """A chunk before the last one (`finished` takes that), its `offset` and `run` set."""
        history = self.generated.get(chunk.request_id)
        if history is not None:
            chunk.offset = len(history)
            history.extend(chunk.token_ids)
            if self.runs:
                chunk.run = self.runs.get(chunk.request_id, 0)
            if chunk.logprobs:
                logprobs = self.logprobs.get(chunk.request_id)
                if logprobs is not None:
                    logprobs.items.extend(chunk.logprobs)

    def finished(self, chunk: TokenChunk, router: bytes | None, replayable: bool) -> None:
        """The last chunk of a request from `router` (None: it was cancelled meanwhile), its
        `offset` set, kept for a replay when `replayable` (not a prefill phase, whose result is
        its KV)."""
        history = self.generated.pop(chunk.request_id, None)
        logprobs = self.logprobs.pop(chunk.request_id, None) if self.logprobs else None
        if history is not None:
            chunk.offset = len(history)
            if self.runs:
                chunk.run = self.runs.pop(chunk.request_id, 0)
        if history is None or router is None or not replayable or chunk.error_code \
                or router not in self.heard:
            return
        history.extend(chunk.token_ids)
        if logprobs is not None and chunk.logprobs:
            logprobs.items.extend(chunk.logprobs)
        streams = self.ended.get(router)
        if streams is None:
            streams = self.ended[router] = {}
        streams[chunk.request_id] = _Ended(history, chunk.finish_reason or "", self.clock(),
                                           logprobs)

    def forget(self, request_id: str) -> None:
        self.generated.pop(request_id, None)
        self.runs.pop(request_id, None)
        if self.logprobs:
            self.logprobs.pop(request_id, None)

    def handover(self, request: GenerateRequest) -> TokenChunk | None:
        """`request` resumes a stream this worker is running: the chunk of tokens the new
        router must be sent first (possibly none); None when what the frontend has is not what
        this worker generated (the old run must go, and the request starts afresh)."""
        history = self.generated.get(request.request_id)
        have = request.generated_token_ids
        if history is None or len(have) > len(history) or history[:len(have)] != have:
            return None
        self._run(request)  # its chunks are the new router's run from now on
        logprobs = self.logprobs.get(request.request_id) if self.logprobs else None
        return TokenChunk(request.request_id, history[len(have):], offset=len(have),
                          run=request.run,
                          logprobs=logprobs.since(len(have)) if logprobs is not None else None)

    def replay(self, request: GenerateRequest) -> TokenChunk | None:
        """`request` resumes a stream that ended here after its router stopped listening: the
        chunk that ends it for the new router (the tokens the frontend lacks, and the finish).
        None when none such ended here, or what the frontend has is not what was generated."""
        for router, streams in self.ended.items():
            ended = streams.pop(request.request_id, None)
            if ended is not None:
                if not streams:
                    del self.ended[router]
                break
        else:
            return None
        have = request.generated_token_ids
        if len(have) > len(ended.tokens) or ended.tokens[:len(have)] != have:
            return None
        logprobs = ended.logprobs.since(len(have)) if ended.logprobs is not None else None
        return TokenChunk(request.request_id, ended.tokens[len(have):], ended.finish_reason,
                          offset=len(have), run=request.run, logprobs=logprobs)
