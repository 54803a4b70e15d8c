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
# KvRelease, decode worker (or router) → prefill worker: the blocks held for a request's
# hand-off may go (else they go when the request's lease expires).
KIND_KV_RELEASE: Final = b"\x07"
# Liveness of upstream peers on the request plane: a frontend pings each router, a router each
# worker, every heartbeat period (empty payload); a router answers a frontend's ping with a pong
# (its payload: `Placements`, or empty when there are none; an older frontend ignores it).
KIND_PING: Final = b"\x08"
KIND_PONG: Final = b"\x09"
KIND_RESUME_ELSEWHERE: Final = b"\x0a"  # ResumeElsewhere, router → frontend (router draining)
KIND_ENCODE: Final = b"\x0b"  # EncodeRequest, router → encode worker
KIND_ENCODED: Final = b"\x0c"  # EncodeReply, encode worker → router

# GenerateRequest.phase: how a worker serves the request.
PHASE_AGGREGATED: Final = ""  # prompt and every token here
# Compute the prompt's KV and the first token, then end the stream (finish_reason "length",
# or "stop" when the first token ends the request) carrying `kv_transfer_params` on the final
# chunk, and hold the prompt's KV blocks until a KvRelease or `lease_ms` passes.
PHASE_PREFILL: Final = "prefill"
# Continue after prompt + generated_token_ids: the prompt's KV comes from `kv_sources` (the
# prefill worker first) and `kv_transfer_params`; what no source delivers is recomputed.
PHASE_DECODE: Final = "decode"


class StructuredOutput(Wire):
    """vLLM's structured outputs: the output's text must fit exactly one of these (the
    frontend checks that one is set). An engine advances the constraint over the tokens it
    generates only, so a resumed request (`GenerateRequest.generated_token_ids`) is replayed
    from its prompt rather than continued (`SamplingParams.seed` makes a sampled one repeat)."""

    json: str = ""  # a JSON schema, as JSON text
    regex: str = ""
    choice: list[str] = []  # the output is one of these strings
    grammar: str = ""  # an EBNF grammar (vLLM's xgrammar / lark forms)
    json_object: bool = False  # any JSON object


class SamplingParams(Wire):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    # 0: off; else tokens less likely than min_p times the most likely token's probability are
    # never drawn.
    min_p: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # -1: none; k >= 0: each output token's log-probability and the k most likely tokens at
    # its position (`TokenChunk.logprobs`).
    logprobs: int = -1
    # The same for the prompt's tokens (`TokenChunk.prompt_logprobs`; -1: none).
    prompt_logprobs: int = -1
    # OpenAI's logit_bias: added to these tokens' logits before sampling (-100 bans one, 100
    # all but forces it).
    logit_bias: dict[int, float] = {}
    # vLLM's bad_words, as token sequences: the last token of one is never drawn right after
    # the output so far ends with the ones before it.
    bad_words: list[list[int]] = []
    # vLLM's allowed_token_ids: only these may be drawn ([]: any).
    allowed_token_ids: list[int] = []
    structured: StructuredOutput | None = None


class TokenLogprob(Wire):
    """One output token's log-probability, and the most likely tokens at its position (as many
    as `SamplingParams.logprobs` asked for, most likely first)."""

    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []
    # The token's rank among all at its position (1: the most likely; 0: not known). Prompt
    # tokens carry it: unlike a sampled token, one may rank anywhere.
    rank: int = 0


