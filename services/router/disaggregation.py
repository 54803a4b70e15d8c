"""Disaggregated serving in the router: where a request's prompt is computed, and the hand-off
of its KV from a prefill worker to a decode worker at its first token.

A disaggregated request is a migration planned at the first token. On arrival the router picks
the decode worker it would use (decode load, prefix cached there) and decides the path
(`choose_path`): prefill *locally* on it, or *remotely*: a prefill worker is picked by KV
overlap and queued prefill alone (decode load does not matter there) and gets the request with
`phase="prefill"`. Its final chunk carries the first token, which goes to the client at once
(TTFT does not include the transfer; with `--disagg-hold-first-token`, when the hand-off gap
is predicted past `--disagg-itl-target-ms` and the TTFT budget has room for it, the token is
held until the decode worker's step towards its next token begins (an empty chunk, or its first
token), so the gap lands in TTFT, not between tokens), and the engine's `kv_transfer_params`;
then a decode worker is picked afresh, by decode load and by the prefix it already caches, and
gets `phase="decode"` with the prefill worker first in `kv_sources`: it pulls only the blocks
it lacks, acknowledges, and continues the stream. The in-flight table, `kv_sources` and the
block pull are the migration path's; a lost prefill worker's request re-runs on another prefill
worker (or, with none, locally), a lost decode worker's request migrates as any other, and a
hand-off with no decode worker waits like a stranded migration until the decode pool has been
empty for `--prefill-fallback-after-ms`, then its prefill worker decodes it
(`_decode_in_place`), unless that one is leaving too. A decode phase not yet begun
(no decode worker then, or the chosen one lost or refusing first) goes to another decode
worker as a decode phase again: it pulls the prompt from the prefill worker, whose hold on
that KV outlasts even its drain (`replan`).

The conditional path is priced per request against the targets `--disagg-ttft-target-ms` and
`--disagg-itl-target-ms`, with the router's step-time model (`cost_model.py`) and a hand-off
model fitted from the hand-offs it observed (`PathCosts`):

- local: the request's TTFT on the decode worker (what is left of the prefill step running
  there, its queued prefill and this prompt's uncached part, chunk by chunk beside its decode
  passes), and the longest step its streams would see meanwhile. A prefill chunk sits in the
  decode batch's steps, so when that step exceeds the ITL target, every stream decoding there
  (and every hand-off due there) gets a gap past it;
- remote: the TTFT on the best prefill worker (what is left of the step running there, then
  the prompts queued behind it with this prompt's part uncached there: `prefill_ttft`), and the
  hand-off gap (the pull of what the decode worker lacks, plus what is left of its own prefill
  when the KV lands). The queued prompts end with this one, so joining them delays them: the
  worst first token of that step is the oldest queued prompt's (`PathCosts.remote_tail_ms`).

A path "fits" when it meets both targets and, for local, stretches no stream's step past the
ITL target. Exactly one fits: it is taken (reasons `handoff_gap`, `remote_ttft` and
`prefill_busy` for local; `decode_itl` and `local_ttft` for remote). Both fit, or neither while
local would harm no stream: the token thresholds decide as they always did (local when the
uncached part is under `--local-prefill-max-tokens` and `--local-prefill-max-ratio` of the
prompt, or when every prefill worker is `--prefill-busy-tokens` deep; else remote). Neither fits
and local would stretch streams: remote (`decode_itl`: one request misses, not a batch). A
decode worker at `--decode-veto-requests` in flight never prefills locally (`decode_busy`).
Before all that, with `--disagg-itl-miss-budget` (`itl_budget.py`): a local prefill that
would stretch streams is taken when the prefill pool's TTFT is `--disagg-local-gain-ratio`
times the local one, that TTFT (with the hand-off) is in the TTFT tail (`TtftTail`, past
`--disagg-tail-quantile`) and the budget has room (`ttft_gain`); and a first token planned to
be held goes out at once when its request is already in that tail and the budget pays for
its one stretched gap; a held one goes out alone, on the budget too, when the decode worker has
not begun its next step by the hand-off fit's deadline (`hold_deadline_s`: it is in a long step,
and waiting for its end would put that step into one of the slowest first tokens).

With no prefill worker alive the model runs aggregated on its decode (and aggregated) workers,
and with none of those, on its prefill workers (`--prefill-fallback`), counted. Owns the
path decision, the hand-off and their metrics; not the policies' costs (`kv_policy.py`), the
step-time fit (`cost_model.py`), the accounting or the sockets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import msgspec

from common.messages import (
    FINISH_LENGTH,
    KIND_CANCEL,
    KIND_GENERATE,
    MODE_DECODE,
    MODE_PREFILL,
    PHASE_DECODE,
    PHASE_PREFILL,
    Cancel,
    GenerateRequest,
    TokenChunk,
    encoder,
)
from services.router.accounting import Accounting, RoutedRequest
from services.router.args import RouterConfig
from services.router.cost_model import CostModels, HandoffCostModel, StepCostModel
from services.router.disagg_state import DisaggState
from services.router.itl_budget import ItlMissBudget, TtftTail
from services.router.kv_index import KvIndex
from services.router.kv_policy import KvAwarePolicy, load_of, worker_load
from services.router.metrics import RouterMetrics
from services.router.migration import Migration
from services.router.policies import Decision, NoWorkerError, Policy
from services.router.request_needs import able_workers, honouring, needs, prefer_able
from services.router.selection import Selector
from services.router.worker_pool import WorkerHandle, WorkerPool

PATH_LOCAL = "local"  # prefill on the decode (or aggregated) worker that then decodes
PATH_REMOTE = "remote"  # prefill on a prefill worker, KV handed to a decode worker
PATH_AGGREGATED = "aggregated"  # one pool is empty: the other one does all

REASON_ALWAYS = "always"  # --disagg-mode always
REASON_LONG = "long_uncached"  # uncached part over a local limit
REASON_SHORT = "short_uncached"  # uncached part under both local limits
REASON_PREFILL_BUSY = "prefill_busy"  # every prefill worker's queue is past --prefill-busy-tokens
REASON_DECODE_BUSY = "decode_busy"  # the decode worker vetoed a local prefill
REASON_HANDOFF_GAP = "handoff_gap"  # local fits; the hand-off gap would pass the ITL target
REASON_REMOTE_TTFT = "remote_ttft"  # local fits; the prefill pool's TTFT would pass its target
REASON_DECODE_ITL = "decode_itl"  # a local prefill would stretch decoding streams past the ITL
REASON_LOCAL_TTFT = "local_ttft"  # remote fits; the decode worker's TTFT would pass its target
REASON_TTFT_GAIN = "ttft_gain"  # local stretches streams, within the ITL miss budget: far faster
REASON_NO_PREFILL = "no_prefill_worker"
REASON_NO_DECODE = "no_decode_worker"  # the prefill pool serves it whole
REASON_ONE_TOKEN = "single_token"  # max_tokens 1: nothing to decode

DISAGG_MODES = ["conditional", "always"]

log = logging.getLogger("turnout.router")


@dataclasses.dataclass(frozen=True, slots=True)
class PathLimits:
    """The conditional-disaggregation thresholds (router flags)."""

    mode: str = "conditional"
    local_max_tokens: int = 2048  # prefill locally only below this many uncached tokens
    local_max_ratio: float = 0.7  # ... and below this share of the prompt
    prefill_busy_tokens: int = 0  # queued prefill tokens making the pool busy (0: never)
    decode_veto_requests: int = 0  # a decode worker with this many in flight refuses (0: never)
    ttft_target_ms: float = 500.0  # a path whose predicted TTFT is over this misses
    itl_target_ms: float = 50.0  # ... whose predicted gap (or stretched decode step) is over this
    hold_first_token: bool = False  # a slow hand-off may move into TTFT (the first token waits)
    local_gain_ratio: float = 1.5  # remote TTFT / local TTFT that spends the ITL miss budget


@dataclasses.dataclass(frozen=True, slots=True)
class PathCosts:
    """One request's predicted costs on each path (milliseconds)."""

    local_ttft_ms: float  # to its first token, prefilled on the decode worker
    local_step_ms: float  # the longest step the decode worker's streams see meanwhile
    exposed_streams: float  # streams that step would stretch: decoding there, hand-offs due
    remote_ttft_ms: float  # to its first token on the best prefill worker
    handoff_ms: float  # the first gap after the hand-off (fit + 2 standard deviations)
    # Prompts waiting there for the running step go into the next one with this prompt, which
    # delays them as much as itself: how long the oldest has waited, and their time to the
    # first token from now without this prompt (both 0: none waits).
    queue_wait_ms: float = 0.0
    queue_ttft_ms: float = 0.0

    def remote_tail_ms(self) -> float:
        """The slowest first token of the step this prompt would join: the oldest waiting
        prompt's (they end together), or its own."""
        return self.queue_wait_ms + self.remote_ttft_ms

    def local_tail_ms(self) -> float:
        """The slowest first token if it prefills locally instead: its own, or the oldest
        waiting prompt's in a step without it."""
        if self.queue_wait_ms <= 0:
            return self.local_ttft_ms
        return max(self.local_ttft_ms, self.queue_wait_ms + self.queue_ttft_ms)

    def local_harmless(self, limits: PathLimits) -> bool:
        return self.exposed_streams <= 0 or self.local_step_ms <= limits.itl_target_ms

    def holds_first_token(self, limits: PathLimits) -> bool:
        """Remote: the hand-off gap would miss the ITL target but fits in the TTFT budget, so
        the first token waits for the decode worker's (the gap moves into TTFT)."""
        return (limits.hold_first_token and self.handoff_ms > limits.itl_target_ms
                and self.remote_ttft_ms + self.handoff_ms <= limits.ttft_target_ms)

    def remote_fits(self, limits: PathLimits) -> bool:
        if self.handoff_ms <= limits.itl_target_ms:
            return self.remote_ttft_ms <= limits.ttft_target_ms
        return self.holds_first_token(limits)


