"""One interval's measured load from scraped counters and forward-pass sums."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client import generate_latest

from common.messages import ROLE_FRONTEND, ROLE_ROUTER, Instance
from services.frontend.metrics import FrontendMetrics, ModelMetrics
from services.planner.load_observer import CounterDeltas, Demand, LoadObserver, parse_samples
from services.planner.performance_model import StepSample
from services.router.metrics import RouterMetrics


def router_text(finished: float, rejected: float = 0.0) -> str:
    return ("# HELP turnout_router_requests_total Requests by outcome\n"
            "# TYPE turnout_router_requests_total counter\n"
            f'turnout_router_requests_total{{outcome="finished"}} {finished}\n'
            f'turnout_router_requests_total{{outcome="rejected"}} {rejected}\n')


def frontend_text(requests: float, prompt: float, cached: float, output: float,
                  ttft: tuple[float, float], itl: tuple[float, float]) -> str:
    """A frontend's exposition; every series also has another model's samples to ignore."""
    lines = []
    for model, k in (("mock", 1.0), ("other", 1000.0)):
        lines += [
            f'turnout_frontend_request_duration_seconds_count{{endpoint="chat",model="{model}"}}'
            f" {requests * k}",
            f'turnout_frontend_input_tokens_total{{model="{model}"}} {prompt * k}',
            f'turnout_frontend_cached_tokens_total{{model="{model}"}} {cached * k}',
            f'turnout_frontend_output_tokens_total{{model="{model}"}} {output * k}']
        for name, (total, n) in (("turnout_frontend_time_to_first_token_seconds", ttft),
                                 ("turnout_frontend_inter_token_latency_seconds", itl)):
            lines += [f'{name}_count{{model="{model}"}} {n * k}',
                      f'{name}_sum{{model="{model}"}} {total * k}']
    return "\n".join(lines) + "\n"


def test_counter_deltas_baseline_and_reset() -> None:
    d = CounterDeltas()
    assert d.delta("r1", "x", 100.0) is None  # first sight: baseline only
    assert d.delta("r1", "x", 130.0) == 30.0
    assert d.delta("r1", "x", 5.0) == 5.0  # went down: the process restarted
    d.forget("r1")
    assert d.delta("r1", "x", 9.0) is None


def test_parse_samples_keeps_only_what_the_planner_reads() -> None:
    samples = parse_samples(router_text(3) + "# TYPE other_total counter\nother_total 4\n")
    assert {(n, labels["outcome"], v) for n, labels, v in samples} == {
        ("turnout_router_requests_total", "finished", 3.0),
        ("turnout_router_requests_total", "rejected", 0.0)}


class Pages:
    """Metrics pages served over a mock transport; unknown URLs answer 404."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        text = self.pages.get(str(request.url))
        return httpx.Response(200, text=text) if text is not None else httpx.Response(404)


ROUTER = Instance("r1", ROLE_ROUTER, endpoints={"metrics": "http://r/metrics"})
FRONTEND = Instance("f1", ROLE_FRONTEND, endpoints={"metrics": "http://f/metrics"})
GONE = Instance("r2", ROLE_ROUTER, endpoints={"metrics": "http://gone/metrics"})
STEPS = [StepSample(2000, 0, 0.1, 30.0), StepSample(0, 8, 0.1, 10.0),
         StepSample(2000, 4, 0.2, 40.0)]


@pytest.mark.asyncio
async def test_collect_turns_scrapes_into_rates_lengths_and_latencies() -> None:
    web = Pages()
    web.pages["http://r/metrics"] = router_text(10, 0)
    web.pages["http://f/metrics"] = frontend_text(10, 5000, 1000, 800, (1.0, 10), (0.1, 10))
    errors: list[str] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(web.handler)) as client:
        obs = LoadObserver("mock", client, errors.append)
        first = await obs.collect([ROUTER, GONE], [FRONTEND])
        assert first.request_rate is None and first.ttft_ms is None  # baselines only
        assert errors == ["router"]

        await asyncio.sleep(0.2)
        # 24 requests ended at the router (4 rejected); the frontend saw 20 with 20 x 1500
        # prompt tokens of which 20 x 500 cached, and 16 of them generated 1600 tokens.
        web.pages["http://r/metrics"] = router_text(30, 4)
        web.pages["http://f/metrics"] = frontend_text(
            30, 5000 + 30000, 1000 + 10000, 800 + 1600, (1.0 + 16 * 0.25, 26),
            (0.1 + 16 * 0.02, 26))
        obs.add_steps(STEPS)
        second = await obs.collect([ROUTER, GONE], [FRONTEND])
    assert second.interval_s >= 0.2
    assert second.request_rate == pytest.approx(24 / second.interval_s)
    assert second.input_tokens == pytest.approx(1000.0)  # uncached
    assert second.output_tokens == pytest.approx(100.0)
    assert second.ttft_ms == pytest.approx(250.0)
    assert second.itl_ms == pytest.approx(20.0)
    assert [s.decode_tokens for s in second.decode_steps] == [8, 4]
    assert errors == ["router", "router"]


