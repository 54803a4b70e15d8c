"""What the router keeps of one request placed on a prefill worker: where its prompt's KV is,
whether it was handed off and whether its decode phase began, and the first token held back for
the hand-off. Owns the record only; `disaggregation.py` decides and moves, and `accounting.py`
carries it on the request's in-flight entry.
"""

from __future__ import annotations

import dataclasses

from common.messages import TokenChunk


@dataclasses.dataclass(slots=True)
class DisaggState:
    """A request placed on a prefill worker, until (and after) its hand-off."""

    prefill_worker: str  # worker id
    prefill_endpoint: str  # its request endpoint: the decode worker pulls from there first
    handed_off: bool = False
    decode_begun: bool = False  # a chunk came from its decode worker (its pull is over)
    kv_transfer_params: bytes = b""
    handoff_at: float = 0.0  # monotonic time the prefill's final chunk arrived (0: not yet)
    pulled_tokens: int = 0  # prompt tokens the decode worker was to pull (from the KV index)
    hold_first: bool = False  # the first token waits for the decode worker's (see `relay`)
    placed_at: float = 0.0  # monotonic time of its first placement on a prefill worker
    handoff_ms: float = 0.0  # the hand-off gap expected at placement (the fit's mean)
    held: TokenChunk | None = None  # the prefill's first-token chunk, held back