def choose_path(limits: PathLimits, prompt_tokens: int, uncached_tokens: int,
                prefill_queue_tokens: float, decode_requests: int,
                costs: PathCosts, budget_room: bool = False) -> tuple[str, str]:
    """(path, reason) for one request: where its uncached prompt is computed (see the module
    docstring).

    `prefill_queue_tokens`: the least queued prefill among prefill workers;
    `decode_requests`: what the chosen decode worker has in flight; `budget_room`: the ITL miss
    budget could pay for this request's stretched streams."""
    if limits.mode == "always":
        return PATH_REMOTE, REASON_ALWAYS
    short = (uncached_tokens < limits.local_max_tokens
             and uncached_tokens < limits.local_max_ratio * prompt_tokens)
    busy = 0 < limits.prefill_busy_tokens <= prefill_queue_tokens
    harmless = costs.local_harmless(limits)
    if (not harmless and budget_room and costs.local_ttft_ms <= limits.ttft_target_ms
            and costs.remote_tail_ms() >= limits.local_gain_ratio * costs.local_tail_ms()):
        # The request (or the prompts it would delay by joining their step) would sit in the
        # TTFT tail behind the prefill pool: a few stretched gaps among the many streamed buy
        # first tokens far sooner.
        if 0 < limits.decode_veto_requests <= decode_requests:
            return PATH_REMOTE, REASON_DECODE_BUSY
        return PATH_LOCAL, REASON_TTFT_GAIN
    local_fits = harmless and costs.local_ttft_ms <= limits.ttft_target_ms
    remote_ttft_ok = not busy and costs.remote_ttft_ms <= limits.ttft_target_ms
    remote_fits = not busy and costs.remote_fits(limits)
    if local_fits == remote_fits and (local_fits or harmless):
        # Both paths meet the targets, or neither does and local harms nobody: the thresholds.
        if not short and not busy:
            return PATH_REMOTE, REASON_LONG
        path, reason = PATH_LOCAL, REASON_SHORT if short else REASON_PREFILL_BUSY
    elif local_fits:
        path = PATH_LOCAL
        reason = (REASON_PREFILL_BUSY if busy else
                  REASON_REMOTE_TTFT if not remote_ttft_ok else REASON_HANDOFF_GAP)
    elif remote_fits:
        return PATH_REMOTE, REASON_DECODE_ITL if not harmless else REASON_LOCAL_TTFT
    else:
        return PATH_REMOTE, REASON_DECODE_ITL
    if 0 < limits.decode_veto_requests <= decode_requests:
        return PATH_REMOTE, REASON_DECODE_BUSY
    return path, reason


