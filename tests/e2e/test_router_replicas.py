"""Router replicas with real processes and real signals: a router killed, frozen or stopped
mid-stream costs no stream a token; a frontend killed mid-stream leaves no work running.

Two routers, two mocker workers (speed-up 1), 32 streams x 512 tokens with ignore_eos. The
mocker is deterministic and the byte tokenizer maps a token to a character, so equal texts mean
equal token ids. Each fault is injected once the victim router is observed carrying streams.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable

import openai
import pytest

from turnout.testing.deployment import Deployment, Service, requests_on, wait_for

pytestmark = pytest.mark.e2e

STREAMS = 32
TOKENS = 512
Fault = Callable[[], Awaitable[None]]
WORKER_ARGS = ("--speedup-ratio", "1")


def prompt(i: int) -> str:
    return f"stream {i}: " + "tell me everything. " * 8


async def run_streams(url: str, fault: Fault | None = None, tokens: int = TOKENS
                      ) -> tuple[list[str], float, list[tuple[int, int]]]:
    """32 concurrent streams, `fault()` alongside: texts, longest token gap, (prompt,
    completion) usage of each."""
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    longest = 0.0
    usage: list[tuple[int, int]] = []

    async def one(i: int) -> str:
        nonlocal longest
        stream = await oai.completions.create(
            model="mock", prompt=prompt(i), max_tokens=tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, last = "", time.monotonic()
        async for chunk in stream:
            now = time.monotonic()
            if chunk.choices and chunk.choices[0].text:
                longest = max(longest, now - last)
                last = now
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage.append((chunk.usage.prompt_tokens, chunk.usage.completion_tokens))
        return text

    tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
    if fault is not None:
        tasks.append(asyncio.create_task(fault()))
    results = await asyncio.gather(*tasks)
    return [r for r in results if isinstance(r, str)], longest, usage


def when_carrying(victim: Service, workers: list[Service], act: Callable[[], None],
                  within_s: float = 60) -> Fault:
    """A fault: `act()` once `victim` (a router) has streams in flight and the workers are
    decoding them. Watched from a thread: the test's event loop is busy with the streams."""
    before = sum(w.metrics().value("turnout_worker_decode_tokens_total") for w in workers)

    def carrying() -> bool:
        decoded = sum(w.metrics().value("turnout_worker_decode_tokens_total") for w in workers)
        return (victim.metrics().value("turnout_router_inflight_requests") >= 4
                and decoded - before >= STREAMS * 8)

    def watch_then_act() -> None:
        wait_for(carrying, within_s, f"{victim.name} to carry streams", interval=0.02)
        act()

    async def fault() -> None:
        await asyncio.to_thread(watch_then_act)

    return fault


def start(deployment: Deployment) -> None:
    deployment.start(workers=2, routers=2, worker_args=WORKER_ARGS)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM],
                         ids=["sigkill", "sigstop", "sigterm"])
def test_streams_survive_a_router_fault(deployment: Deployment, sig: int) -> None:
    start(deployment)
    clean, clean_longest, clean_usage = asyncio.run(run_streams(deployment.url))
    assert len(clean) == STREAMS and all(len(t) == TOKENS for t in clean)
    victim = deployment.service("router-2")
    survivor = deployment.service("router")

    faulty, longest, usage = asyncio.run(run_streams(
        deployment.url, when_carrying(victim, deployment.workers(),
                                      lambda: victim.signal(sig))))
    assert faulty == clean, "every stream must carry exactly the clean run's tokens"
    assert sorted(usage) == sorted(clean_usage), "usage as in the clean run"
    front = deployment.frontend_metrics()
    assert front.value("turnout_frontend_streams_resumed_total") > 0
    assert front.value("turnout_frontend_streams_resume_failed_total") == 0
    assert survivor.metrics().value("turnout_router_resumes_total") > 0
    why = {signal.SIGKILL: "dropped", signal.SIGSTOP: "hung", signal.SIGTERM: "draining"}[sig]
    assert front.value("turnout_frontend_routers_lost_total", why=why) == 1
    if sig == signal.SIGSTOP:
        detection = front.histogram("turnout_frontend_router_hang_detection_seconds")
        assert detection.count == 1 and detection.buckets[0.5] == 1, detection
        victim.signal(signal.SIGCONT)
    # The workers that served the moved streams took them over where they were: handovers.
    handovers = sum(w.metrics().value("turnout_worker_handovers_total")
                    for w in deployment.workers())
    assert handovers > 0
    if sig == signal.SIGTERM:
        wait_for(lambda: not victim.alive(), 10, "the drained router to exit")
        assert victim.returncode == 0
        # The pause of each moved stream, by the frontend's clock (the client's own clock in
        # this test also counts its busy event loop: loose below).
        gap = front.histogram("turnout_frontend_stream_resume_gap_seconds")
        assert gap.count > 0 and gap.buckets[0.5] == gap.count, gap
    assert longest < 5.0, f"longest token gap {longest:.2f} s (clean: {clean_longest:.2f} s)"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP],
                         ids=["sigterm", "sigkill", "sigstop"])
