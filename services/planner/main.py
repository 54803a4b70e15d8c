"""The planner process: measures load, predicts the next interval, and sets replica counts.

Reads top-down: parse config, build the performance model (seeded by `--profile`), predictors,
replica planner and one connector per planned role; serve /metrics; watch discovery for workers
(subscribe to their `fpm` and `load` events), routers and frontends (scraped for request counts
and latencies); then every `--adjustment-interval-s`: observe → predict → refit → correct →
decide → bound (GPU budget, stuck starts) → apply; and every `--reactive-interval-s` the
reactive rule (`reactive`) adds workers (as many as the live load needs) or removes one from
live per-worker loads, or starts the first worker of a role scaled to zero as soon as requests
wait. Both loops take one lock, so their decisions never interleave. On SIGTERM/SIGINT it stops
adjusting and, with `--stop-workers-on-exit`, drains the workers it started (never killing
them).

Owns the wiring and the adjustment cadence. Does not own the arithmetic (`load_predictor`,
`performance_model`, `replica_planner`) or process lifecycles (`connectors`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shlex
import sys
import time
from collections import deque
from collections.abc import Coroutine, Sequence

import httpx
import zmq

from common.discovery import open_discovery
from common.event_plane import EventSubscriber
from common.malformed import MALFORMED
from common.messages import (
    MODE_AGGREGATED,
    MODE_DECODE,
    MODE_ENCODE,
    MODE_PREFILL,
    ROLE_FRONTEND,
    ROLE_PLANNER,
    ROLE_ROUTER,
    ROLE_WORKER,
    TOPIC_FPM,
    TOPIC_LOAD,
    Instance,
    LoadReport,
    fpm_decoder,
    load_decoder,
)
from common.service import Service, run_service
from common.status_server import StatusServer
from common.transport import destroy_context, identity_metadata, secure_context
from services.planner.args import PlannerConfig
from services.planner.connectors import Connector, LocalConnector, NoopConnector, PoolState
from services.planner.encode_pool import EncodePoolPlanner, EncodeStage
from services.planner.kube_connector import KubernetesConnector
from services.planner.load_observer import Demand, LoadObserver, Observation
from services.planner.load_predictor import (
    PREDICTORS,
    TrackedPredictor,
    arima_min_observations,
    make_predictor,
    parse_arima_order,
)
from services.planner.metrics import PlannerMetrics
from services.planner.performance_model import PerformanceModel, StepSample
from services.planner.reactive import (
    Corrections,
    Outlook,
    WorkerLoad,
    needed,
    pressure,
    reactive_step,
    spread,
)
from services.planner.readiness import StartupWatch
from services.planner.replica_planner import (
    ROLE_AGGREGATED,
    ROLE_PREFILL,
    EngineLimits,
    LoadForecast,
    ReplicaNeeds,
    ReplicaPlanner,
    Slo,
)
from services.worker.engines import engine_named_in, split_refusal

log = logging.getLogger("turnout.planner")

SERIES = ("request_rate", "input_tokens", "output_tokens")
# The reactive loop's live arrival rate spans this many of its checks (a rise: half as many):
# long enough that a few Poisson arrivals do not read as a burst, short enough to see one
# within seconds.
LIVE_RATE_CHECKS = 4
# A reactive answer sized by the live rate leaves the pool this busy at most: the backlog built
# while its new workers start drains with what is left (at a full pool it would only grow).
REACTIVE_UTILIZATION = 0.8


class Planner:
    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self.service = Service(ROLE_PLANNER, config.planner_id)
        self.planner_id = self.service.id
        self.model_name = config.model_name()
        self.ctx = zmq.Context()
        self.metrics = PlannerMetrics()
        self.subscriber = EventSubscriber(self.ctx, [TOPIC_FPM, TOPIC_LOAD])
        self.workers: dict[str, Instance] = {}  # live workers of our model
        self.peers: dict[str, Instance] = {}  # routers and frontends, scraped each interval
        self.kv_total: dict[str, int] = {}  # worker → KV blocks, from its load reports
        self.loads: dict[str, tuple[float, LoadReport]] = {}  # worker → (when, last report)
        self.model = PerformanceModel(window=config.model_window)
        if config.profile:
            self.model.load_profile(config.profile)
        self.predictors: dict[str, TrackedPredictor] = {
            name: TrackedPredictor(make_predictor(
                config.load_predictor, config.predictor_window, config.kalman_process_noise,
                config.kalman_measurement_noise, config.arima_order, config.arima_window))
            for name in SERIES}
        for name in PREDICTORS:
            self.metrics.predictor.labels(name).set(1 if name == config.load_predictor else 0)
        self.planner = ReplicaPlanner(
            Slo(config.ttft_slo_ms, config.itl_slo_ms), self.limits(),
            disaggregated=config.planner_mode == "disaggregated",
            min_replicas=config.min_replicas, max_replicas=config.max_replicas,
            scale_down_cooldown_s=config.scale_down_cooldown_s, max_gpus=config.max_gpus,
            gpus_per_worker=dict.fromkeys(
                [ROLE_AGGREGATED, "prefill", "decode"], config.gpus_per_worker))
        self.metrics.budget_gpus.set(config.max_gpus)
        self.startup = StartupWatch(config.ready_timeout_s)
        self.connectors: dict[str, Connector] = {
            role: self.make_connector(role) for role in self.planner.roles}
        # The encode pool, apart from the LLM roles: its own rule, no GPU budget share.
        self.encode_pool: EncodePoolPlanner | None = None
        self.encode_connector: Connector | None = None
        if config.encode_max_replicas > 0:
            self.encode_pool = EncodePoolPlanner(
                config.encode_latency_slo_ms, config.encode_min_replicas,
                config.encode_max_replicas, config.reactive_scale_down_margin,
                config.scale_down_cooldown_s, time.monotonic)
            self.encode_connector = self.make_connector(MODE_ENCODE)
        self.scaling = asyncio.Lock()  # one decision at a time: predictive or reactive
        self.reacting_stop = asyncio.Event()  # ends the reactive loop with the predictive one
        # (when, decode steps) per interval, back to one request's duration: `model_itl`
        self.decode_history: deque[tuple[float, list[StepSample]]] = deque()
        self._why = ""  # why the last interval had no replica estimate
        self._failures: set[str] = set()  # loop failures already logged with a traceback

    def make_connector(self, role: str) -> Connector:
        cfg = self.config

        def registered() -> set[str]:
            return {w.id for w in self.workers.values()
                    if w.metadata.get("mode", MODE_AGGREGATED) == role}

        if cfg.dry_run or cfg.connector == "noop":
            return NoopConnector(role, registered)
        if cfg.connector == "kubernetes":
            deployment = {"prefill": cfg.kube_prefill_deployment,
                          "decode": cfg.kube_decode_deployment,
                          MODE_ENCODE: cfg.kube_encode_deployment}.get(role, cfg.kube_deployment)
            return KubernetesConnector(role, deployment, cfg.kube_namespace)
        args = {"prefill": cfg.prefill_worker_args, "decode": cfg.decode_worker_args,
                MODE_ENCODE: cfg.encode_worker_args}.get(role)
        command = LocalConnector.worker_command(
            shlex.split(args or cfg.worker_args), role, cfg.discovery, cfg.lease_ttl_s,
            cfg.model, cfg.served_model_name, cfg.keys_dir)
        return LocalConnector(role, command, registered, self.planner_id,
                              stop_on_close=cfg.stop_workers_on_exit,
                              stop_timeout_s=cfg.worker_stop_timeout_s)

    def limits(self) -> EngineLimits:
        """Engine geometry: what live workers report, else the profile, else the defaults. KV
        space bounds decode batches only, so prefill workers' pools do not count (when workers
        that decode have reported theirs)."""
        defaults = EngineLimits()
        modes = {worker_id: inst.metadata.get("mode", MODE_AGGREGATED)
                 for worker_id, inst in self.workers.items()}
        decoding = [blocks for worker_id, blocks in self.kv_total.items()
                    if modes.get(worker_id) not in (None, MODE_PREFILL, MODE_ENCODE)]
        # Encode workers hold no KV: their reports never bound a batch.
        reported = decoding or [blocks for worker_id, blocks in self.kv_total.items()
                                if modes.get(worker_id) != MODE_ENCODE]
        kv_total = (min(reported) if reported
                    else self.model.kv_total_blocks or defaults.kv_total_blocks)
        sizes = [w.metadata.get("block_size") for w in self.workers.values()]
        block_size = next((s for s in sizes if isinstance(s, int) and s > 0),
                          self.model.block_size or defaults.block_size)
        return EngineLimits(self.config.max_step_tokens, self.config.max_batch, kv_total,
                            block_size, self.config.kv_usage_limit)

    # -- discovery and events ------------------------------------------------------------------

    async def watch_discovery(self) -> None:
        async for event in self.discovery.watch():
            inst = event.instance
            gone = event.kind == "removed"
            if inst.role == ROLE_WORKER and inst.model == self.model_name:
                self.on_worker(inst, gone)
            elif inst.role in (ROLE_ROUTER, ROLE_FRONTEND):
                if gone:
                    self.peers.pop(inst.id, None)
                    self.observer.forget(inst.id)
                else:
                    self.peers[inst.id] = inst

    def on_worker(self, inst: Instance, gone: bool) -> None:
        events = inst.endpoints.get("events", "")
        if gone:
            self.workers.pop(inst.id, None)
            self.kv_total.pop(inst.id, None)
            self.loads.pop(inst.id, None)
            if events:
                self.subscriber.disconnect(events)
            self.subscriber.forget(inst.id)
            return
        old = self.workers.get(inst.id)
        if old is not None and old.endpoints.get("events") != events:
            self.subscriber.disconnect(old.endpoints.get("events", ""))
        self.workers[inst.id] = inst
        if events:
            self.subscriber.connect(events)

    async def consume_events(self) -> None:
        while True:
            topic, env = await self.subscriber.recv()
            if env.publisher_id not in self.workers:
                continue
            try:
                if topic == TOPIC_LOAD:
                    load = load_decoder.decode(env.payload)
                    self.kv_total[env.publisher_id] = load.kv_total_blocks
                    self.loads[env.publisher_id] = (time.monotonic(), load)
                elif topic == TOPIC_FPM:
                    total = self.kv_total.get(env.publisher_id)
                    if not total:
                        continue  # its load report (KV size) comes with the next heartbeat
                    batch = fpm_decoder.decode(env.payload)
                    for record in batch.records:
                        self.model.observe(record, total)
                    self.observer.add_steps(
                        StepSample(r.prefill_tokens, r.decode_tokens,
                                   min(1.0, r.kv_used_blocks / total), r.duration_ms)
                        for r in batch.records)
            except MALFORMED:
                pass  # the subscriber already counts envelope-level junk; a bad body is rarer

    # -- the adjustment loop -------------------------------------------------------------------

    async def adjust_forever(self) -> None:
        """Adjust every interval until stopped; a stop never interrupts an adjustment halfway
        (a worker being started is then tracked, so it is stopped on exit too). The reactive
        loop runs beside it and ends with it."""
        reacting = (asyncio.create_task(self.react_forever())
                    if self.config.reactive_interval_s > 0 else None)
        try:
            await self._adjust_until_stopped()
        finally:
            if reacting is not None:
                self.reacting_stop.set()
                await asyncio.gather(reacting, return_exceptions=True)

    async def _adjust_until_stopped(self) -> None:
        while not self.service.stopping:
            try:
                await asyncio.wait_for(self.service.wait_stopping(),
                                       self.config.adjustment_interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.adjust()
            except Exception:  # one bad interval must not stop planning
                self._failed("adjustment")

    async def adjust(self) -> None:
        m = self.metrics
        obs = await self.observer.collect(*self.peer_lists())
        await self.record_observation(obs)
        report = self.model.fit()
        self.planner.limits = self.limits()
        model_itl = self.model_itl(obs)  # (keeps its window of steps, steady or not)
        if self.steady(obs):
            self.planner.correct(obs.ttft_ms, self.model_ttft(obs), obs.decode_itl_ms,
                                 model_itl)
        elif self.planner.disaggregated:
            # A prefill pool's TTFT correction carries the queue's wait by design (its
            # capacity plans none): a burst's growing queue is what it must learn.
            self.planner.correct(obs.ttft_ms, self.model_ttft(obs), None, None)
        forecast = self.forecast()
        needs = self.needs(forecast)
        idle = obs.request_rate == 0 and (obs.demand is None or obs.demand.idle)
        async with self.scaling:
            states = {role: await self.observe_pool(role) for role in self.connectors}
            proposed: dict[str, int] = {}
            wanted: dict[str, float | None] = {}
            for role, state in states.items():
                need = needs.needs.get(role) if needs is not None else None
                if idle:  # a decaying forecast never reaches 0 by itself; an idle fleet does
                    need = 0.0
                wanted[role] = need
                m.needed.labels(role).set(need if need is not None else math.nan)
                # Requests came or still run: at least one worker, however small the need.
                target = self.planner.propose(role, need, state.desired,
                                              floor=1 if self.demanded(obs) else 0)
                if target > state.desired and self.startup.stuck(role):
                    target = state.desired
                target = self.live_floor(role, state.ready, state.desired, target)
                m.scale_up_held.labels(role).set(1 if self.startup.stuck(role) else 0)
                proposed[role] = target
            targets = self.planner.fit_budget(proposed)
            for role, state in states.items():
                if targets[role] < proposed[role]:
                    m.budget_limited.labels(role).inc()
                if state.desired == 0 and targets[role] > 0:
                    m.scale_from_zero.labels(role).inc()
                need = wanted[role]
                await self.scale(role, state.desired, targets[role], self.seen(role, {
                    "need": None if need is None else round(need, 2)}))
            m.gpus_targeted.set(self.planner.gpus(targets))
            await self.adjust_encode(obs.encode)
        m.adjustments.inc()
        m.model_r2.set(report.r2 if report.r2 is not None else math.nan)
        m.model_rmse.set(report.rmse_ms if report.rmse_ms is not None else math.nan)
        m.model_samples.labels("prefill").set(report.prefill_samples)
        m.model_samples.labels("decode").set(report.decode_samples)
        for phase, source in (("prefill", report.prefill_source),
                              ("decode", report.decode_source)):
            for s in ("fit", "profile", "none"):
                m.model_source.labels(phase, s).set(1 if s == source else 0)
        m.correction.labels("ttft").set(self.planner.ttft_correction.factor)
        m.correction.labels("itl").set(self.planner.itl_correction.factor)

    async def record_observation(self, obs: Observation) -> None:
        m = self.metrics
        values = {"request_rate": obs.request_rate, "input_tokens": obs.input_tokens,
                  "output_tokens": obs.output_tokens}
        if self.config.load_predictor == "arima":  # a statsmodels fit per series: off the loop
            await asyncio.to_thread(self._observe_series, values)
        else:
            self._observe_series(values)
        for name, predictor in self.predictors.items():
            for gauge, value in ((m.prediction_abs_error, predictor.abs_error),
                                 (m.prediction_error_ratio, predictor.error_ratio)):
                gauge.labels(name).set(value if value is not None else math.nan)
        self.record_demand(obs.demand)
        for gauge, value in ((m.observed_rate, obs.request_rate),
                             (m.observed_input, obs.input_tokens),
                             (m.observed_output, obs.output_tokens),
                             (m.observed_ttft, None if obs.ttft_ms is None
                              else obs.ttft_ms / 1000),
                             (m.observed_itl, None if obs.itl_ms is None
                              else obs.itl_ms / 1000)):
            gauge.set(value if value is not None else math.nan)

    def _observe_series(self, values: dict[str, float | None]) -> None:
        for name, value in values.items():
            if value is not None:
                self.predictors[name].observe(value)

    def record_demand(self, demand: Demand | None) -> None:
        self.metrics.waiting.set(demand.waiting if demand is not None else math.nan)

    def demanded(self, obs: Observation) -> bool:
        """Requests arrived: some are in flight or waiting now, or the routers ended (or
        rejected, for want of a worker) some this interval."""
        return bool((obs.demand is not None and not obs.demand.idle)
                    or (obs.request_rate or 0) > 0)

    def peer_lists(self) -> tuple[list[Instance], list[Instance]]:
        peers = list(self.peers.values())
        return ([p for p in peers if p.role == ROLE_ROUTER],
                [p for p in peers if p.role == ROLE_FRONTEND])

    # -- pools -----------------------------------------------------------------------------

    async def adjust_encode(self, stage: EncodeStage | None) -> None:
        """The encode pool's interval: its own rule (`encode_pool`), no share of the GPU
        budget; observed and applied as the LLM pools are. The caller holds `scaling`."""
        pool = self.encode_pool
        if pool is None or self.encode_connector is None:
            return
        state = await self.observe_pool(MODE_ENCODE)
        if state.ready < state.desired:
            return  # a start is under way: judge the pool once it serves
        latency = stage.latency_ms if stage is not None else None
        await self.scale(MODE_ENCODE, state.desired, pool.target(stage, state.desired),
                         {"encode_latency_ms": None if latency is None else round(latency, 1)})

    def connector(self, role: str) -> Connector:
        if role == MODE_ENCODE and self.encode_connector is not None:
            return self.encode_connector
        return self.connectors[role]

    async def observe_pool(self, role: str) -> PoolState:
        """The role's pool as its connector sees it now, folded into the metrics, the cooldown
        (a hand-made change counts as a scaling action) and the stuck-start watch."""
        m = self.metrics
        try:
            state = await self.connector(role).observe()
        except Exception:
            m.connector_errors.labels(role).inc()
            raise
        if state.changed_from is not None:
            m.external_changes.labels(role).inc()
            if role == MODE_ENCODE and self.encode_pool is not None:
                self.encode_pool.note_change()
            else:
                self.planner.note_change(role, state.desired)
        timeouts = self.startup.timeouts.get(role, 0)
        self.startup.update(role, state)
        if self.startup.timeouts.get(role, 0) > timeouts:
            m.start_timeouts.labels(role).inc()
        m.current.labels(role).set(state.desired)
        m.ready.labels(role).set(state.ready)
        return state

    async def scale(self, role: str, current: int, target: int,
                    why: dict[str, object] | None = None, reactive: bool = False) -> None:
        """Apply `target` to the role's pool; `why`: what the decision saw, for the log."""
        m = self.metrics
        m.target.labels(role).set(target)
        if role != MODE_ENCODE:  # the encode pool keeps its own cooldown
            self.planner.commit(role, current, target)
            if reactive and target != current:
                self.planner.note_change(role, target)
        if target != current:
            direction = "up" if target > current else "down"
            m.actions.labels(role, direction).inc()
            if reactive:
                m.reactive_actions.labels(role, direction).inc()
            log.info("scaling", extra={"fields": {
                "role": role, "current": current, "target": target, "reactive": reactive,
                **(why or {})}})
        try:
            await self.connector(role).apply(target)
        except Exception:
            m.connector_errors.labels(role).inc()
            raise

    # -- the reactive loop -----------------------------------------------------------------

    async def react_forever(self) -> None:
        while not self.reacting_stop.is_set():
            try:
                await asyncio.wait_for(self.reacting_stop.wait(), self.config.reactive_interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.react()
            except Exception:  # e.g. the API server unreachable: try again next tick
                self._failed("reactive check")

    async def react(self) -> None:
        """One reactive check of every role (see `reactive`)."""
        cfg = self.config
        routers, _ = self.peer_lists()
        live = await self.observer.live_rate(routers, LIVE_RATE_CHECKS * cfg.reactive_interval_s)
        self.metrics.live_rate.set(live if live is not None else math.nan)
        async with self.scaling:
            for role in self.connectors:
                state = await self.observe_pool(role)
                if state.desired == 0:
                    await self.wake_from_zero(role)
                    continue
                loads = self.worker_loads(role)
                if not loads or len(loads) < state.ready or not self.model.ready:
                    continue  # not every serving worker has reported its load yet
                outlook = self.outlook()
                step, least = reactive_step(self.model, loads, outlook,
                                            cfg.reactive_scale_down_margin, role)
                self.metrics.worker_pressure.labels(role).set(least)
                # What the arrivals of the last few checks need: the queue alone lags a step in
                # load by as long as it takes to build.
                floor = self.rate_floor(role, live, outlook) if least > 1.0 else 0
                if state.ready < state.desired:
                    # A start is under way: more only if the load would still be over target
                    # spread over every worker asked for (or the arrivals need more than were
                    # asked for while every worker is over target), and never a removal.
                    if self.startup.stuck(role) or (pressure(
                            self.model, spread(loads, state.desired), outlook, role) <= 1.0
                            and floor <= state.desired):
                        continue
                    step = 1
                target = state.desired + step
                if step > 0:  # as many as the live load needs, within the bounds and budget
                    target = min(cfg.max_replicas, max(floor, needed(
                        self.model, loads, outlook, state.desired + 1, cfg.max_replicas, role)))
                    while target > state.desired and not self.fits_with(role, target):
                        target -= 1
                    if target <= state.desired:
                        continue
                if step < 0 and not self.planner.may_scale_down(role, target):
                    continue
                if step:
                    await self.scale(role, state.desired, target,
                                     self.seen(role, {"pressure": round(least, 2)}),
                                     reactive=True)

    async def wake_from_zero(self, role: str) -> None:
        """A role at zero workers: start one as soon as a request waits or was refused for want
        of a worker (not at the next predictive interval: a cold start is long enough)."""
        demand = await self.observer.probe(*self.peer_lists())
        self.record_demand(demand)
        if demand is None or (demand.waiting <= 0 and demand.refused <= 0) \
                or not self.fits_with(role, 1):
            return
        self.metrics.scale_from_zero.labels(role).inc()
        await self.scale(role, 0, 1, {"waiting": demand.waiting, "refused": demand.refused},
                         reactive=True)

    def rate_floor(self, role: str, rate: float | None, outlook: Outlook) -> int:
        """Workers of `role` that `rate` requests/s of the predicted size need, each at most
        `REACTIVE_UTILIZATION` busy (0: no rate, or the model cannot answer)."""
        if rate is None or rate <= 0 or outlook.prompt_tokens <= 0:
            return 0
        try:
            needs = self.planner.needs(
                LoadForecast(rate, outlook.prompt_tokens, outlook.output_tokens), self.model)
        except LookupError:
            return 0
        need = (needs.needs.get(role) or 0.0) / REACTIVE_UTILIZATION
        return math.ceil(need - 1e-9)

    def fits_with(self, role: str, replicas: int) -> bool:
        """Whether the role at `replicas`, the others as they are, fits the GPU budget."""
        counts = {r: c.current() for r, c in self.connectors.items()}
        return self.planner.fits_budget(counts | {role: replicas})

    def live_floor(self, role: str, ready: int, desired: int, target: int) -> int:
        """`target`, or more when it is a scale-down the live load would not fit: the fewest
        workers (up to `desired`) over which the workers' latest loads, spread evenly, keep a
        new request under both targets. A forecast must not remove a worker the reactive rule
        would add straight back (a start and a cooldown wasted). Scale to zero is not held."""
        if target >= desired or target == 0 or not self.model.ready:
            return target
        loads = self.worker_loads(role)
        if not loads or len(loads) < ready:
            return target  # not every serving worker has reported: nothing to hold it on
        outlook = self.outlook()
        for workers in range(target, desired):
            if pressure(self.model, spread(loads, workers), outlook, role) <= 1.0:
                return workers
        return desired

    def outlook(self) -> Outlook:
        """What the live loads are judged against: the predicted request (an answer not seen
        yet counts as one gap: every queued chunk then lands on it), the engine, the targets and
        the corrections."""
        isl = self.predictors["input_tokens"].predict()
        osl = self.predictors["output_tokens"].predict()
        return Outlook(isl or 0.0, osl or 2.0, self.limits(), self.planner.slo,
                       Corrections(self.planner.ttft_correction.factor,
                                   self.planner.itl_correction.factor))

    def seen(self, role: str, fields: dict[str, object]) -> dict[str, object]:
        """`fields` plus the corrections and the role's live loads (queued prefill tokens /
        running / KV blocks per worker): what an LLM pool's decision saw, for its log line."""
        return {**fields, "ttft_correction": round(self.planner.ttft_correction.factor, 2),
                "itl_correction": round(self.planner.itl_correction.factor, 2),
                "loads": ";".join(f"{w.prefill_tokens:g}/{w.running:g}/{w.kv_used_blocks:g}"
                                  for w in self.worker_loads(role))}

    def worker_loads(self, role: str) -> list[WorkerLoad]:
        """The latest load of each registered worker of the role, if reported recently."""
        fresh = time.monotonic() - max(2.0, 2 * self.config.reactive_interval_s)
        out = []
        for worker_id, inst in self.workers.items():
            if inst.metadata.get("mode", MODE_AGGREGATED) != role:
                continue
            seen = self.loads.get(worker_id)
            if seen is None or seen[0] < fresh:
                continue
            load = seen[1]
            out.append(WorkerLoad(load.active_prefill_tokens, load.running,
                                  load.kv_used_blocks, load.kv_total_blocks))
        return out

    def model_ttft(self, obs: Observation) -> float | None:
        """The model's TTFT for this interval's mean prompt, at its rate per serving worker
        that prefills (`ReplicaPlanner.model_ttft`: the rate matters to aggregated workers)."""
        if self.model.prefill is None or not obs.input_tokens:
            return None
        role = ROLE_PREFILL if self.planner.disaggregated else ROLE_AGGREGATED
        serving = sum(1 for w in self.workers.values()
                      if w.metadata.get("mode", MODE_AGGREGATED) == role)
        rate = (obs.ended_rate or 0.0) / max(1, serving)  # those whose TTFT was measured
        return self.planner.model_ttft(self.model, obs.input_tokens, rate)

    @staticmethod
    def steady(obs: Observation) -> bool:
        """Whether the requests that ended this interval ran under the load the interval's
        steps show: arrivals within half of endings (the fleet neither filling nor emptying
        within a request's life). The latencies of requests that streamed before a burst
        (or a lull), set against the model at the burst's operating point, would bend the
        corrections just when the reactive rule sizes the answer by them."""
        arrived, ended = obs.request_rate, obs.ended_rate
        if arrived is None or ended is None:
            return True  # no router: nothing to tell a ramp by
        return abs(arrived - ended) <= 0.5 * max(arrived, ended)

    def model_itl(self, obs: Observation) -> float | None:
        """The model's mean gap between a stream's tokens over the steps that decoded while this
        interval's finished requests streamed: each step weighted by the streams it decoded
        (mixed prefill included), over this interval and those back to one mean request's
        duration before it. Clients' ITL is recorded as requests end, so the steps of this
        interval alone describe the load now, not when those requests streamed: a ramp would
        read as a faster engine just when workers are needed."""
        now = self.planner.clock()
        self.decode_history.append((now, obs.decode_steps))
        duration_s = ((obs.ttft_ms or 0.0) + max(0.0, (obs.output_tokens or 1.0) - 1.0)
                      * (obs.itl_ms or 0.0)) / 1000.0
        since = now - obs.interval_s - duration_s
        while self.decode_history and self.decode_history[0][0] <= since:
            self.decode_history.popleft()
        if not self.model.ready:
            return None
        streams = total = 0.0
        for _, steps in self.decode_history:
            for s in steps:
                streams += s.decode_tokens
                total += s.decode_tokens * self.model.step_ms(s.prefill_tokens,
                                                              s.decode_tokens, s.kv_usage)
        return total / streams if streams > 0 else None

    def forecast(self) -> LoadForecast | None:
        m = self.metrics
        rate, isl, osl = (self.predictors[name].predict() for name in SERIES)
        for gauge, value in ((m.predicted_rate, rate), (m.predicted_input, isl),
                             (m.predicted_output, osl)):
            gauge.set(value if value is not None else math.nan)
        if rate is None:
            return None
        if rate <= 0:
            return LoadForecast(0.0, isl or 0.0, osl or 0.0)
        if isl is None or osl is None:
            return None
        return LoadForecast(rate, isl, osl)

    def needs(self, forecast: LoadForecast | None) -> ReplicaNeeds | None:
        if forecast is None:
            return None
        if forecast.request_rate <= 0:  # idle: nothing to serve, whatever the model knows
            return ReplicaNeeds({role: 0.0 for role in self.planner.roles}, None, None)
        if not self.model.ready:
            r = self.model.report
            self._explain(f"the performance model needs engine steps of several sizes in each "
                          f"phase, or a --profile (prefill model: {r.prefill_source}; decode "
                          f"model: {r.decode_source})")
            return None
        try:
            needs = self.planner.needs(forecast, self.model)
        except LookupError as exc:
            self._explain(str(exc))
            return None
        self._explain("")
        for phase, cap in (("prefill", needs.prefill), ("decode", needs.decode)):
            if cap is not None:
                self.metrics.slo_attainable.labels(phase).set(1 if cap.attainable else 0)
        return needs

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, plan until SIGTERM/SIGINT (or a loop fails), then shut down: each step's
        undoing is registered as it is done, and runs in reverse order."""
        cfg = self.config
        async with self.service as service:
            service.install_signal_handlers()
            service.on_shutdown("zmq context", lambda: destroy_context(self.ctx))
            service.on_shutdown("event subscriber", self.subscriber.close)
            secure_context(self.ctx, cfg.keys_dir)
            status = StatusServer(self.metrics.registry, cfg.host, cfg.planner_metrics_port)
            metrics_port = await status.start()
            service.on_shutdown("status server", status.close)
            timeout = max(0.1, min(2.0, cfg.adjustment_interval_s))
            client = httpx.AsyncClient(timeout=timeout)
            service.on_shutdown("http client", client.aclose)
            self.observer = LoadObserver(self.model_name, client, self._scrape_failed)
            self.discovery = open_discovery(cfg.discovery, lease_ttl=cfg.lease_ttl_s)
            service.on_shutdown("discovery", self.discovery.close)
            service.on_shutdown("connectors", self._close_connectors)
            service.on_shutdown("unregister", lambda: self.discovery.unregister(self.planner_id))
            # Know the fleet before the first adjustment, so a running worker is not "missing".
            for inst in await self.discovery.list(role=ROLE_WORKER):
                if inst.model == self.model_name:
                    self.on_worker(inst, gone=False)
            service.spawn("discovery watch", self.watch_discovery())
            service.spawn("events", self.consume_events())
            adjusting = service.spawn("adjustments", self.adjust_forever())
            service.on_shutdown("last adjustment", lambda: self._finish(adjusting))
            host = cfg.advertise_host or cfg.host
            await self.discovery.register(Instance(
                id=self.planner_id, role=ROLE_PLANNER, model=self.model_name,
                endpoints={"metrics": f"http://{host}:{metrics_port}/metrics"},
                metadata={"mode": cfg.planner_mode, "connector": "noop" if cfg.dry_run
                          else cfg.connector, "pid": os.getpid(), "started": time.time(),
                          **identity_metadata(self.ctx)}))
            log.info("planner ready", extra={"fields": {
                "id": self.planner_id, "roles": ",".join(self.connectors),
                "interval_s": cfg.adjustment_interval_s}})
            await service.run()

    async def _finish(self, adjusting: asyncio.Task[None]) -> None:
        """Let an adjustment under way finish (bounded: scrapes time out, and starting a
        process is quick), so a worker being started is tracked and stopped on exit too."""
        done, _ = await asyncio.wait({adjusting}, timeout=self.config.adjustment_interval_s + 10)
        if not done:
            log.warning("adjustment did not finish at shutdown; abandoned")

    async def _close_connectors(self) -> None:
        pools = [*self.connectors.values()]
        if self.encode_connector is not None:
            pools.append(self.encode_connector)
        await asyncio.gather(*(c.close() for c in pools))

    def _explain(self, why: str) -> None:
        """Say why there is no estimate, once per reason rather than every interval."""
        if why and why != self._why:
            log.warning("no replica estimate; holding replica counts",
                        extra={"fields": {"why": repr(why)}})
        self._why = why

    def _failed(self, what: str) -> None:
        """Log a failed loop turn: the first of each kind with its traceback, repeats (an API
        server down for minutes, every reactive tick) at debug level; the metrics count them."""
        exc = sys.exc_info()[1]
        key = f"{what}: {type(exc).__name__}: {exc}"
        if key in self._failures:
            log.debug(f"{what} failed again", extra={"fields": {"error": str(exc)[:200]}})
            return
        self._failures.add(key)
        log.exception(f"{what} failed")

    def _scrape_failed(self, role: str) -> None:
        self.metrics.scrape_errors.labels(role).inc()


def main(argv: Sequence[str] | None = None) -> None:
    run_service(ROLE_PLANNER, [PlannerConfig], _start, argv)


def _start(config: PlannerConfig) -> Coroutine[object, object, None]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per scrape at info
    _check(config)
    try:
        planner = Planner(config)
    except ValueError as exc:  # a malformed profile, ARIMA order or GPU budget
        raise SystemExit(f"turnout planner: {exc}") from exc
    return planner.run()


def _check(config: PlannerConfig) -> None:
    """Refuse settings that cannot plan anything, before any process starts."""
    if config.adjustment_interval_s <= 0:
        raise SystemExit("turnout planner: --adjustment-interval-s must be positive")
    if config.min_replicas < 0 or config.max_replicas < max(1, config.min_replicas):
        raise SystemExit("turnout planner: need 0 <= --min-replicas <= --max-replicas, "
                         "and --max-replicas >= 1")
    if not (config.ttft_slo_ms > 0 and config.itl_slo_ms > 0):  # NaN too
        raise SystemExit("turnout planner: SLOs must be positive")
    for name in ("predictor_window", "model_window", "max_step_tokens", "max_batch"):
        if getattr(config, name) < 1:
            raise SystemExit(f"turnout planner: --{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(config, name)}")
    for name in ("scale_down_cooldown_s", "worker_stop_timeout_s"):
        if not getattr(config, name) >= 0:
            raise SystemExit(f"turnout planner: --{name.replace('_', '-')} must be >= 0, got "
                             f"{getattr(config, name)}")
    if not 0 < config.kv_usage_limit <= 1:
        raise SystemExit(f"turnout planner: --kv-usage-limit must lie in (0, 1], got "
                         f"{config.kv_usage_limit}")
    if config.reactive_interval_s < 0:
        raise SystemExit("turnout planner: --reactive-interval-s must be >= 0 (0: off)")
    if not 0 < config.reactive_scale_down_margin < 1:
        raise SystemExit("turnout planner: --reactive-scale-down-margin must be between 0 and 1")
    if config.ready_timeout_s <= 0:
        raise SystemExit("turnout planner: --ready-timeout-s must be positive")
    try:  # checked whichever predictor runs: a flag is never accepted and ignored
        order = parse_arima_order(config.arima_order)
    except ValueError as exc:
        raise SystemExit(f"turnout planner: --arima-order: {exc}") from exc
    if config.arima_window < arima_min_observations(order):
        raise SystemExit(f"turnout planner: --arima-window must be at least "
                         f"{arima_min_observations(order)} for --arima-order {config.arima_order}")
    if not 0 <= config.encode_min_replicas <= config.encode_max_replicas \
            and (config.encode_max_replicas or config.encode_min_replicas):
        raise SystemExit("turnout planner: need 0 <= --encode-min-replicas <= "
                         "--encode-max-replicas")
    if config.encode_latency_slo_ms <= 0:
        raise SystemExit("turnout planner: --encode-latency-slo-ms must be positive")
    if config.max_gpus < 0 or config.gpus_per_worker < 1:
        raise SystemExit("turnout planner: need --max-gpus >= 0 and --gpus-per-worker >= 1")
    _refuse_workers_that_cannot_start(config)


def _refuse_workers_that_cannot_start(config: PlannerConfig) -> None:
    """Worker flags the local connector would start every worker with, checked up front: a
    quoting error, or an engine that cannot take its pool's role, would otherwise only show as
    each worker it starts exiting."""
    if config.dry_run or config.connector != "local":
        return
    roles = [(MODE_AGGREGATED, "--worker-args", config.worker_args)]
    if config.planner_mode == "disaggregated":
        roles = [(MODE_PREFILL, "--prefill-worker-args", config.prefill_worker_args),
                 (MODE_DECODE, "--decode-worker-args", config.decode_worker_args)]
    for mode, flag, args in [*roles, (MODE_ENCODE, "--encode-worker-args",
                                      config.encode_worker_args)]:
        flag, args = (flag, args) if args else ("--worker-args", config.worker_args)
        try:
            argv = shlex.split(args)
        except ValueError as exc:
            raise SystemExit(f"turnout planner: {flag}: {exc}") from exc
        if refusal := split_refusal(engine_named_in(argv), mode):
            raise SystemExit(f"turnout planner: {refusal}" + (f" (from {flag})" if args else ""))