class ImageInput(Wire):
    """One image of a request: its identity, where its placeholder tokens sit in `token_ids`,
    and either its file bytes (not yet encoded) or its embedding (an encode worker's output).

    The placeholder token ids themselves are derived from `hash` (`common/image_keys.py`), so
    the KV block hashes of every block covering them, and of every block after, carry the
    image's identity: a repeated image is a prefix hit, a different image with the same text
    is not."""

    hash: str  # hex sha256 of the decoded pixels, mode and size
    offset: int  # index of its first placeholder token in token_ids
    num_tokens: int  # placeholder tokens it occupies
    mime: str = ""  # "image/png" | "image/jpeg" | "image/webp" (with `data`)
    data: bytes = b""  # the image file as the client sent it (empty once encoded)
    embedding: bytes = b""  # the encoder's output for it (empty until encoded)


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
    # Disaggregated serving (PHASE_*): "" aggregated, "prefill" or "decode".
    phase: str = ""
    # Opaque engine-specific hand-off data (vLLM: its kv_transfer_params as JSON bytes): the
    # prefill worker produces it on its final chunk; the router carries it untouched to the
    # decode worker.
    kv_transfer_params: bytes = b""
    # Prefill phase: how long the worker holds the prompt's blocks for the decode side when no
    # KvRelease comes (0: the worker's --kv-lease-ms).
    lease_ms: int = 0
    # A resume after a router was lost: the worker that was serving it (its KV is there; it may
    # still be running it and then hands the live request over).
    previous_worker: str = ""
    # Images in the prompt, in order of `offset` (multimodal chat).
    images: list[ImageInput] = []
    # Re-sent by its frontend after the router carrying it was lost (with or without tokens
    # yet): a router still running it takes it over, any other places it. Last: a field added
    # to a positional struct goes at the end, so a peer a release behind still reads the rest.
    resumed: bool = False
    # A router's number for a resumed request it places, on every run of it that router sends
    # (prefill and decode phases included; 0: none); the worker puts it on every chunk of the
    # run (`TokenChunk.run`): an earlier run there that the router cancelled may still have
    # chunks on their way, a finish among them. A worker says it does so with `chunk_runs` in
    # its discovery metadata.
    run: int = 0
    # vLLM's `cache_salt`: seeds the request's block hashes (`common.block_hash.root_hash`), so
    # it reuses only KV computed for requests with the same salt ("" for none).
    cache_salt: str = ""
    # vLLM's `priority`: on a worker scheduling by priority, lower goes first (then arrival).
    priority: int = 0


class Cancel(Wire):
    request_id: str


# Finish reasons carried on the final chunk of a request.
FINISH_STOP: Final = "stop"
FINISH_LENGTH: Final = "length"
FINISH_ABORT: Final = "abort"
FINISH_ERROR: Final = "error"


class TokenChunk(Wire):
    """New tokens of one request from one engine step; the last one has `finish_reason`. An
    empty one (no tokens, no finish, no error) says a decode phase's step has begun with its
    transferred KV, a step ahead of its next token (the mocker sends it): a router holding
    the request's first token sends it then, and relays nothing else of it."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    # Set on the first chunk of a request (0 elsewhere).
    num_prompt_tokens: int = 0
    cached_tokens: int = 0
    # On an error chunk: HTTP-like status and message for the client.
    error_code: int = 0
    error_message: str = ""
    # Final chunk of a prefill-phase request: the engine's hand-off data for the decode side.
    kv_transfer_params: bytes = b""
    # The worker serving the request, on the first chunk a router relays from it (a frontend
    # names it as `previous_worker` when it resumes the stream through another router).
    worker_id: str = ""
    # How many of the response's tokens came before this chunk's first one, as the worker
    # counts them (the request's `generated_token_ids` included); -1: not said. A router drops
    # tokens its stream already has: an earlier run of the request that it cancelled on the
    # same worker may still have chunks on their way when the stream comes back to it.
    offset: int = -1
    # The `GenerateRequest.run` of the run that made it: a router drops (non-error) chunks of
    # any other run of the stream on that worker.
    run: int = 0
    # One per token of `token_ids` when the request asked for logprobs (None: it did not; not
    # an empty list, which would be one more allocation per chunk at every hop).
    logprobs: list[TokenLogprob] | None = None
    # On a request's first chunk when it asked for prompt logprobs: one per prompt token after
    # the first (which has nothing before it to be predicted from).
    prompt_logprobs: list[TokenLogprob] | None = None


class TokenBatch(Wire):
    chunks: list[TokenChunk]


class KvDumpRequest(Wire):
    reason: str = ""


class ResumeElsewhere(Wire):
    """A draining router gives these streams back: the frontend resumes each on another router
    (prompt + the tokens it already has), exactly as when a router dies."""

    request_ids: list[str]
    # False: not draining; it took the frontend for gone (silent) and cancelled these, so a
    # frontend that was only stalled resumes them through any router, this one included.
    draining: bool = True
    # Draining: the worker running each stream ("": none), as `previous_worker` for its resume,
    # so one that has no token yet is handed over where it waits too, not run a second time.
    workers: list[str] = []


class Placements(Wire):
    """A pong's payload: the streams this router placed or moved since its last pong to that
    frontend that no chunk has named the worker of yet, and that worker each. A frontend
    resuming one of them through another router (this one died or hung before its first token)
    names it as `previous_worker`, so the stream is handed over where it waits, not run twice."""

    request_ids: list[str]
    workers: list[str]


class EncodeRequest(Wire):
    """Router → encode worker: encode these images of `request_id` (each with `data`)."""

    request_id: str
    images: list[ImageInput]


class ImageEmbedding(Wire):
    hash: str
    embedding: bytes
    cached: bool = False  # served from the encode worker's embedding cache


class EncodeReply(Wire):
    """Encode worker → router: the embeddings of an EncodeRequest's images, in its order, or
    an error (`error_code` HTTP-like) that fails the request."""

    request_id: str
    embeddings: list[ImageEmbedding] = []
    error_code: int = 0
    error_message: str = ""


# ---------------------------------------------------------------------------------------------
# Event plane. A message is [topic, EventEnvelope]; sequences count per (publisher, topic).
# ---------------------------------------------------------------------------------------------

TOPIC_HEARTBEAT: Final = b"hb"
TOPIC_LOAD: Final = b"load"
TOPIC_KV: Final = b"kv"
TOPIC_FPM: Final = b"fpm"
TOPIC_ROUTER_USAGE: Final = b"rusage"  # RouterUsage, router replica → router replicas


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


class WorkerShare(Wire):
    """What one router has placed on one worker right now."""

    worker_id: str
    requests: int
    active_blocks: int
    pending_prefill_blocks: int


class RouterUsage(Wire):
    """Router replica sync: a router's own placements per worker, so the other replicas count
    them before the worker's next load report. `full`: every worker (absent ones: zero)."""

    router_id: str
    workers: list[WorkerShare]
    full: bool = False


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