def test_a_lost_routers_streams_still_waiting_are_handed_over_where_they_wait(
        deployment: Deployment, sig: int) -> None:
    """router-2 drains (SIGTERM), dies (SIGKILL) or hangs (SIGSTOP) while most of its streams
    still wait for their first token (each worker runs one at a time): the worker each one
    waits on hands it over to the other router, as it does a running one (or, had it ended
    there meanwhile, replays its end), so none is sent to a second worker and run twice, and
    none is left behind to be dropped as orphaned when router-2 is gone. A draining router
    names their workers as it gives them back; a dead or hung one cannot, so the frontend has
    them from the pongs to its pings. (Random placement: neither a cached prefix nor a
    round-robin turn leads a resume back to its worker.)"""
    deployment.start(workers=2, routers=2, worker_args=(*WORKER_ARGS, "--max-num-seqs", "1"),
                     router_args=("--router-mode", "random"))
    tokens = 48  # ~0.3 s a stream: a wrong worker's copy still waits when it is dropped
    clean, _, clean_usage = asyncio.run(run_streams(deployment.url, tokens=tokens))
    victim, survivor = deployment.service("router-2"), deployment.service("router")
    workers = deployment.workers()
    orphaned_before = sum(w.metrics().value("turnout_worker_requests_total", outcome="orphaned")
                          for w in workers)
    placed_before = sum(r.metrics().value("turnout_router_decisions_total")
                        for r in (survivor, victim))

    def signal_once_waiting() -> None:
        def carrying() -> bool:
            # Every stream of the run placed (a hung router would still be sent some); router-2
            # carries six (one runs per worker: four or more wait); and, as a dead or hung
            # router cannot name their workers later, the frontend was told each one.
            placed = survivor.metrics().value("turnout_router_decisions_total")
            m = victim.metrics()  # read last: nothing is placed after what both counted
            placed += m.value("turnout_router_decisions_total") - placed_before
            return placed == STREAMS and m.value("turnout_router_inflight_requests") >= 6 and (
                sig == signal.SIGTERM or m.value("turnout_router_placements_unannounced") == 0)

        wait_for(carrying, 60, "router-2 to carry streams, the frontend told where they wait",
                 interval=0.02)
        victim.signal(sig)

    async def fault() -> None:
        await asyncio.to_thread(signal_once_waiting)

    try:
        faulty, _, usage = asyncio.run(run_streams(deployment.url, fault, tokens=tokens))
        assert faulty == clean and sorted(usage) == sorted(clean_usage)
        if sig == signal.SIGTERM:
            wait_for(lambda: not victim.alive(), 10, "router-2 to drain and exit")
        front = deployment.frontend_metrics()
        resumed = front.value("turnout_frontend_streams_resumed_total")
        assert resumed >= 6
        # Each worker has noticed router-2 gone: anything of it still there was dropped by now.
        wait_for(lambda: all(w.metrics().value("turnout_worker_routers_lost_total") >= 1
                             for w in workers), 20, "the workers to notice router-2 gone")
        # Each resume found its stream on its worker: running or waiting there (handed over),
        # or ended there while router-2 was not listening (its tokens replayed, no rerun).
        scraped = [w.metrics() for w in workers]
        taken = sum(m.value("turnout_worker_handovers_total")
                    + m.value("turnout_worker_replayed_streams_total") for m in scraped)
        # But a draining router-2 still pings: one that ended just before its resume landed
        # (one a worker) runs again, where it ran. Dead or hung, router-2 may still have pinged
        # once between relaying a last chunk and the fault, which took the chunk with it.
        slack = len(workers) if sig == signal.SIGTERM else 1
        assert resumed - slack <= taken <= resumed
        assert sum(w.metrics().value("turnout_worker_requests_total", outcome="orphaned")
                   for w in workers) == orphaned_before
    finally:
        victim.signal(signal.SIGCONT)


