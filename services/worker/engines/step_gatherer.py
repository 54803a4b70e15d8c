"""What the real-engine adapters (vllm, sglang, trtllm) share: admission checks, and gathering
per-request token streams into one `StepOutput` per engine step.

Real engines stream per request; the worker wants one frame per step. A `StepGatherer` collects
the deltas pushed for every live request and emits them together on `flush()`: the vLLM adapter
flushes once per engine iteration (it hears of each one), the others on the next event-loop turn
after a delta arrives (`flush_soon`), which gathers everything one engine iteration woke up. It
also keeps the live-request view that load reports and forward-pass records are made from.

Owns chunk bookkeeping (first chunk carries prompt and cache figures, the last a finish reason,
nothing after an abort) and the checks every engine applies before admitting a request. Does not
own any engine's API.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common.messages import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    ForwardPass,
    GenerateRequest,
    TokenChunk,
    TokenLogprob,
)
from services.worker.engine import EngineError, EngineLoad, StepOutput, StepSink

_FINISH_REASONS = {FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR}


def check_request(request: GenerateRequest, max_model_len: int, vocab_size: int) -> None:
    """Raise `EngineError` for a request no engine should start."""
    if not request.token_ids:
        raise EngineError("the prompt is empty")
    sp = request.sampling
    if sp.max_tokens < 1:
        raise EngineError(f"max_tokens must be at least 1, got {sp.max_tokens}")
    if sp.min_tokens > sp.max_tokens:
        raise EngineError(f"min_tokens ({sp.min_tokens}) exceeds max_tokens ({sp.max_tokens})")
    if len(request.token_ids) + sp.max_tokens > max_model_len:
        raise EngineError(
            f"prompt ({len(request.token_ids)} tokens) + max_tokens ({sp.max_tokens}) exceeds "
            f"the model's context length {max_model_len}")
    if vocab_size > 0:
        for ids in (request.token_ids, request.generated_token_ids):
            if ids and (min(ids) < 0 or max(ids) >= vocab_size):
                raise EngineError(f"token ids must lie in [0, {vocab_size - 1}]")


def remaining_budget(request: GenerateRequest) -> tuple[int, int]:
    """(max_tokens, min_tokens) still to generate: migrated tokens count against both."""
    done = len(request.generated_token_ids)
    sp = request.sampling
    return sp.max_tokens - done, max(0, sp.min_tokens - done)


def finish_reason(engine_reason: str | None) -> str | None:
    """An engine's finish reason in Turnout's terms (unknown kinds of stopping are "stop")."""
    if engine_reason is None:
        return None
    return engine_reason if engine_reason in _FINISH_REASONS else FINISH_STOP


class Tracked:
    """One live request as the gatherer sees it; `handle` is the engine adapter's own."""

    __slots__ = ("first_sent", "handle", "logprobs", "num_prompt", "num_tokens",
                 "prompt_logprobs", "replay", "replay_cached", "request_id")

    def __init__(self, request: GenerateRequest) -> None:
        self.request_id = request.request_id
        self.logprobs = request.sampling.logprobs  # -1: none asked for
        self.prompt_logprobs = request.sampling.prompt_logprobs
        self.num_prompt = len(request.token_ids)
        self.num_tokens = self.num_prompt + len(request.generated_token_ids)
        self.first_sent = False
        self.handle: Any = None
        # Tokens the engine regenerates before its output is new (`replay_from_prompt`), and
        # the prompt tokens it found cached meanwhile (for the first chunk sent).
        self.replay: list[int] = []
        self.replay_cached = 0

    def replay_from_prompt(self, generated: list[int]) -> None:
        """The engine restarts this resumed request from its prompt: its first outputs must be
        `generated` again, and are not sent twice."""
        self.replay = list(generated)