@pytest.mark.asyncio
async def test_without_frontends_lengths_come_from_forward_passes() -> None:
    web = Pages()
    web.pages["http://r/metrics"] = router_text(10, 0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(web.handler)) as client:
        obs = LoadObserver("mock", client)
        await obs.collect([ROUTER], [])
        web.pages["http://r/metrics"] = router_text(30, 4)
        obs.add_steps(STEPS)
        obs_ = await obs.collect([ROUTER], [])
    assert obs_.input_tokens == pytest.approx(4000 / 20)  # rejected requests computed nothing
    assert obs_.output_tokens == pytest.approx(12 / 20)
    assert obs_.ttft_ms is None and obs_.itl_ms is None


@pytest.mark.asyncio
async def test_probe_reads_demand_from_the_frontends_own_gauges() -> None:
    """Demand a planner scaled to zero can see: requests held for a first token. Exposition from
    the frontend's and router's own metrics classes, so a renamed series fails here."""
    frontend, router = FrontendMetrics(), RouterMetrics("r1")
    mine, other = ModelMetrics(frontend, "mock"), ModelMetrics(frontend, "other")
    web = Pages()

    def publish() -> None:
        web.pages["http://f/metrics"] = generate_latest(frontend.registry).decode()
        web.pages["http://r/metrics"] = generate_latest(router.registry).decode()

    publish()
    async with httpx.AsyncClient(transport=httpx.MockTransport(web.handler)) as client:
        obs = LoadObserver("mock", client)
        assert await obs.probe([ROUTER], [FRONTEND]) == Demand(0, 0)
        assert (await obs.probe([ROUTER], [FRONTEND])).idle  # type: ignore[union-attr]
        for _ in range(3):  # three requests parked at the router: no worker yet
            mine.active.inc()
            mine.queued.inc()
        other.active.inc()  # another model's request is not ours
        publish()
        assert await obs.probe([ROUTER], [FRONTEND]) == Demand(3, 3)
        mine.queued.dec()  # one got its first token
        publish()
        demand = await obs.probe([ROUTER], [FRONTEND])
        assert demand == Demand(2, 3) and not demand.idle
        # Without a frontend (a gateway in front of the router): the router's in-flight table.
        router.inflight.set(5)
        publish()
        assert await obs.probe([ROUTER], []) == Demand(0, 5)
        assert await obs.probe([GONE], []) is None, "nobody answered: unknown, not idle"
        # Today's frontend refuses requests while no worker serves any model: counted.
        frontend.rejected("no_workers")
        frontend.rejected("no_workers")
        frontend.rejected("invalid")  # a bad request is no demand for a worker
        publish()
        assert await obs.probe([ROUTER], [FRONTEND]) == Demand(2, 3, refused=2)
        assert await obs.probe([ROUTER], [FRONTEND]) == Demand(2, 3, refused=0)
        # collect() carries the same reading; refusals count from its own first reading.
        assert (await obs.collect([ROUTER], [FRONTEND])).demand == Demand(2, 3, refused=0)
        frontend.rejected("no_workers")
        publish()
        assert (await obs.collect([ROUTER], [FRONTEND])).demand == Demand(2, 3, refused=1)
        assert await obs.probe([ROUTER], [FRONTEND]) == Demand(2, 3, refused=1)


@pytest.mark.asyncio
async def test_the_rate_counts_arrivals_not_only_requests_that_ended() -> None:
    """A ramp: 4 requests ended but 10 more are in flight than at the last scrape, so 14
    arrived. Then the ramp is over: 8 ended, 6 fewer in flight, 2 arrived."""
    web = Pages()

    def page(ended: float, inflight: float) -> str:
        return router_text(ended) + ("# TYPE turnout_router_inflight_requests gauge\n"
                                     f"turnout_router_inflight_requests {inflight}\n")

    web.pages["http://r/metrics"] = page(100, 3)
    async with httpx.AsyncClient(transport=httpx.MockTransport(web.handler)) as client:
        obs = LoadObserver("mock", client)
        await obs.collect([ROUTER], [])
        await asyncio.sleep(0.1)
        web.pages["http://r/metrics"] = page(104, 13)
        ramp = await obs.collect([ROUTER], [])
        await asyncio.sleep(0.1)
        web.pages["http://r/metrics"] = page(112, 7)
        after = await obs.collect([ROUTER], [])
    assert ramp.request_rate == pytest.approx(14 / ramp.interval_s)
    assert after.request_rate == pytest.approx(2 / after.interval_s)


def router_live(ended: float, inflight: float) -> str:
    return router_text(ended) + ("# TYPE turnout_router_inflight_requests gauge\n"
                                 f"turnout_router_inflight_requests {inflight}\n")


