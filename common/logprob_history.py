"""The log-probabilities of a stream's tokens, kept beside its token history by each hop that
may have to send tokens again (a worker handing a live stream to another router, or replaying
one that ended; a router taking a stream over from a lost connection).

A hop's history starts where the stream was when it reached that hop: the tokens before (those
the request came with, `GenerateRequest.generated_token_ids`) already reached the client, so
they are never sent again from here.
"""

from __future__ import annotations

from common.messages import TokenLogprob


class LogprobHistory:
    __slots__ = ("base", "items")

    def __init__(self, base: int) -> None:
        self.base = base  # the response's token index of items[0]
        self.items: list[TokenLogprob] = []

    def since(self, offset: int, end: int | None = None) -> list[TokenLogprob]:
        """The logprobs of the response's tokens `offset` up to `end` (None: the last)."""
        start = max(0, offset - self.base)
        return self.items[start:] if end is None else self.items[start:max(start, end - self.base)]