class KvRelease(Wire):
    """The decode side has what it needs of `request_id`'s prefill: free the held blocks."""

    request_id: str


# ---------------------------------------------------------------------------------------------
# Discovery plane records (JSON on disk / in annotations).
# ---------------------------------------------------------------------------------------------

ROLE_FRONTEND: Final = "frontend"
ROLE_ROUTER: Final = "router"
ROLE_WORKER: Final = "worker"
ROLE_PLANNER: Final = "planner"

# Worker sub-role (`Instance.metadata["mode"]`).
MODE_AGGREGATED: Final = "aggregated"  # prefill and decode of its own requests
MODE_PREFILL: Final = "prefill"  # prefill phases (whole requests only while no decode worker is)
MODE_DECODE: Final = "decode"  # decode phases, and whole requests prefilled locally
MODE_ENCODE: Final = "encode"  # images → embeddings only (KIND_ENCODE), never generation

# How a worker's engine orders waiting requests (`Instance.metadata["scheduling"]`; vLLM's
# --scheduling-policy values).
SCHEDULING_FCFS: Final = "fcfs"  # first come, first served
SCHEDULING_PRIORITY: Final = "priority"  # `GenerateRequest.priority`, lower first, then arrival
SCHEDULING_POLICIES: Final = (SCHEDULING_FCFS, SCHEDULING_PRIORITY)


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
kv_release_decoder: Final = msgspec.msgpack.Decoder(KvRelease)
envelope_decoder: Final = msgspec.msgpack.Decoder(EventEnvelope)
heartbeat_decoder: Final = msgspec.msgpack.Decoder(Heartbeat)
load_decoder: Final = msgspec.msgpack.Decoder(LoadReport)
kv_batch_decoder: Final = msgspec.msgpack.Decoder(KvEventBatch)
fpm_decoder: Final = msgspec.msgpack.Decoder(ForwardPassBatch)
resume_elsewhere_decoder: Final = msgspec.msgpack.Decoder(ResumeElsewhere)
placements_decoder: Final = msgspec.msgpack.Decoder(Placements)
router_usage_decoder: Final = msgspec.msgpack.Decoder(RouterUsage)
encode_request_decoder: Final = msgspec.msgpack.Decoder(EncodeRequest)
encode_reply_decoder: Final = msgspec.msgpack.Decoder(EncodeReply)