def test_a_rolling_restart_of_every_router_under_load_loses_nothing(
        deployment: Deployment) -> None:
    """SIGTERM router-2, start router-3, SIGTERM router (the first), each once the frontend
    uses the new one: the streams cross two drains and end with the clean run's text."""
    start(deployment)
    tokens = 4 * TOKENS  # long enough to outlast a restart
    clean, _, clean_usage = asyncio.run(run_streams(deployment.url, tokens=tokens))
    first, second = deployment.service("router"), deployment.service("router-2")

    def routers_in_use(n: int) -> None:
        wait_for(lambda: deployment.frontend_metrics().value("turnout_frontend_routers") == n,
                 20, f"the frontend to use {n} routers", interval=0.02)

    def roll() -> None:
        second.signal(signal.SIGTERM)
        wait_for(lambda: not second.alive(), 10, "router-2 to drain and exit", interval=0.02)
        deployment.start_router(name="router-3")
        routers_in_use(2)
        first.signal(signal.SIGTERM)
        wait_for(lambda: not first.alive(), 10, "router to drain and exit", interval=0.02)

    faulty, _, usage = asyncio.run(run_streams(
        deployment.url, when_carrying(second, deployment.workers(), roll), tokens=tokens))
    assert faulty == clean and sorted(usage) == sorted(clean_usage)
    assert (first.returncode, second.returncode) == (0, 0)
    front = deployment.frontend_metrics()
    assert front.value("turnout_frontend_routers_lost_total", why="draining") == 2
    assert front.value("turnout_frontend_streams_resume_failed_total") == 0


def test_a_dead_frontend_leaves_no_work_running(deployment: Deployment) -> None:
    start(deployment)
    workers = deployment.workers()
    stop = threading.Event()

    def clients() -> None:
        async def run() -> None:
            oai = openai.AsyncOpenAI(base_url=deployment.url + "/v1", api_key="x",
                                     max_retries=0, timeout=60)

            async def one(i: int) -> None:
                try:
                    stream = await oai.completions.create(
                        model="mock", prompt=prompt(i), max_tokens=TOKENS, stream=True,
                        extra_body={"ignore_eos": True})
                    async for _ in stream:
                        if stop.is_set():
                            return
                except openai.APIError:
                    pass  # the frontend died under it

            await asyncio.gather(*(one(i) for i in range(STREAMS)))

        asyncio.run(run())

    thread = threading.Thread(target=clients)
    thread.start()
    try:
        def running() -> float:
            return sum(requests_on(w.metrics()) for w in workers)

        wait_for(lambda: running() >= STREAMS // 2, 60, "the workers to run the streams",
                 interval=0.02)
        deployment.frontend.signal(signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: running() == 0, 1.0, "every worker to stop the dead frontend's work",
                 interval=0.01)
        # Seen at 0 by the end of the last look (each look scrapes both workers).
        stopped_s = time.monotonic() - t0
        assert stopped_s <= 1.0, stopped_s
    finally:
        stop.set()
        thread.join(30)
    cancelled = sum(r.metrics().value("turnout_router_orphans_cancelled_total")
                    for r in deployment.by_role("router"))
    assert cancelled > 0


def route(router: Service, token_ids: list[int]) -> dict[str, object]:
    record = router.record()
    assert record is not None
    req = urllib.request.Request(record["endpoints"]["http"] + "/v1/route", method="POST",
                                 data=json.dumps({"model": "mock",
                                                  "prompt_token_ids": token_ids}).encode())
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_a_restarted_router_rebuilds_its_index_and_routes_by_it(deployment: Deployment) -> None:
    deployment.start(workers=2, routers=2, worker_args=("--speedup-ratio", "0"))
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0)
    text = "a long shared document about routers. " * 20
    oai.completions.create(model="mock", prompt=text, max_tokens=1)
    ids = [256, *text.encode()]  # the byte tokenizer: BOS, then one token per byte
    # The router learns the blocks from the worker's KV event, which travels on the event
    # plane beside the answer on the request plane: it may land a moment after the answer.
    holder = wait_for(lambda: (r := route(deployment.router, ids))["overlap_blocks"] and r, 10,
                      "the router's index to hold the prompt's blocks")
    assert int(holder["overlap_blocks"]) > 0  # type: ignore[call-overload]

    deployment.service("router-2").signal(signal.SIGKILL)
    restarted = deployment.start_router(name="router-3")
    wait_for(lambda: deployment.frontend_metrics().value("turnout_frontend_routers") == 2, 10,
             "the frontend to use the restarted router")
    wait_for(lambda: restarted.metrics().value("turnout_router_kv_resyncs_total") >= 2, 30,
             "the restarted router to resync every worker")
    wait_for(lambda: int(route(restarted, ids)["overlap_blocks"]) > 0,  # type: ignore[call-overload]
             10, "the restarted router's index to hold the cached prefix")
    decision = route(restarted, ids)
    assert decision["worker_id"] == holder["worker_id"]
    assert decision["overlap_blocks"] == holder["overlap_blocks"]
    # And it serves: requests through the frontend (now spread over router and router-3).
    for i in range(4):
        oai.completions.create(model="mock", prompt=f"after restart {i}", max_tokens=2)
    assert restarted.metrics().value("turnout_router_decisions_total", policy="kv") > 0


