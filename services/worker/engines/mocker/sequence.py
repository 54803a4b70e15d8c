"""One request's state inside the mocker: its tokens, KV blocks, progress and stop conditions.

Plain attributes the scheduler reads and writes on its hot path (hence `__slots__`, no methods
beyond construction). Owns no policy: the scheduler decides what runs, the pool what is cached.
"""

from __future__ import annotations

from common.messages import PHASE_DECODE, PHASE_PREFILL, GenerateRequest
from services.worker.engines.mocker.kv_pool import Block
from services.worker.engines.mocker.token_model import TokenModel, absorb_all

WAITING = 0
RUNNING = 1
DONE = 2


class Sequence:
    __slots__ = (
        "admitted",
        "allowed",
        "arrival",
        "bad_words",
        "banned",
        "bias",
        "block_hashes",
        "blocks",
        "cache_salt",
        "cached_tokens",
        "decoding",
        "eos_ok",
        "first_sent",
        "inline_images",
        "kv_ready",
        "logprobs",
        "max_tokens",
        "min_tokens",
        "num_computed",
        "num_generated",
        "num_prompt",
        "num_registered",
        "num_scheduled",
        "prefill_only",
        "priority",
        "prompt_logprobs",
        "request_id",
        "state",
        "status",
        "stop_ids",
        "tokens",
        "unbiasable",
        "unbiasable_early",
    )

    def __init__(self, request: GenerateRequest, model: TokenModel) -> None:
        sp = request.sampling
        self.request_id = request.request_id
        self.cache_salt = request.cache_salt  # seeds its block hashes (KvPool.root_of)
        # Under priority scheduling: (priority, arrival) orders it, lowest first.
        self.priority = request.priority
        self.arrival = 0  # set by the scheduler
        # Prompt, then everything generated (migrated tokens included): what a re-prefill covers.
        self.tokens: list[int] = [*request.token_ids, *request.generated_token_ids]
        self.num_prompt = len(request.token_ids)
        self.num_generated = len(request.generated_token_ids)
        self.max_tokens = sp.max_tokens  # counts migrated tokens too: the router resends originals
        self.min_tokens = sp.min_tokens
        self.logprobs = sp.logprobs  # -1: none asked for
        # A resumed request's client has its prompt's already.
        self.prompt_logprobs = -1 if request.generated_token_ids else sp.prompt_logprobs
        self.stop_ids: frozenset[int] | None = frozenset(sp.stop_token_ids) or None
        # EOS may end this request (once min_tokens is reached).
        self.eos_ok = model.emits_eos and not sp.ignore_eos
        # Ids that must not be drawn while min_tokens is not reached.
        banned = set(sp.stop_token_ids)
        if model.eos_token_id is not None:
            banned.add(model.eos_token_id)
        self.banned: frozenset[int] | None = frozenset(banned) if sp.min_tokens > 0 and banned \
            else None
        # logit_bias, and what it may never pick: before min_tokens what is banned, after it EOS
        # where EOS may not end the request.
        self.bias: dict[int, float] | None = sp.logit_bias or None
        self.unbiasable_early = self.banned or frozenset()
        self.unbiasable = frozenset((model.eos_token_id,)) if (
            model.eos_token_id is not None and not self.eos_ok) else frozenset()
        # vLLM's allowed_token_ids, in the order given (it breaks ties between equally likely
        # ones); a dict for its lookups.
        self.allowed: dict[int, None] | None = dict.fromkeys(sp.allowed_token_ids) or None
        # vLLM's bad_words: (the tokens before the last, the last) of each.
        self.bad_words: list[tuple[list[int], int]] | None = [
            (word[:-1], word[-1]) for word in sp.bad_words if word] or None
        self.state = absorb_all(self.tokens)  # rolling hash of `tokens`
        self.status = WAITING
        self.admitted = False  # admitted at least once (cached_tokens is from the first time)
        self.first_sent = False
        self.decoding = False  # has produced a token since its latest admission
        self.blocks: list[Block] = []
        self.block_hashes: list[int] = []  # memo of full-block hashes of `tokens`
        self.num_registered = 0  # leading blocks registered in the prefix cache
        self.num_computed = 0  # tokens whose KV is in `blocks`
        self.num_scheduled = 0  # tokens scheduled in the step in flight
        self.cached_tokens = 0
        # Disaggregation: a prefill phase ends after its first token and keeps its blocks for
        # the decode side; a decode phase arrives with every token's KV but the last one's
        # transferred (cleared when what it found cached says otherwise, or on preemption).
        self.prefill_only = request.phase == PHASE_PREFILL
        self.kv_ready = request.phase == PHASE_DECODE and bool(request.generated_token_ids)
        # Images no encode worker embedded: (first, end) of their placeholder tokens. Each is
        # encoded here in the step that admits the request, unless its placeholders are all in
        # the prefix cache.
        self.inline_images: list[tuple[int, int]] = [
            (im.offset, im.offset + im.num_tokens) for im in request.images if not im.embedding]
