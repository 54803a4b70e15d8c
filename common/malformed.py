"""Dropping malformed frames on either plane: count every one, warn once per source.

A frame that does not decode is never fatal: it is counted (here, and through the caller's
metric) and dropped. The first one from each source (a peer, a plane) is logged as a warning
with why it was refused; the rest are only counted, so a misbehaving peer cannot flood the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

# What decoding a frame that is not a valid message raises.
MALFORMED = (msgspec.DecodeError, msgspec.ValidationError)


class MalformedFrames:
    """`drop(why)` for each malformed frame; `total` counts them all."""

    def __init__(self, what: str, count: Callable[[], object] | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.what = what  # e.g. "request frame": logged as "dropped malformed request frame"
        self.count = count  # e.g. a prometheus counter's `inc`
        self.log = logger or logging.getLogger(__name__)
        self.total = 0
        self._warned: set[str] = set()

    def drop(self, why: str, source: str = "") -> None:
        self.total += 1
        if self.count is not None:
            self.count()
        if source not in self._warned:
            self._warned.add(source)
            fields = {"source": source, "why": why} if source else {"why": why}
            self.log.warning(f"dropped malformed {self.what}", extra={"fields": fields})

    def forget(self, source: str) -> None:
        """`source` is gone (a peer left): a new peer by that name gets its own warning."""
        self._warned.discard(source)