@dataclasses.dataclass(slots=True)
class Placement:
    """Where a new request goes and what it is sent (payload None: the client's request)."""

    decision: Decision
    payload: bytes | None = None
    state: DisaggState | None = None


class Disaggregation:
    def __init__(self, config: RouterConfig, pool: WorkerPool, selector: Selector,
                 kv_index: KvIndex | None, accounting: Accounting, migration: Migration,
                 metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.selector = selector
        self.accounting = accounting
        self.migration = migration
        self.metrics = metrics
        self.clock = clock
        self.lease_ms = config.disagg_lease_ms
        self.limits = PathLimits(config.disagg_mode, config.local_prefill_max_tokens,
                                 config.local_prefill_max_ratio, config.prefill_busy_tokens,
                                 config.decode_veto_requests, config.disagg_ttft_target_ms,
                                 config.disagg_itl_target_ms, config.disagg_hold_first_token,
                                 config.disagg_local_gain_ratio)
        self.itl_budget = ItlMissBudget(config.disagg_itl_miss_budget, clock=clock)
        # The budget goes to the TTFT tail: past the quantile of recent first-token times as
        # they would be with the token held (prefill, then the hand-off).
        self.ttft_tail = TtftTail(config.disagg_tail_quantile)
        # The step-time fit the adaptive cost learns from the workers' forward passes; without
        # it (the block cost, a non-kv mode) its prior alone prices the paths.
        self.cost_models = selector.cost_models or CostModels()
        self.handoff_models: dict[str, HandoffCostModel] = {}
        base = selector.policy
        if isinstance(base, KvAwarePolicy):
            # The block cost on both pools (None: its own margin when the base runs adaptive).
            margin = base.hotspot_margin if base.cost_models is None else None
            # Prefill: overlap and queued prefill only. Decode: a missing block costs a copy,
            # not a prefill, against the decode load.
            self.prefill_policy: Policy = KvAwarePolicy(
                base.index, overlap_weight=1.0, hotspot_margin=margin,
                seed=base.seed, decode_weight=0.0)
            self.decode_policy: Policy = KvAwarePolicy(
                base.index, overlap_weight=config.decode_overlap_weight,
                hotspot_margin=margin, seed=base.seed)
        else:
            self.prefill_policy = self.decode_policy = base
        self.migration.replan = self.replan
        accounting.on_finish = self._finished

    # -- arrival -------------------------------------------------------------------------------

    def places(self, request: GenerateRequest) -> bool:
        """Whether `place` decides `request`: a new one, or a resume with no token yet, unless
        its previous worker is one of ours that serves whole requests (the selector puts it
        back there). A resume that has tokens continues where its stream was."""
        if request.generated_token_ids:
            return False
        worker = self.pool.workers.get(request.previous_worker) \
            if request.previous_worker else None
        return worker is None or worker.mode == MODE_PREFILL

    def place(self, request: GenerateRequest) -> Placement | None:
        """Where a new request's prompt runs; None: the selector places it as usual (no
        prefill worker or no decode worker alive, a gateway-named worker).
        A resume goes back to its prefill worker while that one serves: the prompt is queued or
        prefilling there (its router drained before the first token), and that worker hands it
        over."""
        if request.target_worker:
            return None
        workers = self.pool.routable(request.model)
        prefill = [w for w in workers if w.mode == MODE_PREFILL]
        serving = [w for w in workers if w.mode != MODE_PREFILL]
        if needs(request):  # both phases where all it asks is honoured; no such prefill: local
            prefill = honouring(prefill, request)
            serving = able_workers(serving, request)
        if not prefill:
            if any(w.mode == MODE_DECODE for w in serving):
                self._count(PATH_AGGREGATED, REASON_NO_PREFILL)
            return None
        if not serving:
            if not self.selector.prefill_fallback(request.model):
                raise NoWorkerError(f"no live decode worker serves model {request.model!r}",
                                    503)
            # The selector places it whole on a prefill worker: served there, not failed.
            self._count(PATH_AGGREGATED, REASON_NO_DECODE)
            return None
        if request.sampling.max_tokens <= 1:
            self._count(PATH_LOCAL, REASON_ONE_TOKEN)
            return None
        decode = self.decode_policy.decide(request, serving)
        prompt = len(request.token_ids)
        uncached = max(0, prompt - decode.overlap * decode.worker.block_size)
        queue = min(load_of(w)[0] * w.block_size for w in prefill)
        self.metrics.disagg_prefill_queue.set(queue)
        in_flight = _in_flight(decode.worker)
        back = [w for w in prefill if w.id == request.previous_worker] \
            if request.previous_worker else []
        chosen = self.prefill_policy.decide(request, back or prefill)
        costs = self.path_costs(request.model, prompt, uncached, decode.worker, in_flight,
                                chosen, prefill_inflight=sum(w.inflight for w in prefill),
                                decode_workers=len(serving))
        handoff_ms = self._handoff_model(request.model).predict(uncached)
        if back:  # decided (and counted) by the router it resumes from
            path, reason = PATH_REMOTE, "resumed"
            budget_room = False
        else:
            # A local prefill is bought only for a request the prefill pool would put in the
            # TTFT tail (before any tail is known, for any that gains enough). The budget
            # first: the tail's bound sorts recent first tokens, for nothing without budget.
            budget_room = self.itl_budget.room() and (
                costs.remote_tail_ms() + handoff_ms >= self._ttft_tail_ms(unknown=0.0))
            path, reason = choose_path(self.limits, prompt, uncached, queue, in_flight, costs,
                                       budget_room)
            self._count(path, reason)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("prefill path", extra={"fields": {
                "request_id": request.request_id, "path": path, "reason": reason,
                "prompt": prompt, "uncached": uncached, "budget_room": budget_room,
                "tail_ms": round(self._ttft_tail_ms(unknown=0.0), 1),
                "handoff_mean_ms": round(handoff_ms, 2),
                **{k: round(v, 2) for k, v in dataclasses.asdict(costs).items()},
                "stretched": round(self.itl_budget.stretched, 1),
                "allowance": round(self.itl_budget.allowance(), 1)}})
        if path == PATH_LOCAL:
            if reason == REASON_TTFT_GAIN:
                self.itl_budget.spend(costs.exposed_streams)
                self.metrics.disagg_stretched_streams.inc(costs.exposed_streams)
            self._commit(self.decode_policy, decode)
            return Placement(decode)
        self._commit(self.prefill_policy, chosen)
        return Placement(chosen, self._prefill_payload(request), DisaggState(
            chosen.worker.id, chosen.worker.instance.endpoints["request"],
            hold_first=costs.holds_first_token(self.limits), placed_at=self.clock(),
            handoff_ms=handoff_ms))

    def path_costs(self, model: str, prompt: int, uncached: int, decode: WorkerHandle,
                   in_flight: int, prefill: Decision, prefill_inflight: int,
                   decode_workers: int) -> PathCosts:
        """Predicted costs of both paths for a prompt of `prompt` tokens, `uncached` of them
        not cached on the chosen `decode` worker (`in_flight` requests there); `prefill`: the
        prefill worker the remote path would take; `prefill_inflight` requests are being
        prefilled remotely, to be handed to one of `decode_workers` decode workers."""
        steps: StepCostModel = self.cost_models.get(model).steps
        load = worker_load(decode, load_of(decode))
        decoding = max(load.decoding, float(in_flight))
        queued = load.queued_tokens
        local_ttft = self.prefill_ttft(steps, decode, uncached, decoding, load.kv_usage)
        chunk = max(1.0, steps.chunk_tokens - decoding)
        local_step = (steps.prefill_ms(min(queued + uncached, chunk))
                      + steps.decode_ms(max(1.0, decoding), load.kv_usage))
        p = prefill.worker
        remote_ttft = self.prefill_ttft(steps, p, max(1, prompt - prefill.overlap * p.block_size))
        queue_wait = queue_ttft = 0.0
        if p.usage.queued_since:
            queue_wait = (self.clock() - p.usage.queued_since) * 1000.0
            queue_ttft = self.prefill_ttft(steps, p, 0)
        # The decode worker's own queued prefill still running when the KV lands delays it.
        pending = max(0.0, self.prefill_ttft(steps, decode, 0, decoding, load.kv_usage)
                      - remote_ttft)
        handoff = self._handoff_model(model).upper(uncached) + pending
        exposed = decoding + prefill_inflight / max(1, decode_workers)
        return PathCosts(local_ttft, local_step, exposed, remote_ttft, handoff, queue_wait,
                         queue_ttft)

    def prefill_ttft(self, steps: StepCostModel, worker: WorkerHandle, new_tokens: float,
                     decoding: float = 0.0, kv_usage: float = 0.0) -> float:
        """Predicted time to the first token of `new_tokens` on `worker` (`decoding` sequences
        decoding there at `kv_usage`; 0 new tokens: until its queued prefill is done): the step
        in progress there runs to its end first (a prompt cannot join a running step), then
        the prompts waiting behind it go in with this one. A decode worker halfway through a
        long local prefill is as near its end as a prefill worker would be."""
        usage = worker.usage
        queued = load_of(worker)[0] * worker.block_size
        running = usage.batch_blocks * worker.block_size  # never past pending (`Accounting`)
        rest = 0.0
        if running > 0:
            elapsed_ms = (self.clock() - usage.batch_started_at) * 1000.0
            rest = max(0.0, steps.ttft_ms(running, 0.0, decoding, kv_usage) - elapsed_ms)
        return rest + steps.ttft_ms(queued - running, new_tokens, decoding, kv_usage)

    def _ttft_tail_ms(self, unknown: float = math.inf) -> float:
        """Where the TTFT tail the budget is spent on begins, for the budget spent so far."""
        return self.ttft_tail.bound_ms(unknown, fill=self.itl_budget.fill())

    def _handoff_model(self, model: str) -> HandoffCostModel:
        m = self.handoff_models.get(model)
        if m is None:
            m = self.handoff_models[model] = HandoffCostModel()
        return m

    def _prefill_payload(self, request: GenerateRequest) -> bytes:
        return encoder.encode(msgspec.structs.replace(request, phase=PHASE_PREFILL,
                                                      lease_ms=self.lease_ms))

    # -- the first token -----------------------------------------------------------------------

    def continues(self, entry: RoutedRequest, chunk: TokenChunk) -> bool:
        """`chunk` ends `entry` on its prefill worker: True when the stream goes on on a decode
        worker (the chunk's finish is cleared, so the client sees a token, not an end; call
        `hand_off` once it is relayed). False when the request really ends there."""
        state = entry.disagg
        if state is None or state.handed_off or entry.worker is None \
                or entry.worker.id != state.prefill_worker:
            return False
        produced = len(entry.generated) + len(chunk.token_ids)
        if chunk.error_code or chunk.finish_reason != FINISH_LENGTH or not chunk.token_ids \
                or produced >= entry.request.sampling.max_tokens:
            return False
        state.kv_transfer_params = chunk.kv_transfer_params
        state.handoff_at = now = self.clock()
        chunk.finish_reason = None
        chunk.kv_transfer_params = b""
        if state.placed_at:
            # What the client's TTFT would be with the token held (like with like: the tail
            # is of those figures).
            held_ms = (now - state.placed_at) * 1000.0 + state.handoff_ms
            if state.hold_first and self.itl_budget.room() and held_ms > self._ttft_tail_ms():
                # Among the slowest first tokens: one gap stretched by the hand-off costs the
                # ITL percentiles less than the hold would cost the TTFT tail.
                self.itl_budget.spend(1)
                state.hold_first = False
                self.metrics.disagg_handoffs.labels("first_token_tail").inc()
            self.ttft_tail.observe(held_ms)
        if state.hold_first:
            state.held = chunk
        return True

    def relay(self, entry: RoutedRequest, chunk: TokenChunk) -> TokenChunk | None:
        """What of `chunk` goes to the client now: None while the first token is held (its
        hand-off gap would pass the ITL target, and the TTFT budget has room for it); the next
        chunk of the stream, from whichever worker, carries it in front of its own tokens (none
        when it is the decode worker's empty one: its step towards the next token has begun),
        with the prompt figures the client has not seen yet."""
        state = entry.disagg
        if state is None or state.held is None:
            return chunk
        if chunk is state.held:
            return None
        held, state.held = state.held, None
        self.metrics.disagg_handoffs.labels("first_token_held").inc()
        return msgspec.structs.replace(
            chunk, token_ids=[*held.token_ids, *chunk.token_ids], offset=held.offset,
            num_prompt_tokens=held.num_prompt_tokens, cached_tokens=held.cached_tokens,
            logprobs=[*(held.logprobs or ()), *(chunk.logprobs or ())] or None,
            prompt_logprobs=held.prompt_logprobs)

    def hold_deadline_s(self, entry: RoutedRequest) -> float | None:
        """Seconds from its hand-off until `entry`'s held first token stops waiting for the
        decode worker (None: nothing held, or no ITL miss budget to pay for letting it go):
        the hand-off gap's fit plus two deviations. A decode worker not started on the next
        token by then is in a long step (a local prefill), and waiting for its end would put
        that step into one of the slowest first tokens."""
        state = entry.disagg
        if state is None or state.held is None or self.itl_budget.share <= 0.0:
            return None
        return self._handoff_model(entry.request.model).upper(state.pulled_tokens) / 1000.0

    def release_late(self, entry: RoutedRequest) -> TokenChunk | None:
        """`entry`'s held first token, to go out alone now that its hold deadline passed;
        None when it is no longer held or the budget has no room for the one gap it
        stretches (it then waits for the decode worker as before)."""
        state = entry.disagg
        if state is None or state.held is None or not self.itl_budget.room():
            return None
        self.itl_budget.spend(1)
        held, state.held = state.held, None
        self.metrics.disagg_handoffs.labels("first_token_late").inc()
        return held

    def hand_off(self, entry: RoutedRequest) -> None:
        """Send `entry` (its first token streamed) to a decode worker that pulls its KV."""
        state = entry.disagg
        assert state is not None
        state.handed_off = True
        if entry.request_id not in self.accounting:
            return  # cancelled between the chunk and now
        if self._send_to_decode(entry) or self._decode_in_place(entry):
            return
        # Wait for one like a stranded migration; `replan` sends it on when one comes.
        self.metrics.disagg_handoffs.labels("no_decode_worker").inc()
        self.migration.migrate(entry, "handoff", counts=False)

    def _decode_in_place(self, entry: RoutedRequest) -> bool:
        """No decode (or aggregated) worker has served `entry`'s model for
        `--prefill-fallback-after-ms`: its prefill worker, still in discovery, decodes it
        itself, from the prompt blocks it caches (it drops its hold on them for a decode worker
        first). False when a decode worker serves, the decode pool is empty for less than that,
        or the prefill worker is leaving (the stream then waits for a decode worker: `replan`
        tries again on each retry)."""
        state = entry.disagg
        assert state is not None
        prefill = self.pool.workers.get(state.prefill_worker)
        if prefill is None or not prefill.routable or not prefill.alive \
                or not self.selector.prefill_fallback(entry.request.model):
            return False
        rid = entry.request_id
        request = entry.continuation()
        decision = self.decode_policy.decide(request, [prefill])
        self._commit(self.decode_policy, decision)
        # Its first chunk ends the hand-off (and releases a held first token); it pulled
        # nothing, so it teaches the hand-off model nothing.
        state.handoff_at = 0.0
        entry.resume_tokens = len(request.token_ids) + len(request.generated_token_ids)
        self.accounting.move(entry, decision)
        self.metrics.disagg_handoffs.labels("decoded_in_place").inc()
        prefill.socket.send_multipart([KIND_CANCEL, encoder.encode(Cancel(rid))])
        prefill.socket.send_multipart([KIND_GENERATE, encoder.encode(request)])
        return True

    def _send_to_decode(self, entry: RoutedRequest) -> bool:
        """Place `entry`'s decode phase on a decode worker (not the one it leaves, if any);
        False when none serves its model."""
        state = entry.disagg
        assert state is not None
        request = entry.continuation(PHASE_DECODE, state.kv_transfer_params)
        leaving = entry.worker.id if entry.worker is not None else ""
        serving = [w for w in self.pool.routable(request.model)
                   if w.mode != MODE_PREFILL and w.id != leaving]
        serving = prefer_able(serving, request)
        if not serving:
            return False
        decision = self.decode_policy.decide(request, serving)
        prefill_id = state.prefill_worker
        holders = self.migration.holders(entry, prefill_id)
        request.kv_sources = [state.prefill_endpoint, *self.migration.kv_sources(
            {w: n for w, n in holders.items() if w != prefill_id}, decision.worker)]
        cached = decision.overlap
        to_pull = max(0, -(-len(request.token_ids) // decision.worker.block_size) - cached)
        state.pulled_tokens = min(len(request.token_ids), to_pull * decision.worker.block_size)
        self.metrics.disagg_blocks.labels("cached").inc(cached)
        self.metrics.disagg_blocks.labels("to_pull").inc(to_pull)
        self._commit(self.decode_policy, decision)
        decision.overlap = decision.request_blocks  # nothing is prefilled there
        entry.resume_tokens = len(request.token_ids) + len(request.generated_token_ids)
        self.accounting.move(entry, decision)
        self.metrics.disagg_handoffs.labels("sent").inc()
        decision.worker.socket.send_multipart([KIND_GENERATE, encoder.encode(request)])
        return True

    def decode_started(self, entry: RoutedRequest, chunk: TokenChunk) -> None:
        """The decode worker's first chunk: the hand-off latency, and what it recomputed."""
        state = entry.disagg
        if state is None:
            return
        state.decode_begun = True
        if not state.handoff_at or not chunk.num_prompt_tokens:
            return
        elapsed = self.clock() - state.handoff_at
        self.metrics.disagg_handoff_seconds.observe(elapsed)
        state.handoff_at = 0.0
        recomputed = max(0, entry.resume_tokens - chunk.cached_tokens)
        self.metrics.disagg_recomputed_tokens.observe(recomputed)
        entry.resume_tokens = 0
        if recomputed <= 1:  # a failed pull that recomputed says nothing of the transfer
            self._handoff_model(entry.request.model).observe(state.pulled_tokens,
                                                             elapsed * 1000.0)

    # -- faults --------------------------------------------------------------------------------

    def replan(self, entry: RoutedRequest, cause: str, counts: bool) -> bool:
        """Migration's hook for a request moving before its decode phase began. Its prefill
        worker lost (or refusing) before the first token: the prefill re-runs on another
        prefill worker. Handed off, but no decode worker served then, or the chosen one failed
        or refused before its first step: another decode worker takes the decode phase and
        pulls the prompt's KV from the prefill worker, which holds it under its lease (a plain
        migration would recompute the prompt and leave that lease to expire). Not when the
        engine moves the KV itself (`kv_transfer_params`: vLLM's NIXL reads blocks by id, which
        the prefill side may have freed and reused). No decode worker left: the prefill worker
        decodes it (`_decode_in_place`). False: a plain migration it is."""
        state = entry.disagg
        if state is None or not state.handed_off:
            return self.rerun_prefill(entry, counts)
        if state.decode_begun:
            return False
        if not state.kv_transfer_params and self._send_to_decode(entry):
            state.handoff_at = self.clock()  # the hand-off's latency counts from this send
        elif not self._decode_in_place(entry):
            return False
        if counts:
            entry.migrations += 1
            self.metrics.migrations.labels(cause).inc()
        return True

    def rerun_prefill(self, entry: RoutedRequest, counts: bool) -> bool:
        """A prefill worker was lost (or refused) before the first token: run the prefill on
        another prefill worker. False when none is left (the migration runs it locally)."""
        state = entry.disagg
        if state is None or state.handed_off or entry.generated:
            return False
        if counts and entry.migrations >= self.migration.limit:
            return False
        old = entry.worker.id if entry.worker is not None else state.prefill_worker
        prefill = self.prefill_workers(entry.request.model, exclude=old)
        if not prefill:
            entry.disagg = None  # it runs aggregated from here on
            return False
        if counts:
            entry.migrations += 1
            self.metrics.migrations.labels("prefill").inc()
        self.move_prefill(entry, self.prefill_policy.decide(entry.request, prefill))
        return True

    def prefill_workers(self, model: str, exclude: str = "") -> list[WorkerHandle]:
        """Routable prefill workers of `model` (but `exclude`)."""
        return [w for w in self.pool.routable(model) if w.mode == MODE_PREFILL and w.id != exclude]

    def move_prefill(self, entry: RoutedRequest, chosen: Decision,
                     hold_first: bool = False) -> None:
        """Run `entry`'s prefill phase on `chosen` (a prefill worker) instead."""
        self._commit(self.prefill_policy, chosen)
        old = entry.disagg  # its time to the first token counts from its first placement
        entry.disagg = DisaggState(chosen.worker.id, chosen.worker.instance.endpoints["request"],
                                   hold_first=hold_first,
                                   placed_at=old.placed_at if old is not None else self.clock(),
                                   handoff_ms=old.handoff_ms if old is not None else 0.0)
        self.accounting.move(entry, chosen)
        chosen.worker.socket.send_multipart([KIND_GENERATE,
                                             self._prefill_payload(entry.request)])

    # -- bookkeeping ---------------------------------------------------------------------------

    def _commit(self, policy: Policy, decision: Decision) -> None:
        policy.commit(decision)
        if self.selector.approx_index is not None:
            self.selector.approx_index.record(decision.worker.id, decision.hashes)
        self.metrics.decisions.labels(decision.policy).inc()

    def _count(self, path: str, reason: str) -> None:
        self.metrics.disagg_decisions.labels(path, reason).inc()

    def _finished(self, entry: RoutedRequest, final_tokens: int) -> None:
        streamed = len(entry.generated) + final_tokens - len(entry.request.generated_token_ids)
        self.itl_budget.finished(entry.budget_gaps, streamed)
        state = entry.disagg
        if state is not None and state.handed_off and not state.decode_begun:
            # Over before a decode worker began it (cancelled, failed, or its wait for one ran
            # out): its prefill worker frees the KV it holds for it now, not when the lease
            # ends (a decode worker that got it releases it too, as it drops the request).
            prefill = self.pool.workers.get(state.prefill_worker)
            if prefill is not None:
                prefill.socket.send_multipart([KIND_CANCEL,
                                               encoder.encode(Cancel(entry.request_id))])


def _in_flight(worker: WorkerHandle) -> int:
    """Requests on a worker: this router's, or its last report's when that says more."""
    running = worker.load.running + worker.load.waiting if worker.load is not None else 0
    return max(worker.inflight, running)
