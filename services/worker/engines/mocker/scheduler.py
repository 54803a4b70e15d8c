"""The mocker's vLLM-v1-like scheduler: who runs in a step, and what a finished step produced.

Each step has a token budget. Running requests that are decoding get one token each first, then
requests part-way through their prompt continue (chunked prefill), then waiting requests are
admitted in FIFO order while there is room in the batch and in the KV pool; a prompt larger than
what is left of the budget is prefilled over several steps. A request produces its first token in
the step that finishes its prefill. When the pool runs dry the most recently admitted running
request is preempted to the front of the waiting queue; it keeps its tokens and re-prefills later
(its prefix may still be cached). With `priority` (vLLM's priority policy) the waiting queue is
ordered by (`priority`, arrival), lowest first, and the running request with the highest of
those is the one preempted, back into the queue at its place.

Disaggregation: a prefill-phase request finishes with its first token ("length" unless that
token stops it) and its blocks stay referenced in `held` until `release_held`; a decode-phase
request whose prompt blocks are all cached (imported from the prefill worker) joins the
running batch as a decoding sequence: no prompt token of it is computed here.

Owns the waiting/running queues and per-request progress; not time (the engine loop) and not
what is cached (the KV pool).
"""

from __future__ import annotations

import bisect
from collections import deque

from common.messages import FINISH_LENGTH, FINISH_STOP, TokenChunk
from services.worker.engine import EngineLoad
from services.worker.engines.mocker.kv_pool import Block, KvPool
from services.worker.engines.mocker.sequence import DONE, RUNNING, WAITING, Sequence
from services.worker.engines.mocker.token_model import TokenModel

_M64 = (1 << 64) - 1
_PRIME = 0x100000001B3  # token_model's rolling-hash prime, inlined on the hot path


class StepPlan:
    """What one step computes: the scheduled sequences (each with `num_scheduled` tokens)."""

    __slots__ = ("decode_tokens", "encode_images", "kv_admitted", "kv_used_blocks",
                 "prefill_tokens", "seqs")

    def __init__(self, seqs: list[Sequence], prefill_tokens: int, decode_tokens: int,
                 kv_used_blocks: int, encode_images: int = 0,
                 kv_admitted: list[str] | None = None) -> None:
        self.seqs = seqs
        # Requests whose transferred KV this step starts decoding from (their next token is
        # this step's): a router holding one's first token may let it go now.
        self.kv_admitted = kv_admitted or []
        self.encode_images = encode_images  # images the step runs the vision encoder on
        self.prefill_tokens = prefill_tokens
        self.decode_tokens = decode_tokens
        self.kv_used_blocks = kv_used_blocks


def _barred(seq: Sequence) -> frozenset[int]:
    """The tokens `seq`'s bad words bar as its next one: each word's last, where the output so
    far ends with the rest of it (vLLM's rule: the prompt does not count)."""
    tokens = seq.tokens
    output = len(tokens) - seq.num_prompt
    barred = []
    assert seq.bad_words is not None
    for before, last in seq.bad_words:
        n = len(before)
        if n == 0 or (n <= output and tokens[-n:] == before):
            barred.append(last)
    return frozenset(barred)


def _priority_order(seq: Sequence) -> tuple[int, int]:
    """Where `seq` stands under priority scheduling: lowest first."""
    return seq.priority, seq.arrival


