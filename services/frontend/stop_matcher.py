"""Stop strings over streamed text.

Owns the hold-back rule: text that could still be the start of a stop string is kept until the
next piece shows whether it is one. Output ends just before the first stop string to complete
(or, asked to include it, just after it). Does not own token-level stops (`stop_token_ids`,
EOS); engines handle those.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    __slots__ = ("_first_chars", "_held", "_include", "_max_hold", "_stops")

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self._include = include  # vLLM's include_stop_str_in_output
        self._stops = tuple(s for s in stops if s)
        self._first_chars = frozenset(s[0] for s in self._stops)
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        buf = self._held + text if self._held else text
        # The stop completed first wins (ties: the one starting first), so the result does not
        # depend on how the text was cut into pieces.
        best_end = best_start = -1
        for stop in self._stops:
            at = buf.find(stop)
            if at != -1:
                end = at + len(stop)
                if best_end == -1 or end < best_end or (end == best_end and at < best_start):
                    best_end, best_start = end, at
        if best_end != -1:
            self._held = ""
            return buf[:best_end if self._include else best_start], True
        hold = self._hold_length(buf)
        if hold:
            self._held = buf[-hold:]
            return buf[:-hold], False
        self._held = ""
        return buf, False

    def flush(self) -> str:
        """The held-back text, once the stream ended without reaching a stop string."""
        held, self._held = self._held, ""
        return held

    def _hold_length(self, buf: str) -> int:
        """Length of the longest tail of `buf` that begins some stop string."""
        end = len(buf)
        for start in range(max(0, end - self._max_hold), end):
            if buf[start] in self._first_chars:
                tail = buf[start:]
                if any(s.startswith(tail) for s in self._stops):
                    return end - start
        return 0
