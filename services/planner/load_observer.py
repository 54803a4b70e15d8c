"""What the fleet actually served in one adjustment interval.

Sources, the simplest honest ones available:
- request rate: arrivals at the routers, i.e. the requests that ended
  (`turnout_router_requests_total`, every outcome) plus the growth of those in flight
  (`turnout_router_inflight_requests`), both from one scrape of each router's /metrics.
  Requests that ended alone lag arrivals by a request's duration, which on a ramp is the
  difference between a worker in time and one late.
- per-request lengths and latencies: the frontends' counters and histograms (their /metrics),
  all recorded as a request ends, so one interval's numerators and denominators describe the same
  requests: input length = (prompt - cached tokens) / requests, i.e. the *uncached* prompt tokens
  that cost prefill capacity; output length = generated tokens / requests that generated any;
  TTFT and inter-token latency = the mean of the interval's samples.
- the prefill-to-decode hand-offs (`turnout_router_disagg_handoff_seconds`, and how many of
  those first tokens the routers held back to go out with the second): a disaggregated
  stream's first gap is the KV hand-off, not a decode step, so `decode_itl_ms` takes those gaps
  out of the clients' inter-token latency (what the decode pool's correction is learned from).
- without a frontend to scrape (a gateway talking to the router directly), lengths fall back to
  the workers' forward-pass records (`fpm`): tokens computed in the interval / requests ended.
  Those are attributed when computed, not when their request ends, so they are biased while the
  load ramps.
- the forward-pass records that decoded also come back, so the planner can compare the model's
  step times with the latency clients saw.
- the encode stage (`encode_pool`): the routers' images by path (encode pool or in-line) and
  their encode-stage latency histogram (`turnout_router_encode_seconds`), per interval.
- the live arrival rate (`live_rate`, each reactive check): the routers' arrivals (ended plus in
  flight) over about the last few reactive checks, or the last half of them when that is
  higher, so a step in load sizes the reactive answer before the interval's forecast sees it.
- demand right now (`probe`, and with every interval): requests waiting for a first token at
  the frontends (`turnout_frontend_queued_requests`, which includes requests a router holds
  while no worker serves the model), requests in flight (the frontends' active requests, else the
  routers' in-flight table), and requests the frontends refused because no worker served any
  model (`turnout_frontend_rejections_total{reason="no_workers"}`, since the last reading; that
  counter has no model label). This is what a planner scaled to zero sees.

Counters are turned into per-interval increases per scraped instance; the first scrape of an
instance is only a baseline (it may have run long before the planner), and a counter that went
down means its process restarted.

Owns scraping, counter deltas and the interval's sums. Does not own predicting (`load_predictor`)
or the forward-pass subscription (`main` feeds `add_steps`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx

from common import prometheus_text
from common.messages import ROLE_FRONTEND, ROLE_ROUTER, Instance
from services.planner.encode_pool import EncodeStage
from services.planner.performance_model import StepSample

log = logging.getLogger("turnout.planner")

ROUTER_REQUESTS = "turnout_router_requests_total"
FRONTEND_REQUESTS = "turnout_frontend_request_duration_seconds_count"
FRONTEND_INPUT = "turnout_frontend_input_tokens_total"
FRONTEND_CACHED = "turnout_frontend_cached_tokens_total"
FRONTEND_OUTPUT = "turnout_frontend_output_tokens_total"
FRONTEND_TTFT_SUM = "turnout_frontend_time_to_first_token_seconds_sum"
FRONTEND_TTFT_COUNT = "turnout_frontend_time_to_first_token_seconds_count"
FRONTEND_ITL_SUM = "turnout_frontend_inter_token_latency_seconds_sum"
FRONTEND_ITL_COUNT = "turnout_frontend_inter_token_latency_seconds_count"
ROUTER_INFLIGHT = "turnout_router_inflight_requests"
FRONTEND_QUEUED = "turnout_frontend_queued_requests"
FRONTEND_ACTIVE = "turnout_frontend_active_requests"
FRONTEND_REJECTIONS = "turnout_frontend_rejections_total"
ROUTER_IMAGES = "turnout_router_images_total"
ROUTER_ENCODE_SUM = "turnout_router_encode_seconds_sum"
ROUTER_ENCODE_COUNT = "turnout_router_encode_seconds_count"
ROUTER_HANDOFF_SUM = "turnout_router_disagg_handoff_seconds_sum"
ROUTER_HANDOFF_COUNT = "turnout_router_disagg_handoff_seconds_count"
ROUTER_HANDOFFS = "turnout_router_disagg_handoffs_total"
HELD = "first_token_held"  # a hand-off whose first token went out with the second: no gap
NO_WORKERS = "no_workers"  # the frontend's rejection reason when no worker serves any model
FRONTEND_SERIES = (FRONTEND_REQUESTS, FRONTEND_INPUT, FRONTEND_CACHED, FRONTEND_OUTPUT,
                   FRONTEND_TTFT_SUM, FRONTEND_TTFT_COUNT, FRONTEND_ITL_SUM, FRONTEND_ITL_COUNT)
_WANTED = {ROUTER_REQUESTS, ROUTER_INFLIGHT, FRONTEND_QUEUED, FRONTEND_ACTIVE,
           FRONTEND_REJECTIONS, ROUTER_IMAGES, ROUTER_ENCODE_SUM, ROUTER_ENCODE_COUNT,
           ROUTER_HANDOFF_SUM, ROUTER_HANDOFF_COUNT, ROUTER_HANDOFFS, *FRONTEND_SERIES}

Sample = tuple[str, dict[str, str], float]  # name, labels, value


@dataclass(frozen=True, slots=True)
class Observation:
    interval_s: float
    request_rate: float | None  # arrivals/s; None: no router gave a delta this interval
    input_tokens: float | None  # uncached prompt tokens per request; None: no request ended
    output_tokens: float | None
    ttft_ms: float | None  # None: no frontend sample this interval
    itl_ms: float | None
    decode_steps: list[StepSample] = field(default_factory=list)  # steps that decoded
    demand: Demand | None = None  # None: no router or frontend answered
    encode: EncodeStage | None = None  # None: no router gave a delta this interval
    ended_rate: float | None = None  # requests/s that ended (what the latencies describe)
    itl_requests: float = 0.0  # the requests behind itl_ms (two tokens or more)
    handoffs: float = 0.0  # first gaps that were a prefill-to-decode hand-off
    handoff_gap_ms: float = 0.0  # their sum as clients saw it (a held first token: none)

    @property
    def decode_itl_ms(self) -> float | None:
        """The mean gap between a stream's tokens with the hand-offs' first gaps taken out:
        what decode steps gave clients. Those gaps are KV transfer and scheduling (a held first
        token shows none), which decode workers do not buy down; judged as decode steps, long
        prompts with short answers read as a slow decode pool. None when the interval's gaps
        were (nearly) all hand-offs. Per-request means are weighted by the mean answer: exact
        when the answers are of one length."""
        if self.itl_ms is None or self.handoffs <= 0 or self.itl_requests <= 0:
            return self.itl_ms
        gaps = self.itl_requests * max(1.0, (self.output_tokens or 2.0) - 1.0)
        left = gaps - self.handoffs
        if left < 0.5 * self.itl_requests:
            return None
        total = self.itl_ms * gaps - self.handoff_gap_ms
        return total / left if total > 0 else None


@dataclass(frozen=True, slots=True)
class Demand:
    """Requests of the model at the frontends and routers at one moment (gauges)."""

    waiting: float  # sent, no first token yet (incl. held by a router for want of a worker)
    in_flight: float  # waiting or generating
    refused: float = 0.0  # refused for want of any worker since the previous reading

    @property
    def idle(self) -> bool:
        return self.waiting <= 0 and self.in_flight <= 0 and self.refused <= 0


class CounterDeltas:
    """Increase of counters between scrapes, per (instance, series)."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], float] = {}

    def delta(self, instance_id: str, series: str, value: float) -> float | None:
        key = (instance_id, series)
        last = self.last.get(key)
        self.last[key] = value
        if last is None:
            return None
        return value - last if value >= last else value  # went down: restarted from zero

    def forget(self, instance_id: str) -> None:
        for key in [k for k in self.last if k[0] == instance_id]:
            del self.last[key]