class Scheduler:
    def __init__(self, pool: KvPool, model: TokenModel, max_num_seqs: int,
                 max_num_batched_tokens: int, priority: bool = False) -> None:
        self.pool = pool
        self.priority = priority
        self._arrivals = 0  # arrival numbers; resumed streams count down from 0 (ahead)
        self._resumed = 0
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.requests: dict[str, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: preemption takes from the end
        self.num_preemptions = 0
        # Requests with nothing left to generate (migrated at their limit): finished next step.
        self._done_on_arrival: list[Sequence] = []
        # Prefill phases done: their blocks, kept for the decode side (request id → blocks).
        self.held: dict[str, list[Block]] = {}
        self._budget = 0
        self._encode_images = 0  # images encoded in-line in the step being planned
        self._kv_admitted: list[str] = []  # transferred decode phases admitted in it

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._done_on_arrival)

    def add(self, seq: Sequence) -> None:
        self.requests[seq.request_id] = seq
        if seq.num_generated >= seq.max_tokens:
            self._done_on_arrival.append(seq)
        elif seq.num_generated:
            # A stream resumed from another worker arrived before anything waiting here:
            # first come, first served by original arrival keeps its token gap short.
            self._resumed -= 1
            seq.arrival = self._resumed
            if self.priority:
                self._requeue(seq)
            else:
                self.waiting.appendleft(seq)
        else:
            self._arrivals += 1
            seq.arrival = self._arrivals
            if self.priority:
                self._requeue(seq)
            else:
                self.waiting.append(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Priority scheduling: `seq` into the waiting queue at its (priority, arrival)."""
        bisect.insort(self.waiting, seq, key=_priority_order)

    def release_held(self, request_id: str) -> bool:
        """Free the blocks a finished prefill phase kept; False when none were held."""
        blocks = self.held.pop(request_id, None)
        if blocks is None:
            return False
        self.pool.release(blocks)
        return True

    def abort(self, request_id: str) -> bool:
        if self.release_held(request_id):
            return True
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        if seq.status == RUNNING:
            self.running.remove(seq)
            self.pool.release(seq.blocks)
            seq.blocks = []
        elif seq in self._done_on_arrival:
            self._done_on_arrival.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = DONE
        return True

    def load(self) -> EngineLoad:
        decode_blocks = 0
        prefill_tokens = 0
        for s in self.running:
            if s.decoding:
                decode_blocks += len(s.blocks)
            else:
                prefill_tokens += len(s.tokens) - s.num_computed
        for s in self.waiting:
            # A decode phase brings its prompt's KV: only its last token is computed here.
            prefill_tokens += 1 if s.kv_ready else len(s.tokens)
        pool = self.pool
        return EngineLoad(decode_blocks, prefill_tokens, pool.used_blocks, pool.num_blocks,
                          len(self.waiting), len(self.running))

    # -- scheduling --------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        bs = self.pool.block_size
        pool = self.pool
        running = self.running
        planned: list[Sequence] = []
        prefilling: list[Sequence] = []
        self._budget = self.max_num_batched_tokens
        self._encode_images = 0
        self._kv_admitted = []
        preemptions_before = self.num_preemptions

        # 1. one token for every decoding request (running may shrink under us by preemption)
        i = 0
        while i < len(running) and self._budget > 0:
            seq = running[i]
            i += 1
            if not seq.decoding:
                prefilling.append(seq)
                continue
            if seq.num_computed >= len(seq.blocks) * bs:  # its next token starts a new block
                if not self._make_room(seq, 1, planned):
                    continue
                seq.blocks.append(pool.allocate())
            seq.num_scheduled = 1
            planned.append(seq)
            self._budget -= 1

        # 2. requests part-way through their prompt continue
        for seq in prefilling:
            if self._budget <= 0:
                break
            if seq.status != RUNNING:
                continue  # preempted above
            n = min(len(seq.tokens) - seq.num_computed, self._budget)
            need = (seq.num_computed + n + bs - 1) // bs - len(seq.blocks)
            if need > 0:
                if not self._make_room(seq, need, planned):
                    continue
                seq.blocks.extend(pool.allocate() for _ in range(need))
            seq.num_scheduled = n
            planned.append(seq)
            self._budget -= n

        # 3. admit waiting requests in order (not in a step that had to preempt: it would only
        #    take back what it just gave up)
        if self.num_preemptions == preemptions_before:
            self._admit(planned)

        prefill = decode = 0
        for seq in planned:
            if seq.decoding:
                decode += 1
            else:
                prefill += seq.num_scheduled
        return StepPlan(planned, prefill, decode, pool.used_blocks, self._encode_images,
                        self._kv_admitted)

    def _admit(self, planned: list[Sequence]) -> None:
        bs = self.pool.block_size
        pool = self.pool
        waiting = self.waiting
        while waiting and self._budget > 0 and len(self.running) < self.max_num_seqs:
            seq = waiting[0]
            if seq.kv_ready:
                admitted = self._admit_transferred(seq, planned)
                if admitted is None:
                    break  # head-of-line waits for blocks
                if admitted:
                    continue
            # At least one prompt token is always computed: its step yields the first token.
            hits = pool.match_prefix(seq.tokens, seq.block_hashes, (len(seq.tokens) - 1) // bs,
                                     seq.cache_salt)
            hit_tokens = len(hits) * bs
            n = min(len(seq.tokens) - hit_tokens, self._budget)
            need = (hit_tokens + n + bs - 1) // bs - len(hits)
            if need > pool.free_blocks - pool.unreferenced(hits):
                break  # head-of-line waits for blocks, like vLLM's FCFS policy
            waiting.popleft()
            pool.acquire(hits)
            seq.num_registered = len(hits)
            hits.extend(pool.allocate() for _ in range(need))
            seq.blocks = hits
            seq.num_computed = hit_tokens
            if seq.inline_images:
                # In-line encoding, once: an image whose placeholders are all cached needs none.
                self._encode_images += sum(1 for _, end in seq.inline_images if end > hit_tokens)
                seq.inline_images = []
            if not seq.admitted:
                seq.admitted = True
                seq.cached_tokens = hit_tokens
            seq.status = RUNNING
            seq.decoding = False
            seq.num_scheduled = n
            self.running.append(seq)
            planned.append(seq)
            self._budget -= n

    def _admit_transferred(self, seq: Sequence, planned: list[Sequence]) -> bool | None:
        """Admit a decode phase whose KV came from a prefill worker: every token but the last
        is computed, so it decodes in this step. False (and it recomputes like any request)
        when its full blocks are not all cached any more; None when the pool has no room."""
        pool = self.pool
        bs = pool.block_size
        computed = len(seq.tokens) - 1
        full = computed // bs
        hits = pool.match_prefix(seq.tokens, seq.block_hashes, full, seq.cache_salt)
        if len(hits) < full:
            seq.kv_ready = False
            return False
        need = full + 1 - len(hits)  # the partial tail block, transferred with the rest
        if need > pool.free_blocks - pool.unreferenced(hits):
            return None
        self.waiting.popleft()
        seq.kv_ready = False
        pool.acquire(hits)
        seq.num_registered = len(hits)
        hits.extend(pool.allocate() for _ in range(need))
        seq.blocks = hits
        seq.num_computed = computed
        seq.admitted = True
        seq.cached_tokens = computed
        seq.status = RUNNING
        seq.decoding = True
        seq.num_scheduled = 1
        self.running.append(seq)
        planned.append(seq)
        self._budget -= 1
        self._kv_admitted.append(seq.request_id)
        return True

    def _make_room(self, seq: Sequence, blocks: int, planned: list[Sequence]) -> bool:
        """Preempt from the most recently admitted end until `blocks` can be allocated for
        `seq`; False when `seq` itself had to go."""
        while self.pool.free_blocks < blocks:
            if self.priority:
                victim = max(self.running, key=_priority_order)
                self.running.remove(victim)
            else:
                victim = self.running.pop()
            self._preempt(victim, planned)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, planned: list[Sequence]) -> None:
        if seq.num_scheduled:
            planned.remove(seq)
            self._budget += seq.num_scheduled
            seq.num_scheduled = 0
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.decoding = False
        seq.status = WAITING
        if self.priority:
            self._requeue(seq)
        else:
            self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- results -----------------------------------------------------------------------------

    def complete(self, plan: StepPlan) -> list[TokenChunk]:
        """Apply a finished step: advance progress, register full blocks, draw one token for
        every sequence whose KV now covers all its tokens. Returns this step's chunks."""
        pool = self.pool
        bs = pool.block_size
        draw = self.model.draw
        eos = self.model.eos_token_id
        chunks: list[TokenChunk] = []
        finished = False
        for seq in self._done_on_arrival:
            chunks.append(TokenChunk(seq.request_id, [], FINISH_LENGTH,
                                     num_prompt_tokens=seq.num_prompt))
            seq.status = DONE
            del self.requests[seq.request_id]
        self._done_on_arrival.clear()

        for seq in plan.seqs:
            if seq.status != RUNNING:
                continue  # aborted while the step ran
            computed = seq.num_computed + seq.num_scheduled
            seq.num_computed = computed
            seq.num_scheduled = 0
            if computed >= (seq.num_registered + 1) * bs:
                full = computed // bs
                pool.register(seq.blocks, seq.block_hashes, seq.tokens, seq.num_registered, full,
                              seq.cache_salt)
                seq.num_registered = full
            if computed < len(seq.tokens):
                continue  # prompt chunk done, more to prefill

            gen = seq.num_generated
            if gen < seq.min_tokens:
                tok = draw(seq.state, False, seq.banned)
            else:
                tok = draw(seq.state, seq.eos_ok, None)
            barred = _barred(seq) if seq.bad_words is not None else None
            # Logprobs as vLLM reports them: before the bias or the bar.
            if seq.bias is not None or seq.allowed is not None or (barred and tok in barred):
                excluded = seq.unbiasable_early if gen < seq.min_tokens else seq.unbiasable
                tok, biased_logprob = self.model.biased(
                    seq.state, tok, seq.bias or {}, excluded | barred if barred else excluded,
                    seq.logprobs, seq.allowed)
                if biased_logprob is not None:
                    logprob = biased_logprob
            elif seq.logprobs >= 0:
                logprob = self.model.logprobs(seq.state, tok, seq.logprobs)
            seq.tokens.append(tok)
            seq.state = ((seq.state ^ tok) * _PRIME) & _M64
            gen += 1
            seq.num_generated = gen
            seq.decoding = True
            if (tok == eos and seq.eos_ok) or (seq.stop_ids is not None and tok in seq.stop_ids):
                reason: str | None = FINISH_STOP
            elif gen >= seq.max_tokens or seq.prefill_only:
                reason = FINISH_LENGTH
            else:
                reason = None
            if seq.first_sent:
                chunk = TokenChunk(seq.request_id, [tok], reason)
            else:
                seq.first_sent = True
                chunk = TokenChunk(seq.request_id, [tok], reason,
                                   num_prompt_tokens=seq.num_prompt,
                                   cached_tokens=seq.cached_tokens)
                if seq.prompt_logprobs >= 0:
                    chunk.prompt_logprobs = self.model.prompt_logprobs(
                        seq.tokens[:seq.num_prompt], seq.prompt_logprobs)
            if seq.logprobs >= 0:
                chunk.logprobs = [logprob]
            chunks.append(chunk)
            if reason is not None:
                seq.status = DONE
                if seq.prefill_only:
                    self.held[seq.request_id] = seq.blocks
                else:
                    pool.release(seq.blocks)
                seq.blocks = []
                del self.requests[seq.request_id]
                finished = True
        if finished:
            self.running = [s for s in self.running if s.status == RUNNING]
        return chunks
