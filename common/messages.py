"""Every message Turnout sends between processes, and how each is framed.

Owns the wire format of the request plane (frame kinds + payload structs), the event plane
(topics + envelope + event bodies) and the discovery records. Structs are msgspec `Struct`s encoded
as positional MessagePack arrays (`array_like`), defaults omitted, untracked by the GC. Evolution is
append-only: a new field goes at the end with a default, so older peers still decode.

Does not own sockets or transport: see `common/transport.py` (request-plane sockets),
`common/event_plane.py` and `common/discovery/`.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec


class Wire(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Base of every wire struct: positional, compact, not GC-tracked."""


# ---------------------------------------------------------------------------------------------
# Request plane. Each frame is [kind (1 byte), payload]; a hop dispatches on the kind byte
# without decoding the payload.
# ---------------------------------------------------------------------------------------------

KIND_GENERATE: Final = b"\x00"  # GenerateRequest, upstream → downstream
KIND_CANCEL: Final = b"\x01"  # Cancel, upstream → downstream
KIND_TOKENS: Final = b"\x02"  # TokenBatch, downstream → upstream (one frame per engine step)
KIND_KV_DUMP: Final = b"\x03"  # KvDumpRequest, router → worker (resync)
KIND_KV_REPLICATE: Final = b"\x04"  # KvEventBatch of stored blocks, worker → replica peer
KIND_KV_PULL: Final = b"\x05"  # KvPullRequest, worker → worker holding blocks
KIND_KV_BLOCKS: Final = b"\x06"  # KvPullReply, answer to KIND_KV_PULL


class SamplingParams(Wire):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


class GenerateRequest(Wire):
    request_id: str
    model: str
    token_ids: list[int]
    sampling: SamplingParams
    # Direct routing: an upstream gateway already picked the worker.
    target_worker: str | None = None
    # Tokens already generated for this request elsewhere (migration): the engine continues
    # after prompt + these, and counts them against max_tokens too (the router resends the
    # original sampling parameters).
    generated_token_ids: list[int] = []
    # Request-plane endpoints of workers that may hold this sequence's KV blocks (replica peers,
    # prefix caches): a resumed request pulls what it can from them and recomputes the rest.
    kv_sources: list[str] = []


class Cancel(Wire):
    request_id: str


# Finish reasons carried on the final chunk of a request.
FINISH_STOP: Final = "stop"
FINISH_LENGTH: Final = "length"
FINISH_ABORT: Final = "abort"
FINISH_ERROR: Final = "error"


class TokenChunk(Wire):
    """New tokens of one request from one engine step; the last one has `finish_reason`."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    # Set on the first chunk of a request (0 elsewhere).
    num_prompt_tokens: int = 0
    cached_tokens: int = 0
    # On an error chunk: HTTP-like status and message for the client.
    error_code: int = 0
    error_message: str = ""


class TokenBatch(Wire):
    chunks: list[TokenChunk]


class KvDumpRequest(Wire):
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# Event plane. A message is [topic, EventEnvelope]; sequences count per (publisher, topic).
# ---------------------------------------------------------------------------------------------

TOPIC_HEARTBEAT: Final = b"hb"
TOPIC_LOAD: Final = b"load"
TOPIC_KV: Final = b"kv"
TOPIC_FPM: Final = b"fpm"


class EventEnvelope(Wire):
    publisher_id: str
    sequence: int
    timestamp: float
    payload: msgspec.Raw


class Heartbeat(Wire):
    worker_id: str
    steps: int  # engine steps done so far: progress, to tell a wedged engine from an idle one
    active_requests: int
    draining: bool = False
    # Workers that hold host-tier copies of this worker's blocks (--kv-replicas).
    replica_peers: list[str] = []
    # How late this heartbeat's tick ran behind its schedule: the worker's event loop did not
    # get the CPU. A late heartbeat that says so was starved, not hung (failure detection).
    loop_lag_s: float = 0.0


class LoadReport(Wire):
    worker_id: str
    active_decode_blocks: int
    active_prefill_tokens: int
    kv_used_blocks: int
    kv_total_blocks: int
    waiting: int
    running: int


class ForwardPass(Wire):
    """One engine step, for the planner's performance model."""

    step: int
    batch_size: int
    prefill_tokens: int
    decode_tokens: int
    duration_ms: float
    kv_used_blocks: int


class ForwardPassBatch(Wire):
    worker_id: str
    records: list[ForwardPass]


class KvBlockStored(Wire, tag="stored"):
    block_hashes: list[int]
    parent_hash: int | None
    token_ids: list[int]  # every token of every block, in order
    block_size: int


class KvBlockRemoved(Wire, tag="removed"):
    block_hashes: list[int]


class KvCleared(Wire, tag="cleared"):
    pass


KvEvent = KvBlockStored | KvBlockRemoved | KvCleared


class KvEventBatch(Wire):
    worker_id: str
    events: list[KvEvent]
    # True when this batch is a full dump answering a resync (the index replaces the worker).
    dump: bool = False


class KvPullRequest(Wire):
    """Ask a peer for blocks of one sequence, in order; it answers with the ones it holds."""

    request_id: str
    block_hashes: list[int]


class KvPullReply(Wire):
    request_id: str
    # Single-block entries (parent hash + tokens; engines with real KV append payload bytes).
    blocks: list[KvBlockStored]


# ---------------------------------------------------------------------------------------------
# Discovery plane records (JSON on disk / in annotations).
# ---------------------------------------------------------------------------------------------

ROLE_FRONTEND: Final = "frontend"
ROLE_ROUTER: Final = "router"
ROLE_WORKER: Final = "worker"
ROLE_PLANNER: Final = "planner"

# Worker sub-role (`Instance.metadata["mode"]`); prefill and decode roles are not built yet.
MODE_AGGREGATED: Final = "aggregated"


class Instance(msgspec.Struct, omit_defaults=True):
    """One registered process: who it is, what it serves and where to reach it."""

    id: str
    role: str
    model: str = ""
    endpoints: dict[str, str] = {}  # "request", "events", "http" → addresses
    metadata: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------
# Shared encoders/decoders (msgspec's are reusable and faster than per-call construction).
# ---------------------------------------------------------------------------------------------

encoder: Final = msgspec.msgpack.Encoder()
generate_decoder: Final = msgspec.msgpack.Decoder(GenerateRequest)
cancel_decoder: Final = msgspec.msgpack.Decoder(Cancel)
token_batch_decoder: Final = msgspec.msgpack.Decoder(TokenBatch)
kv_pull_decoder: Final = msgspec.msgpack.Decoder(KvPullRequest)
kv_pull_reply_decoder: Final = msgspec.msgpack.Decoder(KvPullReply)
envelope_decoder: Final = msgspec.msgpack.Decoder(EventEnvelope)
heartbeat_decoder: Final = msgspec.msgpack.Decoder(Heartbeat)
load_decoder: Final = msgspec.msgpack.Decoder(LoadReport)
kv_batch_decoder: Final = msgspec.msgpack.Decoder(KvEventBatch)
fpm_decoder: Final = msgspec.msgpack.Decoder(ForwardPassBatch)