@pytest.mark.asyncio
async def test_the_live_rate_counts_arrivals_over_its_window_and_starts_over_on_a_restart(
        ) -> None:
    web = Pages()
    web.pages["http://r/metrics"] = router_live(10, 2)
    async with httpx.AsyncClient(transport=httpx.MockTransport(web.handler)) as client:
        obs = LoadObserver("mock", client)
        assert await obs.live_rate([ROUTER], window_s=0.4) is None  # one reading spans nothing
        await asyncio.sleep(0.12)
        # 6 ended and 5 more in flight: 11 arrivals (an ended one had been in flight).
        web.pages["http://r/metrics"] = router_live(16, 7)
        t0 = obs._arrivals[0][0]
        rate = await obs.live_rate([ROUTER], window_s=0.4)
        span = obs._arrivals[-1][0] - t0
        assert rate == pytest.approx(11 / span)
        # Readings older than the window leave it: the rate is the recent one.
        await asyncio.sleep(0.45)
        web.pages["http://r/metrics"] = router_live(17, 8)
        await obs.live_rate([ROUTER], window_s=0.4)
        await asyncio.sleep(0.12)  # nothing new: the window's last half never reads higher
        rate = await obs.live_rate([ROUTER], window_s=0.4)
        (t1, first), *_, (t3, last) = obs._arrivals
        assert (first, last) == (23, 25)  # from the first reading older than the window
        assert rate == pytest.approx(2 / (t3 - t1))
        # The router restarted (its counters went down): no rate until the window refills.
        web.pages["http://r/metrics"] = router_live(0, 1)
        assert await obs.live_rate([ROUTER], window_s=0.4) is None
        # A router that does not answer says nothing either.
        assert await obs.live_rate([ROUTER, GONE], window_s=0.4) is None


@pytest.mark.asyncio
async def test_a_rise_in_arrivals_shows_from_the_last_half_of_the_window() -> None:
    """Readings 0.6 s apart over a 1 s window: arrivals that jump in the newest half
    count at their own rate (not diluted by the quiet readings before); a drop is not."""
    web = Pages()
    web.pages["http://r/metrics"] = router_live(0, 0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(web.handler)) as client:
        obs = LoadObserver("mock", client)
        await obs.live_rate([ROUTER], window_s=1.0)
        await asyncio.sleep(0.6)
        web.pages["http://r/metrics"] = router_live(1, 0)
        await obs.live_rate([ROUTER], window_s=1.0)
        await asyncio.sleep(0.6)
        web.pages["http://r/metrics"] = router_live(1, 20)  # 20 arrive at once
        rate = await obs.live_rate([ROUTER], window_s=1.0)
        (t0, _), (t1, _), (t2, _) = obs._arrivals
        assert rate == pytest.approx(20 / (t2 - t1)) and rate > 21 / (t2 - t0)
        await asyncio.sleep(0.6)
        web.pages["http://r/metrics"] = router_live(21, 0)  # nothing new: the whole window
        rate = await obs.live_rate([ROUTER], window_s=1.0)
        (t0, _), *_, (t3, _) = obs._arrivals
        assert rate == pytest.approx(20 / (t3 - t0))


@pytest.mark.asyncio
async def test_hand_off_gaps_are_taken_out_of_the_decode_itl() -> None:
    """A disaggregated stream's first gap is its KV hand-off, not a decode step: the ITL the
    decode pool is judged by leaves it out (a held first token's gap, none, too). Exposition
    from the frontend's and router's own metrics classes, so a renamed series fails here."""
    frontend, router = FrontendMetrics(), RouterMetrics("r1")
    mine = ModelMetrics(frontend, "mock")
    web = Pages()

    def publish() -> None:
        web.pages["http://f/metrics"] = generate_latest(frontend.registry).decode()
        web.pages["http://r/metrics"] = generate_latest(router.registry).decode()

    def serve(answers: int, tokens: int, handoff_s: float, held: int, gap_s: float) -> None:
        """`answers` streams of `tokens` tokens, each handed off (`held` of them with the first
        token held back to go out with the second); every other gap `gap_s`."""
        for i in range(answers):
            router.disagg_handoff_seconds.observe(handoff_s)
            first = 0.0 if i < held else handoff_s
            mine.output_tokens.inc(tokens)
            mine.ttft.observe(0.1)
            mine.itl.observe((first + (tokens - 2) * gap_s) / (tokens - 1))
        router.disagg_handoffs.labels("first_token_held").inc(held)

    publish()
    async with httpx.AsyncClient(transport=httpx.MockTransport(web.handler)) as client:
        obs = LoadObserver("mock", client)
        await obs.collect([ROUTER], [FRONTEND])  # baselines
        serve(10, 11, 0.05, 4, 0.01)  # 6 first gaps of 50 ms seen, 4 of none; 90 of 10 ms
        publish()
        long = await obs.collect([ROUTER], [FRONTEND])
        serve(10, 2, 0.05, 0, 0.01)  # two-token answers: every gap a hand-off
        publish()
        short = await obs.collect([ROUTER], [FRONTEND])
        publish()
        none = await obs.collect([ROUTER], [FRONTEND])
    assert long.itl_ms == pytest.approx((6 * 50 + 90 * 10) / 100)
    assert long.decode_itl_ms == pytest.approx(10.0)
    assert short.itl_ms == pytest.approx(50.0) and short.decode_itl_ms is None
    assert none.itl_ms is None and none.decode_itl_ms is None
