"""What one router has placed on one worker: the ids of its requests there, the KV blocks they
hold, the blocks still to prefill and the prefill step in progress as seen from the router.
Owns the record only: `Accounting` is its one writer, policies read it, and the worker's handle
carries it.
"""

from __future__ import annotations


class WorkerUsage:
    """What this router has placed on one worker."""

    __slots__ = ("active_blocks", "batch_blocks", "batch_started_at", "pending_prefill_blocks",
                 "queued_since", "released_at", "requests")

    def __init__(self) -> None:
        self.requests: set[str] = set()
        self.active_blocks = 0  # KV blocks its requests occupy
        self.pending_prefill_blocks = 0  # blocks not yet prefilled (no first token yet)
        # The prefill step in progress, as seen from here: when it began (a placement on an
        # idle worker, or the first tokens of the one before) and the pending blocks it took.
        # Prompts placed since wait for its end: an engine cannot add them to a running step.
        self.batch_started_at = 0.0
        self.batch_blocks = 0
        # When the oldest prompt waiting behind that step was placed (0: none waits). They
        # all go into the next step, so a prompt joining them delays it as much as itself.
        self.queued_since = 0.0
        # When a request last left it, plus one report period: a load report that arrives
        # before then may have been taken while the request ran (reports and tokens travel
        # on different planes), and would count it still.
        self.released_at = 0.0