def test_a_router_whose_record_lapses_for_a_moment_is_used_again(
        deployment: Deployment) -> None:
    """A router's discovery record vanishes while it carries a stream (its lease lapsed while
    it stalled, and a reader collected it) and is rewritten a moment later: the frontend uses
    the router again, rather than leaving it aside for good as if it drained."""
    deployment.start(workers=1, worker_args=WORKER_ARGS)
    router = deployment.router
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                        timeout=60)

    def long_stream() -> str:
        stream = oai.completions.create(model="mock", prompt=prompt(0), max_tokens=4 * TOKENS,
                                        stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in stream if c.choices)

    record = deployment.discovery / f"{router.instance_id}.json"

    def remove_record() -> bool:
        record.unlink(missing_ok=True)
        return deployment.frontend_metrics().value("turnout_frontend_routers") == 0

    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(long_stream()))
    thread.start()
    try:
        wait_for(lambda: router.metrics().value("turnout_router_inflight_requests") >= 1, 30,
                 "the router to carry the stream", interval=0.02)
        wait_for(remove_record, 20, "the frontend to see the router leave discovery",
                 interval=0.02)
        wait_for(lambda: deployment.frontend_metrics().value("turnout_frontend_routers") == 1,
                 20, "the frontend to use the router again once its record is renewed")
        answer = oai.completions.create(model="mock", prompt="after the lapse", max_tokens=4)
        assert answer.usage is not None and answer.usage.completion_tokens == 4
    finally:
        thread.join(120)
    assert result and len(result[0]) == 4 * TOKENS, "the stream in flight finished whole"
    front = deployment.frontend_metrics()
    assert front.value("turnout_frontend_streams_resume_failed_total") == 0


@pytest.mark.parametrize("late", ["", "frontend", "router", "worker"],
                         ids=["together", "frontend_last", "router_last", "worker_last"])
def test_a_deployment_paused_whole_past_its_leases_serves_on(deployment: Deployment,
                                                             late: str) -> None:
    """Every process stops at once for three leases (a paused VM, a SIGSTOP of the lot) and
    resumes, all together or one of them 1.5 s after the others (a busy host runs it last; a
    verdict on a peer of regular pings comes at ~0.4 s of silence): no record, frontend or
    router is taken for gone, a request sent right away is served, and every stream carries
    the clean run's tokens where it was, moved to no other worker or router (nothing died: a
    move would only cost a recompute)."""
    start(deployment)
    clean, _, _ = asyncio.run(run_streams(deployment.url))
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                        timeout=60)
    assert deployment.lease_ttl_s is not None
    answered: list[int] = []

    def pause_all() -> None:
        deployment.pause_whole(3 * deployment.lease_ttl_s,
                               deployment.by_role(late)[0] if late else None, 1.5)
        answer = oai.completions.create(model="mock", prompt="right after", max_tokens=4)
        answered.append(answer.usage.completion_tokens if answer.usage else 0)

    faulty, _, _ = asyncio.run(run_streams(
        deployment.url, when_carrying(deployment.router, deployment.workers(), pause_all)))
    assert answered == [4]
    assert faulty == clean, "every stream must carry exactly the clean run's tokens"
    moved = {r.name: r.metrics().value("turnout_router_migrations_total")
             for r in deployment.by_role("router")}
    assert sum(moved.values()) == 0, moved
    assert deployment.frontend_metrics().value("turnout_frontend_streams_resumed_total") == 0
    assert sum(r.metrics().value("turnout_router_frontends_lost_total")
               for r in deployment.by_role("router")) == 0
    assert sum(w.metrics().value("turnout_worker_routers_lost_total")
               for w in deployment.workers()) == 0