def parse_samples(text: str) -> list[Sample]:
    """The samples of the series the planner reads, from Prometheus text exposition."""
    metrics = prometheus_text.parse(text)
    return [(s.name, s.labels, s.value) for name in _WANTED for s in metrics.samples(name)]


class LoadObserver:
    def __init__(self, model: str, client: httpx.AsyncClient,
                 on_scrape_error: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.client = client
        self.on_scrape_error = on_scrape_error
        self.deltas = CounterDeltas()
        self.inflight: dict[str, float] = {}  # router → requests in flight at its last scrape
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.decode_steps: list[StepSample] = []
        self._since = time.monotonic()
        self._warned: set[str] = set()
        # (time, requests that reached the routers so far) at each live_rate reading
        self._arrivals: deque[tuple[float, float]] = deque()
        self._arrival_routers: frozenset[str] = frozenset()

    def add_steps(self, samples: Iterable[StepSample]) -> None:
        for s in samples:
            self.prefill_tokens += s.prefill_tokens
            self.decode_tokens += s.decode_tokens
            if s.decode_tokens > 0:
                self.decode_steps.append(s)

    def forget(self, instance_id: str) -> None:
        self.deltas.forget(instance_id)
        self.inflight.pop(instance_id, None)
        self._warned.discard(instance_id)

    async def collect(self, routers: list[Instance], frontends: list[Instance]) -> Observation:
        """Close the interval: scrape, difference the counters, reset the sums."""
        now = time.monotonic()
        interval = max(1e-6, now - self._since)
        self._since = now
        prefill, decode, steps = self.prefill_tokens, self.decode_tokens, self.decode_steps
        self.prefill_tokens = self.decode_tokens = 0
        self.decode_steps = []
        targets = [i for i in (*routers, *frontends) if i.endpoints.get("metrics")]
        scraped = await asyncio.gather(*(self._scrape(i) for i in targets))
        arrived = ended = served = 0.0
        router_seen = frontend_seen = False
        f = dict.fromkeys(FRONTEND_SERIES, 0.0)  # summed increases over the frontends
        enc = {"encode_pool": 0.0, "inline": 0.0, "sum": 0.0, "count": 0.0}  # over routers
        encode_seen = False
        handoff = {"sum": 0.0, "count": 0.0, "held": 0.0}  # over routers
        for inst, samples in zip(targets, scraped, strict=True):
            if samples is None:
                continue
            if inst.role == ROLE_ROUTER:
                total = sum(v for n, _, v in samples if n == ROUTER_REQUESTS)
                ok = sum(v for n, labels, v in samples
                         if n == ROUTER_REQUESTS and labels.get("outcome") != "rejected")
                d_total = self.deltas.delta(inst.id, "requests", total)
                d_ok = self.deltas.delta(inst.id, "served", ok)
                inflight = sum(v for n, _, v in samples if n == ROUTER_INFLIGHT)
                before = self.inflight.get(inst.id)
                self.inflight[inst.id] = inflight
                if d_total is not None and d_ok is not None:
                    router_seen = True
                    grown = inflight - before if before is not None else 0.0
                    arrived += max(0.0, d_total + grown)  # < 0 only across a restart
                    ended += d_total
                    served += d_ok
                encode_seen |= self._add_deltas(inst.id, "encode_", self._encode_totals(samples),
                                                enc)
                self._add_deltas(inst.id, "handoff_", self._handoff_totals(samples), handoff)
            elif inst.role == ROLE_FRONTEND:
                frontend_seen |= self._add_deltas(inst.id, "", self._frontend_totals(samples), f)
        if frontend_seen:
            requests, generating = f[FRONTEND_REQUESTS], f[FRONTEND_TTFT_COUNT]
            uncached = max(0.0, f[FRONTEND_INPUT] - f[FRONTEND_CACHED])
            input_tokens = uncached / requests if requests > 0 else None
            output_tokens = f[FRONTEND_OUTPUT] / generating if generating > 0 else None
        else:
            input_tokens = prefill / served if served > 0 else None
            output_tokens = decode / served if served > 0 else None
        ttft_n, itl_n = f[FRONTEND_TTFT_COUNT], f[FRONTEND_ITL_COUNT]
        return Observation(
            demand=self._demand(targets, scraped, "collect"),
            interval_s=interval,
            request_rate=arrived / interval if router_seen else None,
            ended_rate=ended / interval if router_seen else None,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            ttft_ms=1000.0 * f[FRONTEND_TTFT_SUM] / ttft_n if ttft_n > 0 else None,
            itl_ms=1000.0 * f[FRONTEND_ITL_SUM] / itl_n if itl_n > 0 else None,
            decode_steps=steps,
            itl_requests=itl_n,
            handoffs=handoff["count"],
            # A held first token's gap was none: the rest are taken at the hand-offs' mean.
            handoff_gap_ms=1000.0 * handoff["sum"] * max(0.0, 1.0 - handoff["held"]
                                                          / handoff["count"])
            if handoff["count"] > 0 else 0.0,
            encode=EncodeStage(
                enc["encode_pool"] / interval, enc["inline"] / interval,
                1000.0 * enc["sum"] / enc["count"] if enc["count"] > 0 else None,
            ) if encode_seen else None,
        )

    def _add_deltas(self, instance_id: str, prefix: str, totals: dict[str, float],
                    out: dict[str, float]) -> bool:
        """Add one instance's increases of `totals` to `out`; False on its baseline scrape."""
        deltas = {k: self.deltas.delta(instance_id, prefix + k, v) for k, v in totals.items()}
        if any(d is None for d in deltas.values()):
            return False
        for k, d in deltas.items():
            out[k] += d or 0.0
        return True

    @staticmethod
    def _encode_totals(samples: list[Sample]) -> dict[str, float]:
        """A router's images by path and its encode-stage latency sum and count."""
        totals = {"encode_pool": 0.0, "inline": 0.0, "sum": 0.0, "count": 0.0}
        for name, labels, v in samples:
            if name == ROUTER_IMAGES and labels.get("path") in ("encode_pool", "inline"):
                totals[labels["path"]] += v
            elif name == ROUTER_ENCODE_SUM:
                totals["sum"] += v
            elif name == ROUTER_ENCODE_COUNT:
                totals["count"] += v
        return totals

    @staticmethod
    def _handoff_totals(samples: list[Sample]) -> dict[str, float]:
        """A router's hand-off latency sum and count, and its first tokens held back."""
        totals = {"sum": 0.0, "count": 0.0, "held": 0.0}
        for name, labels, v in samples:
            if name == ROUTER_HANDOFF_SUM:
                totals["sum"] += v
            elif name == ROUTER_HANDOFF_COUNT:
                totals["count"] += v
            elif name == ROUTER_HANDOFFS and labels.get("outcome") == HELD:
                totals["held"] += v
        return totals

    async def live_rate(self, routers: list[Instance], window_s: float) -> float | None:
        """Requests/s that reached the routers over about the last `window_s` (ended, any
        outcome, plus the growth of those in flight), or over its last half when that is
        higher; None until readings span a quarter of the window. A router that came, went,
        restarted or did not answer starts it over."""
        targets = [i for i in routers if i.endpoints.get("metrics")]
        scraped = await asyncio.gather(*(self._scrape(i) for i in targets))
        now = time.monotonic()
        ids = frozenset(i.id for i in targets)
        if not targets or any(s is None for s in scraped):
            self._arrivals.clear()
            return None
        total = sum(v for samples in scraped if samples is not None
                    for n, _, v in samples if n in (ROUTER_REQUESTS, ROUTER_INFLIGHT))
        if ids != self._arrival_routers or (self._arrivals and total < self._arrivals[-1][1]):
            self._arrivals.clear()
        self._arrival_routers = ids
        self._arrivals.append((now, total))
        while len(self._arrivals) > 2 and now - self._arrivals[1][0] >= window_s:
            self._arrivals.popleft()
        t0, then = self._arrivals[0]
        if now - t0 < window_s / 4:
            return None
        rate = (total - then) / (now - t0)
        # A step up in arrivals shows in the newest readings first: the window's last half
        # answers a burst's onset as soon as it has seen it; a drop waits for the whole window.
        for t, count in reversed(self._arrivals):
            if now - t >= window_s / 2:
                if t > t0:
                    rate = max(rate, (total - count) / (now - t))
                break
        return rate

    async def probe(self, routers: list[Instance], frontends: list[Instance]) -> Demand | None:
        """Demand now, from gauges only (counters and the interval are left alone)."""
        targets = [i for i in (*routers, *frontends) if i.endpoints.get("metrics")]
        scraped = await asyncio.gather(*(self._scrape(i) for i in targets))
        return self._demand(targets, scraped, "probe")

    def _demand(self, targets: list[Instance], scraped: list[list[Sample] | None],
                reader: str) -> Demand | None:
        """Frontends count what they hold for this model; without one answering, the routers'
        in-flight tables (every model: a router's gauge has no model label) stand in. `reader`
        keeps the refusal deltas of `probe` and `collect` apart."""
        waiting = active = inflight = refused = 0.0
        frontend_seen = router_seen = False
        for inst, samples in zip(targets, scraped, strict=True):
            if samples is None:
                continue
            if inst.role == ROLE_FRONTEND:
                frontend_seen = True
                for name, labels, value in samples:
                    if labels.get("model", self.model) != self.model:
                        continue
                    if name == FRONTEND_QUEUED:
                        waiting += value
                    elif name == FRONTEND_ACTIVE:
                        active += value
                # No sample yet is a count of 0: the series appears with the first refusal.
                total = sum(v for n, labels, v in samples
                            if n == FRONTEND_REJECTIONS and labels.get("reason") == NO_WORKERS)
                refused += self.deltas.delta(inst.id, f"{reader}:{NO_WORKERS}", total) or 0.0
            elif inst.role == ROLE_ROUTER:
                router_seen = True
                inflight += sum(v for n, _, v in samples if n == ROUTER_INFLIGHT)
        if frontend_seen:
            return Demand(waiting, max(active, waiting), refused)
        if router_seen:
            return Demand(0.0, inflight)
        return None

    def _frontend_totals(self, samples: list[Sample]) -> dict[str, float]:
        """This model's value of each frontend series (summed over its other labels)."""
        totals = dict.fromkeys(FRONTEND_SERIES, 0.0)
        for name, labels, value in samples:
            if name in totals and labels.get("model", self.model) == self.model:
                totals[name] += value
        return totals

    async def _scrape(self, inst: Instance) -> list[Sample] | None:
        url = inst.endpoints["metrics"]
        try:
            resp = await self.client.get(url)
            resp.raise_for_status()
            return parse_samples(resp.text)
        except (httpx.HTTPError, ValueError) as exc:
            if self.on_scrape_error is not None:
                self.on_scrape_error(inst.role)
            if inst.id not in self._warned:  # once per instance: a dead peer is not news twice
                self._warned.add(inst.id)
                log.warning("metrics scrape failed", extra={"fields": {
                    "instance": inst.id, "url": url, "error": str(exc) or type(exc).__name__}})
            return None