class StepGatherer:
    def __init__(self, sink: StepSink, block_size: int) -> None:
        self.sink = sink
        self.block_size = block_size
        self.requests: dict[str, Tracked] = {}
        self.steps = 0
        self._chunks: list[TokenChunk] = []
        self._prefill = 0
        self._decode = 0
        self._scheduled = False
        self._last_flush = time.monotonic()

    # -- requests ----------------------------------------------------------------------------------

    def admit(self, request: GenerateRequest) -> Tracked:
        if request.request_id in self.requests:
            raise EngineError(f"request {request.request_id!r} is already running here", 409)
        if not self.requests:
            self._last_flush = time.monotonic()  # a step's duration starts when work arrives
        tracked = self.requests[request.request_id] = Tracked(request)
        return tracked

    def push(self, request_id: str, token_ids: list[int], reason: str | None,
             cached_tokens: int = 0, kv_transfer_params: bytes = b"",
             logprobs: list[TokenLogprob] | None = None,
             prompt_logprobs: list[TokenLogprob] | None = None) -> None:
        """New tokens of a live request (and its end, with `reason`); ignored once aborted.
        `kv_transfer_params` (a prefill's hand-off) goes on the final chunk; `logprobs`, one
        per token, when the request asked for them; `prompt_logprobs` on the first."""
        tracked = self.requests.get(request_id)
        if tracked is None or (not token_ids and reason is None):
            return
        if tracked.replay:
            skip = self._replayed(tracked, token_ids, reason, cached_tokens)
            if skip < 0:
                return
            token_ids = token_ids[skip:]
            logprobs = logprobs[skip:] if logprobs else logprobs
            if not token_ids and reason is None:
                return
        if tracked.first_sent:
            chunk = TokenChunk(request_id, token_ids, reason)
            self._decode += len(token_ids)
        else:
            tracked.first_sent = True
            cached_tokens = max(cached_tokens, tracked.replay_cached)
            chunk = TokenChunk(request_id, token_ids, reason, num_prompt_tokens=tracked.num_prompt,
                               cached_tokens=cached_tokens, prompt_logprobs=prompt_logprobs)
            self._prefill += max(0, tracked.num_tokens - cached_tokens)
            self._decode += max(0, len(token_ids) - 1)
        tracked.num_tokens += len(token_ids)
        if logprobs:
            chunk.logprobs = logprobs
        if reason is not None:
            chunk.kv_transfer_params = kv_transfer_params
            del self.requests[request_id]
        self._chunks.append(chunk)

    def _replayed(self, tracked: Tracked, token_ids: list[int], reason: str | None,
                  cached_tokens: int) -> int:
        """Match a replaying request's new tokens against those it must regenerate: how many
        of them were regenerated, or -1 (and the request failed) when they differ, or it ends
        before it has caught up."""
        replay = tracked.replay
        n = min(len(replay), len(token_ids))
        if token_ids[:n] != replay[:n] or (reason is not None and n < len(replay)):
            self.fail(tracked.request_id, 500, "the resumed request was replayed from its prompt "
                      "(its structured-output constraint must see every token) and diverged from "
                      "the tokens already sent; its stream cannot go on")
            return -1
        tracked.replay_cached = max(tracked.replay_cached, cached_tokens)
        tracked.replay = replay[n:]
        return n

    def fail(self, request_id: str, code: int, message: str) -> None:
        """End a live request with an error the client sees."""
        if self.requests.pop(request_id, None) is not None:
            self._chunks.append(TokenChunk(request_id, [], FINISH_ERROR, error_code=code,
                                           error_message=message))

    def drop(self, request_id: str) -> Tracked | None:
        """Forget an aborted request: nothing more is sent for it, not even what is pending."""
        tracked = self.requests.pop(request_id, None)
        if tracked is not None and any(c.request_id == request_id for c in self._chunks):
            self._chunks = [c for c in self._chunks if c.request_id != request_id]
        return tracked

    # -- steps -------------------------------------------------------------------------------------

    def flush(self, kv_used_blocks: int = 0) -> None:
        """Hand everything gathered since the last flush to the sink as one step."""
        self._scheduled = False
        if not self._chunks:
            return
        now = time.monotonic()
        chunks, self._chunks = self._chunks, []
        self.steps += 1
        fp = ForwardPass(self.steps, len(chunks), self._prefill, self._decode,
                         (now - self._last_flush) * 1000.0, kv_used_blocks)
        self._prefill = self._decode = 0
        self._last_flush = now
        self.sink(StepOutput(chunks, [], fp))

    def flush_soon(self) -> None:
        """Flush on the next event-loop turn: the other streams woken by the same engine
        iteration push their deltas first."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    # -- load --------------------------------------------------------------------------------------

    def load(self, running: int | None = None, kv_used_blocks: int = 0,
             kv_total_blocks: int = 0) -> EngineLoad:
        """Load from the live requests; `running` (the engine's own count, if it reports one)
        caps how many of them count as running rather than waiting."""
        bs = self.block_size
        decode_blocks = prefill_tokens = started = 0
        for t in self.requests.values():
            if t.first_sent:
                started += 1
                decode_blocks += -(-t.num_tokens // bs)
            else:
                prefill_tokens += t.num_tokens
        live = len(self.requests)
        run = started if running is None else min(running, live)
        return EngineLoad(active_decode_blocks=decode_blocks, active_prefill_tokens=prefill_tokens,
                          kv_used_blocks=kv_used_blocks, kv_total_blocks=kv_total_blocks,
                          waiting=live - run, running=run)