def test_a_frontend_stalled_past_the_routers_verdict_resumes_every_stream(
        deployment: Deployment) -> None:
    """The frontend alone stops (SIGSTOP) for 1.5 s while streams run: the routers take it for
    gone and cancel its requests on the workers, telling it so (`ResumeElsewhere`, not
    draining). Back, it resumes every stream, often through the router that cancelled it and
    onto the worker that ran it, whose cancelled run may still have tokens on their way: every
    stream carries exactly the clean run's tokens and usage."""
    start(deployment)
    clean, _, clean_usage = asyncio.run(run_streams(deployment.url))
    frontend = deployment.frontend

    def stall() -> None:
        frontend.signal(signal.SIGSTOP)
        wait_for(frontend.stopped, 10, "the frontend to stop", interval=0.01)
        time.sleep(1.5)  # the stall itself (the routers' verdict comes at ~0.4 s)
        frontend.signal(signal.SIGCONT)

    faulty, _, usage = asyncio.run(run_streams(
        deployment.url, when_carrying(deployment.router, deployment.workers(), stall)))
    assert faulty == clean, "every stream must carry exactly the clean run's tokens"
    assert sorted(usage) == sorted(clean_usage)
    lost = sum(r.metrics().value("turnout_router_frontends_lost_total")
               for r in deployment.by_role("router"))
    assert lost >= 1, "the routers took the stalled frontend for gone"
    front = deployment.frontend_metrics()
    assert front.value("turnout_frontend_streams_resume_failed_total") == 0
    assert front.value("turnout_frontend_streams_resumed_total") > 0


def test_a_lone_routers_cut_connection_costs_no_stream(deployment: Deployment) -> None:
    """One router, and the frontend's connection to it is cut mid-stream (a network fault;
    both processes live on): with no other router to resume through, the streams wait for
    the connection to come back and continue on the same router, in place, with the clean
    run's tokens and usage."""
    deployment.start(workers=2, worker_args=WORKER_ARGS)
    clean, _, clean_usage = asyncio.run(run_streams(deployment.url))
    router = deployment.router
    record = router.record()
    assert record is not None
    endpoint = record["endpoints"]["request"]
    cut: list[int] = []
    faulty, _, usage = asyncio.run(run_streams(deployment.url, when_carrying(
        router, deployment.workers(),
        lambda: cut.append(deployment.frontend.cut_connections(endpoint)))))
    assert cut and cut[0] >= 1
    assert faulty == clean, "every stream must carry exactly the clean run's tokens"
    assert sorted(usage) == sorted(clean_usage)
    front = deployment.frontend_metrics()
    assert front.value("turnout_frontend_streams_resume_failed_total") == 0
    resumed = front.value("turnout_frontend_streams_resumed_total")
    assert resumed > 0
    # Back before the router gave the old connection up: continued where they ran.
    assert router.metrics().value("turnout_router_streams_taken_over_total") == resumed
    assert router.metrics().value("turnout_router_migrations_total") == 0


def test_a_lone_router_replaced_mid_stream_costs_no_stream(deployment: Deployment) -> None:
    """The only router is killed mid-stream and a new one started: the streams wait for it
    (`--router-resume-wait-ms`) and continue through it with the clean run's tokens."""
    deployment.start(workers=2, worker_args=WORKER_ARGS,
                     frontend_args=("--router-resume-wait-ms", "60000"))
    clean, _, _ = asyncio.run(run_streams(deployment.url))
    old = deployment.router

    def replace() -> None:
        old.signal(signal.SIGKILL)
        wait_for(lambda: not old.alive(), 10, "the router to die")
        deployment.start_router(name="router-2")

    faulty, _, _ = asyncio.run(run_streams(deployment.url, when_carrying(
        old, deployment.workers(), replace)))
    assert faulty == clean, "every stream must carry exactly the clean run's tokens"
    front = deployment.frontend_metrics()
    assert front.value("turnout_frontend_streams_resume_failed_total") == 0
    assert front.value("turnout_frontend_streams_resumed_total") > 0
    assert deployment.service("router-2").metrics().value("turnout_router_resumes_total") > 0
