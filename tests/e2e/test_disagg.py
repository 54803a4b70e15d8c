"""Disaggregated serving with real processes: prefill workers, decode workers, the hand-off at
the first token, conditional decisions and faults.

The mocker's output is deterministic (each token depends only on the sequence before it) and the
byte tokenizer maps one token to one character, so a disaggregated stream must carry exactly
the text of the same request run aggregated. The aggregated reference runs on the decode worker
itself, named with `x-worker-instance-id` (a gateway-named worker always runs whole requests),
after the disaggregated run so its cache cannot help it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

import openai
import pytest

from turnout.testing.deployment import ROOT, Deployment, Service, requests_on, wait_for

pytestmark = pytest.mark.e2e

TOKENS = 48
BLOCK = 64
# Clean-path tests: a pull answered late on a loaded machine must not turn into a recompute.
PATIENT = ("--kv-pull-timeout-ms", "10000")


def prompt(i: int, words: int = 40) -> str:
    return f"request {i}: " + "the quick brown fox jumps. " * words


async def complete(url: str, prompts: list[str], target: str = "", max_tokens: int = TOKENS,
                   logprobs: int | None = None, salt: str = "") -> list[tuple[str, Any]]:
    """Stream every prompt at once; (text, usage) each. With `logprobs`, each text is followed
    by the JSON of its tokens' logprobs."""
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    headers = {"x-worker-instance-id": target} if target else None

    async def one(p: str) -> tuple[str, Any]:
        stream = await oai.completions.create(
            model="mock", prompt=p, max_tokens=max_tokens, stream=True, logprobs=logprobs,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, **({"cache_salt": salt} if salt else {})},
            extra_headers=headers)
        text, usage = "", None
        entries: list[object] = []
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                lp = chunk.choices[0].logprobs
                if lp is not None:
                    entries += zip(lp.tokens or [], lp.token_logprobs or [],
                                   lp.top_logprobs or [], strict=True)
            if chunk.usage is not None:
                usage = chunk.usage
        return (text + json.dumps(entries) if logprobs is not None else text), usage

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def decisions(deployment: Deployment) -> dict[tuple[str, str], float]:
    m = deployment.router.metrics()
    return {(s.labels["path"], s.labels["reason"]): s.value
            for s in m.samples("turnout_router_disagg_decisions_total")}


def value(service: Service, name: str, **labels: str) -> float:
    return service.metrics().value(name, **labels)


def leases_released(prefill: Service, n: int) -> None:
    """Every held prefill KV is freed (by the decode side's release), none left."""
    wait_for(lambda: value(prefill, "turnout_worker_kv_leases") == 0
             and value(prefill, "turnout_worker_kv_lease_ends_total") >= n,
             10, f"{prefill.name} to free {n} leases", interval=0.05)


def test_one_prefill_one_decode_via_turnout_up(deployment: Deployment) -> None:
    deployment.start_up(["--speedup-ratio", "1", "--disagg-mode", "always", *PATIENT], workers=0,
                        prefill_workers=1, decode_workers=1)
    prefill, decode = deployment.service("prefill-1"), deployment.service("decode-1")
    assert prefill.record()["metadata"]["mode"] == "prefill"  # type: ignore[index]
    assert decode.record()["metadata"]["mode"] == "decode"  # type: ignore[index]
    prompts = [prompt(i) for i in range(6)]

    disagg = asyncio.run(complete(deployment.url, prompts))
    # The decode worker decoded every token but the first, and computed no prompt token.
    assert value(decode, "turnout_worker_prefill_tokens_total") == 0
    assert value(decode, "turnout_worker_decode_tokens_total") == len(prompts) * (TOKENS - 1)
    assert value(prefill, "turnout_worker_decode_tokens_total") == 0
    assert value(decode, "turnout_worker_disagg_transfers_total", outcome="pulled") == 6
    leases_released(prefill, 6)
    router = deployment.router.metrics()
    assert router.value("turnout_router_disagg_handoffs_total", outcome="sent") == 6
    assert decisions(deployment) == {("remote", "always"): 6}

    again = asyncio.run(complete(deployment.url, prompts))  # the prefill worker's cache hits
    reference = asyncio.run(complete(deployment.url, prompts, target=decode.instance_id))
    assert [t for t, _ in disagg] == [t for t, _ in reference]
    assert [t for t, _ in again] == [t for t, _ in reference]
    for (_, u), (_, ref) in zip(disagg, reference, strict=True):
        assert u.prompt_tokens == ref.prompt_tokens and u.completion_tokens == TOKENS
        assert u.prompt_tokens_details.cached_tokens == 0
    for (_, u), (_, ref) in zip(again, reference, strict=True):
        full = (u.prompt_tokens - 1) // BLOCK * BLOCK  # the last token is always computed
        assert u.prompt_tokens_details.cached_tokens == full == \
            ref.prompt_tokens_details.cached_tokens
    # Logprobs: the first token's from the prefill worker, the rest from the decode worker,
    # token for token those of the aggregated run.
    split = asyncio.run(complete(deployment.url, prompts, logprobs=1))
    whole = asyncio.run(complete(deployment.url, prompts, target=decode.instance_id, logprobs=1))
    assert [t for t, _ in split] == [t for t, _ in whole]
    assert all(len(json.loads(t[TOKENS:])) == TOKENS for t, _ in split)
    # With echo, the prompt's logprobs come from the prefill worker: the aggregated run's.
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0,
                        timeout=60)
    echoed = [oai.completions.create(
        model="mock", prompt=prompts[0], max_tokens=TOKENS, logprobs=1, echo=True,
        extra_body={"ignore_eos": True}, extra_headers=headers).choices[0]
        for headers in (None, {"x-worker-instance-id": decode.instance_id})]
    assert echoed[0].text == echoed[1].text and echoed[0].text.startswith(prompts[0])
    assert echoed[0].logprobs == echoed[1].logprobs
    assert echoed[0].logprobs is not None and echoed[0].logprobs.token_logprobs is not None
    assert len(echoed[0].logprobs.token_logprobs) == len(prompts[0]) + 1 + TOKENS  # BOS too
    # max_tokens 0: the prompt alone, its logprobs the same (a prefill-only request).
    only = oai.completions.create(model="mock", prompt=prompts[0], max_tokens=0, logprobs=1,
                                  echo=True).choices[0]
    assert only.text == prompts[0] and only.finish_reason == "length"
    assert only.logprobs is not None
    assert only.logprobs.token_logprobs == echoed[0].logprobs.token_logprobs[:-TOKENS]

    # A salted request reuses none of the cached copies of its prompt, and its KV still moves:
    # the decode worker names the prefill worker's blocks by the salt too.
    computed = value(decode, "turnout_worker_prefill_tokens_total")
    pulled = value(decode, "turnout_worker_disagg_transfers_total", outcome="pulled")
    salted = asyncio.run(complete(deployment.url, prompts[:2], salt="tenant-a"))
    assert [t for t, _ in salted] == [t for t, _ in reference[:2]]
    assert [u.prompt_tokens_details.cached_tokens for _, u in salted] == [0, 0]
    assert value(decode, "turnout_worker_prefill_tokens_total") == computed
    assert value(decode, "turnout_worker_disagg_transfers_total", outcome="pulled") == pulled + 2


def test_two_prefill_two_decode(deployment: Deployment) -> None:
    deployment.start_router("--disagg-mode", "always")
    for i in (1, 2):
        deployment.start_worker("--worker-mode", "prefill", "--speedup-ratio", "1",
                                worker_id=f"p{i}")
    for i in (1, 2):
        deployment.start_worker("--worker-mode", "decode", "--speedup-ratio", "1", *PATIENT,
                                worker_id=f"d{i}")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(4)
    prompts = [prompt(i) for i in range(16)]
    disagg = asyncio.run(complete(deployment.url, prompts))
    for name in ("p1", "p2"):
        assert value(deployment.service(name), "turnout_worker_prompt_tokens_total") > 0
        assert value(deployment.service(name), "turnout_worker_decode_tokens_total") == 0
    decoded = 0.0
    for name in ("d1", "d2"):
        assert value(deployment.service(name), "turnout_worker_prefill_tokens_total") == 0
        decoded += value(deployment.service(name), "turnout_worker_decode_tokens_total")
    assert decoded == len(prompts) * (TOKENS - 1)
    reference = asyncio.run(complete(deployment.url, prompts, target="d1"))
    assert [t for t, _ in disagg] == [t for t, _ in reference]


def test_conditional_decisions_follow_the_thresholds(deployment: Deployment) -> None:
    """A prompt mostly cached on the decode worker (its uncached part under 400 tokens and
    under 70% of it) prefills there; a fresh one on the prefill worker; a decode worker with
    enough requests in flight vetoes a local prefill."""
    # Targets no path can miss: the token thresholds decide. With the defaults a starved host
    # (a busy loop on one of two cores) measured hand-off gaps past the 50 ms ITL target, and
    # the router rightly prefilled two fresh prompts locally (`handoff_gap`).
    deployment.start_router("--local-prefill-max-tokens", "400",
                            "--decode-veto-requests", "2",
                            "--disagg-ttft-target-ms", "600000",
                            "--disagg-itl-target-ms", "600000")
    deployment.start_worker("--worker-mode", "prefill", "--speedup-ratio", "1",
                            worker_id="p1")
    deployment.start_worker("--worker-mode", "decode", "--speedup-ratio", "1", *PATIENT,
                            worker_id="d1")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(2)
    d1 = deployment.service("d1")

    base = prompt(1, words=40)  # ~1,100 tokens
    asyncio.run(complete(deployment.url, [base]))
    assert decisions(deployment) == {("remote", "long_uncached"): 1}
    assert value(d1, "turnout_worker_prefill_tokens_total") == 0
    # d1 pulled base's blocks: a follow-up sharing them is short where it is uncached.
    asyncio.run(complete(deployment.url, [base + "and one more thing."]))
    assert decisions(deployment)[("local", "short_uncached")] == 1
    computed = value(d1, "turnout_worker_prefill_tokens_total")
    assert 0 < computed < 2 * BLOCK

    async def busy_decode() -> list[tuple[str, Any]]:
        long = asyncio.create_task(complete(deployment.url, [prompt(2), prompt(3)],
                                            max_tokens=400))
        await asyncio.to_thread(
            wait_for, lambda: value(d1, "turnout_worker_running_requests") >= 2, 30,
            "two streams decoding on d1", interval=0.02)
        short = await complete(deployment.url, [base + "and yet another."])
        return [*await long, *short]

    texts = asyncio.run(busy_decode())
    assert decisions(deployment)[("remote", "decode_busy")] == 1
    assert len(texts) == 3 and all(len(t) in (TOKENS, 400) for t, _ in texts)

    # `turnout status` shows the roles and the decisions.
    out = subprocess.run(
        [sys.executable, "-m", "turnout", "status", "--discovery",
         f"file:{deployment.discovery}", "--json"], capture_output=True, text=True, cwd=ROOT,
        timeout=30, check=True)
    view = json.loads(out.stdout)
    assert {w["id"]: w["mode"] for w in view["workers"]} == {"p1": "prefill", "d1": "decode"}
    (router,) = view["routers"]
    assert router["disagg_decisions"] == {"remote/long_uncached": 3, "local/short_uncached": 1,
                                          "remote/decode_busy": 1}


def test_no_prefill_worker_runs_aggregated_on_the_decode_pool(deployment: Deployment) -> None:
    deployment.start_router("--disagg-mode", "always")
    prefill = deployment.start_worker("--worker-mode", "prefill", "--speedup-ratio", "1",
                                      worker_id="p1")
    deployment.start_worker("--worker-mode", "decode", "--speedup-ratio", "1", worker_id="d1")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(2)
    prefill.signal(signal.SIGKILL)
    wait_for(lambda: deployment.routable() == 1, 10, "the router to drop the prefill worker")
    texts = asyncio.run(complete(deployment.url, [prompt(i) for i in range(3)]))
    assert all(len(t) == TOKENS for t, _ in texts)
    assert decisions(deployment) == {("aggregated", "no_prefill_worker"): 3}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_prefill_worker_lost_before_and_after_hand_off(deployment: Deployment,
                                                       sig: signal.Signals) -> None:
    """SIGKILL (or SIGSTOP: hung) a prefill worker while it holds prompts still prefilling
    (they re-run on the other prefill worker) and finished ones whose decode side may still be
    pulling (it pulls elsewhere, or recomputes once no copy answers within its pull timeout):
    every stream completes with the clean run's text."""
    deployment.start_router("--disagg-mode", "always", "--router-mode", "round-robin")
    # p1 prefills slowly (two prompts per ~0.7 s step) so that "one finished, more queued"
    # lasts seconds: a loaded host's scrapes once missed a shorter window.
    for i, speedup in ((1, "0.2"), (2, "0.5")):
        deployment.start_worker("--worker-mode", "prefill", "--speedup-ratio", speedup,
                                worker_id=f"p{i}")
    deployment.start_worker("--worker-mode", "decode", "--speedup-ratio", "1", worker_id="d1")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(3)
    victim = deployment.service("p1")
    prompts = [prompt(i, words=120) for i in range(12)]  # ~3,300 tokens each

    async def run() -> list[tuple[str, Any]]:
        streams = asyncio.create_task(complete(deployment.url, prompts))

        def one_done_more_queued() -> bool:
            m = victim.metrics()  # one scrape: both figures from the same instant
            return m.value("turnout_worker_prompt_tokens_total") > 0 and requests_on(m) > 0

        await asyncio.to_thread(wait_for, one_done_more_queued, 30,
                                "p1 to have finished one prefill with more queued",
                                interval=0.01)
        victim.signal(sig)
        return await streams

    try:
        faulty = asyncio.run(run())
    finally:
        victim.signal(signal.SIGCONT)
    router = deployment.router.metrics()
    assert router.value("turnout_router_migrations_total", cause="prefill") > 0
    reference = asyncio.run(complete(deployment.url, prompts, target="d1"))
    assert [t for t, _ in faulty] == [t for t, _ in reference]


async def kill_while_decoding(deployment: Deployment, victim: Service,
                              prompts: list[str]) -> list[tuple[str, Any]]:
    """Stream `prompts` (200 tokens each) and SIGKILL `victim` once it decodes."""
    streams = asyncio.create_task(complete(deployment.url, prompts, max_tokens=200))
    await asyncio.to_thread(
        wait_for, lambda: value(victim, "turnout_worker_decode_tokens_total") > 0, 30,
        f"{victim.name} to decode", interval=0.01)
    victim.signal(signal.SIGKILL)
    return await streams


def test_decode_worker_killed_mid_stream(deployment: Deployment) -> None:
    deployment.start_router("--disagg-mode", "always", "--disagg-lease-ms", "3000")
    prefill = deployment.start_worker("--worker-mode", "prefill", "--speedup-ratio", "1",
                                      worker_id="p1")
    for i in (1, 2):
        deployment.start_worker("--worker-mode", "decode", "--speedup-ratio", "1",
                                worker_id=f"d{i}")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(3)
    prompts = [prompt(i) for i in range(8)]
    faulty = asyncio.run(kill_while_decoding(deployment, deployment.service("d1"), prompts))
    assert deployment.router.metrics().value("turnout_router_migrations_total",
                                             cause="crash") > 0
    reference = asyncio.run(complete(deployment.url, prompts, target="d2", max_tokens=200))
    assert [t for t, _ in faulty] == [t for t, _ in reference]
    # Whatever the dead decode worker never acknowledged is freed when its lease ends.
    wait_for(lambda: value(prefill, "turnout_worker_kv_leases") == 0, 10,
             "p1's leases to end")


def test_with_the_decode_pool_gone_the_prefill_pool_serves(deployment: Deployment) -> None:
    """SIGKILL the only decode worker while it decodes and more prompts prefill: streams
    mid-decode continue on the prefill worker, prompts at their first token are decoded where
    they were prefilled, new requests run whole there; every text is the clean run's and no
    KV stays held."""
    deployment.start_router("--disagg-mode", "always")
    prefill = deployment.start_worker("--worker-mode", "prefill", "--speedup-ratio", "1",
                                      worker_id="p1")
    victim = deployment.start_worker("--worker-mode", "decode", "--speedup-ratio", "1",
                                     worker_id="d1")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(2)
    prompts = [prompt(i, words=40 + 20 * i) for i in range(8)]
    faulty = asyncio.run(kill_while_decoding(deployment, victim, prompts))
    wait_for(lambda: deployment.routable() == 1, 10, "the router to drop the decode worker")
    whole = ("aggregated", "no_decode_worker")
    before = decisions(deployment).get(whole, 0)
    after = asyncio.run(complete(deployment.url, prompts[:2], max_tokens=200))
    assert decisions(deployment)[whole] == before + 2
    assert deployment.router.metrics().value("turnout_router_migrations_total",
                                             cause="crash") > 0
    reference = asyncio.run(complete(deployment.url, prompts, target="p1", max_tokens=200))
    assert [t for t, _ in faulty] == [t for t, _ in reference]
    assert [t for t, _ in after] == [t for t, _ in reference[:2]]
    assert all(u.completion_tokens == 200 for _, u in faulty + after)
    wait_for(lambda: value(prefill, "turnout_worker_kv_leases") == 0, 15,
             "p1's leases to end")


def test_a_deployment_paused_whole_mid_hand_off_keeps_the_prefill_kv(
        deployment: Deployment) -> None:
    """Every process stops for six 1-second KV leases while a prefill worker holds finished
    prompts' KV for the decode worker: the pause counts against no lease, so every hand-off
    pulls what it was promised, no stream moves, and every stream carries the clean text."""
    deployment.start_router("--disagg-mode", "always", "--disagg-lease-ms", "1000")
    for i in (1, 2):
        deployment.start_worker("--worker-mode", "prefill", "--speedup-ratio", "1", *PATIENT,
                                worker_id=f"p{i}")
    decode = deployment.start_worker("--worker-mode", "decode", "--speedup-ratio", "1",
                                     *PATIENT, worker_id="d1")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(3)
    prefills = [deployment.service("p1"), deployment.service("p2")]
    prompts = [prompt(i, words=120) for i in range(16)]

    async def run() -> list[tuple[str, Any]]:
        streams = asyncio.create_task(complete(deployment.url, prompts, max_tokens=200))
        await asyncio.to_thread(
            wait_for, lambda: any(value(p, "turnout_worker_kv_leases") > 0 for p in prefills),
            30, "a prefill worker to hold KV for the decode worker", interval=0.005)
        await asyncio.to_thread(deployment.pause_whole, 6.0)
        return await streams

    faulty = asyncio.run(run())
    ends = [p.metrics().by_label("turnout_worker_kv_lease_ends_total", "end") for p in prefills]
    assert sum(e.get("released", 0) for e in ends) == len(prompts), ends
    assert all("expired" not in e for e in ends), ends
    assert value(decode, "turnout_worker_disagg_transfers_total", outcome="pulled") == len(prompts)
    assert deployment.router.metrics().value("turnout_router_migrations_total") == 0
    reference = asyncio.run(complete(deployment.url, prompts, target="d1", max_tokens=200))
    assert [t for t, _ in faulty] == [t for t, _ in reference]


def test_a_drained_routers_prompts_still_prefilling_are_handed_over_not_run_twice(
        deployment: Deployment) -> None:
    """Two routers over two prefill workers and a decode worker; router-2 drains (SIGTERM)
    while prompts it placed still wait on their prefill worker (each prefills one at a time).
    It names that worker, which hands each over to the other router (placed afresh, most
    would go to the other, less loaded, prefill worker and run twice); that router hands it
    off at its first token. No prompt runs twice or is dropped as orphaned once router-2 is
    gone, and every stream carries the aggregated run's text."""
    deployment.start_router("--disagg-mode", "always")
    victim = deployment.start_router("--disagg-mode", "always", name="router-2")
    prefills = [deployment.start_worker("--worker-mode", "prefill", "--speedup-ratio", "0.5",
                                        "--max-num-seqs", "1", *PATIENT, worker_id=f"p{i}")
                for i in (1, 2)]
    decode = deployment.start_worker("--worker-mode", "decode", "--speedup-ratio", "1",
                                     *PATIENT, worker_id="d1")
    front = deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(3)
    wait_for(lambda: front.metrics().value("turnout_frontend_routers") == 2, 20,
             "the frontend to use both routers")
    workers = (*prefills, decode)
    prompts = [prompt(i, words=120) for i in range(16)]  # ~3,300 tokens each

    async def run() -> list[tuple[str, Any]]:
        streams = asyncio.create_task(complete(deployment.url, prompts))
        await asyncio.to_thread(
            wait_for, lambda: value(victim, "turnout_router_inflight_requests") >= 6, 30,
            "router-2 to carry prompts (most waiting to prefill)", interval=0.005)
        victim.signal(signal.SIGTERM)
        return await streams

    faulty = asyncio.run(run())
    wait_for(lambda: not victim.alive(), 10, "router-2 to drain and exit")
    resumed = front.metrics().value("turnout_frontend_streams_resumed_total")
    assert resumed >= 6
    wait_for(lambda: all(value(w, "turnout_worker_routers_lost_total") >= 1 for w in workers),
             20, "the workers to notice router-2 gone")
    assert sum(value(w, "turnout_worker_handovers_total") for w in workers) == resumed
    assert sum(value(w, "turnout_worker_requests_total", outcome="orphaned")
               for w in workers) == 0
    assert sum(value(p, "turnout_worker_handovers_total") for p in prefills) >= 1
    reference = asyncio.run(complete(deployment.url, prompts, target="d1"))
    assert [t for t, _ in faulty] == [t for t, _ in reference]


def start_patient_pair(deployment: Deployment, router_args: tuple[str, ...]
                       ) -> tuple[Service, Service, Service]:
    """A router whose hand-offs wait a minute for a decode worker (the prefill worker does
    not decode them meanwhile), prefill worker p1 (slow: a prefill step of three of
    `prompt()` takes 3 s or more), decode worker d1 and a frontend, all up."""
    router = deployment.start_router(*router_args, "--no-worker-wait-ms", "60000",
                                     "--no-prefill-fallback")
    prefill = deployment.start_worker("--worker-mode", "prefill", "--speedup-ratio", "0.01",
                                      worker_id="p1")
    decode = deployment.start_worker("--worker-mode", "decode", worker_id="d1")
    deployment.start_frontend()
    deployment.wait_healthy()
    deployment.wait_routable(2)
    return router, prefill, decode


def drain_decode_side_while_prefilling(prefill: Service, decode: Service,
                                       prompts: int) -> None:
    """Once `prefill` has every prompt, drain the only decode worker (SIGTERM): the hand-offs
    will wait at the router for a decode worker."""
    wait_for(lambda: requests_on(prefill.metrics()) == prompts,
             30, f"{prefill.name} to take every prompt", interval=0.01)
    decode.signal(signal.SIGTERM)  # from now on it refuses new work
    wait_for(lambda: decode.record() is None, 10,
             f"{decode.name} to leave discovery (its drain began)")
    assert value(prefill, "turnout_worker_kv_leases") == 0, "a prompt prefilled too soon"


def hold_prompts_for_a_decode_worker(prefill: Service, decode: Service, prompts: int) -> None:
    """As above, then wait until `prefill` has prefilled every prompt and holds its KV for
    the hand-off that waits at the router."""
    drain_decode_side_while_prefilling(prefill, decode, prompts)
    wait_for(lambda: value(prefill, "turnout_worker_kv_leases") == prompts, 30,
             f"{prefill.name} to hold every prompt's KV for a decode worker", interval=0.01)


def test_a_drained_prefill_worker_stays_until_the_decode_side_has_its_kv(
        deployment: Deployment) -> None:
    """A prefill worker told to stop (SIGTERM) while it holds finished prompts' KV for a
    decode worker that is yet to pull it: it stays, answers the pulls, and exits once every
    hold is released, so no prompt is recomputed. (The hand-offs wait at the router: the only
    decode worker drains while the prompts prefill, and the next one starts after the
    SIGTERM.) Exiting as soon as its own streams ended, it left every decode phase to
    recompute its prompt."""
    _, prefill, first = start_patient_pair(deployment, ("--disagg-mode", "always"))
    prompts = [prompt(i) for i in range(3)]  # ~1,100 tokens: a prefill step of 3 s or more

    async def run() -> list[tuple[str, Any]]:
        streams = asyncio.create_task(complete(deployment.url, prompts))
        await asyncio.to_thread(hold_prompts_for_a_decode_worker, prefill, first,
                                len(prompts))
        prefill.signal(signal.SIGTERM)
        await asyncio.to_thread(wait_for, lambda: prefill.record() is None, 10,
                                "p1 to leave discovery (its drain began)")
        decode = await asyncio.to_thread(deployment.start_worker, "--worker-mode", "decode",
                                         "--speedup-ratio", "1", *PATIENT, worker_id="d2")
        faulty = await streams
        assert value(decode, "turnout_worker_disagg_transfers_total", outcome="pulled") \
            == len(prompts)
        assert value(decode, "turnout_worker_disagg_transfers_total", outcome="recomputed") == 0
        return faulty

    faulty = asyncio.run(run())
    wait_for(lambda: not prefill.alive(), 10, "p1 to exit once its KV is released")
    assert prefill.returncode == 0
    reference = asyncio.run(complete(deployment.url, prompts, target="d2"))
    assert [t for t, _ in faulty] == [t for t, _ in reference]


def test_a_hand_off_whose_prefill_worker_hangs_is_recomputed_and_goes_on(
        deployment: Deployment) -> None:
    """The prefill worker hangs (SIGSTOP) holding three finished prompts' KV whose hand-offs
    wait for a decode worker (the decode side drains during the prefills, as above). The
    decode worker that joins gets no answer to its pulls within its pull timeout (or is told
    no source is left, once the router judged the prefill worker lost): it recomputes each
    prompt, and every stream goes on with the clean run's text."""
    _, prefill, first = start_patient_pair(deployment, ("--disagg-mode", "always"))
    prompts = [prompt(i) for i in range(3)]

    async def run() -> tuple[list[tuple[str, Any]], Service]:
        streams = asyncio.create_task(complete(deployment.url, prompts))
        await asyncio.to_thread(hold_prompts_for_a_decode_worker, prefill, first,
                                len(prompts))
        prefill.signal(signal.SIGSTOP)
        decode = await asyncio.to_thread(deployment.start_worker, "--worker-mode", "decode",
                                         "--speedup-ratio", "1", "--kv-pull-timeout-ms", "300",
                                         worker_id="d2")
        return await streams, decode

    try:
        faulty, decode = asyncio.run(run())
    finally:
        prefill.signal(signal.SIGCONT)
    assert value(decode, "turnout_worker_disagg_transfers_total", outcome="recomputed") \
        == len(prompts)
    assert value(decode, "turnout_worker_prefill_tokens_total") >= sum(
        u.prompt_tokens - BLOCK for _, u in faulty)
    reference = asyncio.run(complete(deployment.url, prompts, target="d2"))
    assert [t for t, _ in faulty] == [t for t, _ in reference]


@pytest.mark.parametrize("first_token", ["streamed", "held"])
def test_a_hung_routers_prefilled_prompts_are_not_prefilled_again(
        deployment: Deployment, first_token: str) -> None:
    """A router hangs (SIGSTOP) holding three prompts whose prefill is done, their hand-offs
    waiting for a decode worker (the decode side drains during the prefills, as above): the
    frontend resumes them through the other router, and the prefill worker still holds their
    KV, so no prompt is prefilled again.
    - streamed: the client has each first token, so each resume continues on the decode worker
      that joins, which pulls the prompt's KV from the prefill worker (named as a source).
    - held: the router held each first token for the decode side, so the client has none; each
      resume goes back to its prefill worker as a prefill phase, which answers at once with
      the first token again (a replay), and the hand-off's decode worker pulls the KV."""
    hold = ("--disagg-hold-first-token", "--disagg-itl-target-ms", "0.01",
            "--disagg-ttft-target-ms", "1000000") if first_token == "held" else ()
    router_args = ("--disagg-mode", "always", *hold)
    victim, prefill, first = start_patient_pair(deployment, router_args)
    prompts = [prompt(i) for i in range(3)]

    async def run() -> list[tuple[str, Any]]:
        streams = asyncio.create_task(complete(deployment.url, prompts))  # all to the victim
        await asyncio.to_thread(drain_decode_side_while_prefilling, prefill, first,
                                len(prompts))
        await asyncio.to_thread(deployment.start_router, *router_args, "--no-worker-wait-ms",
                                "60000", "--no-prefill-fallback", name="router-2")
        await asyncio.to_thread(
            wait_for, lambda: value(prefill, "turnout_worker_kv_leases") == len(prompts)
            and deployment.frontend_metrics().value("turnout_frontend_routers") == 2
            and value(victim, "turnout_router_placements_unannounced") == 0, 60,
            "p1 to hold every prompt's KV, the frontend to know both routers and where each "
            "prompt is", interval=0.01)
        victim.signal(signal.SIGSTOP)
        await asyncio.to_thread(
            wait_for, lambda: deployment.frontend_metrics().value(
                "turnout_frontend_streams_resumed_total") == len(prompts),
            30, "the frontend to resume every stream through router-2", interval=0.01)
        decode = await asyncio.to_thread(deployment.start_worker, "--worker-mode", "decode",
                                         "--speedup-ratio", "1", *PATIENT, worker_id="d2")
        faulty = await streams
        replays = value(prefill, "turnout_worker_replayed_streams_total")
        if first_token == "held":
            assert replays == len(prompts)
            assert value(decode, "turnout_worker_disagg_transfers_total", outcome="pulled") \
                == len(prompts)
        else:
            assert replays == 0
            # Every full block of every prompt (64 tokens a block, the workers' default).
            full_blocks = value(prefill, "turnout_worker_prompt_tokens_total") // 64
            assert value(decode, "turnout_worker_kv_blocks_pulled_total") >= full_blocks - 3
        return faulty

    try:
        faulty = asyncio.run(run())
    finally:
        victim.signal(signal.SIGCONT)
    # Each prompt ran once on p1.
    assert value(prefill, "turnout_worker_requests_total") == len(prompts)
    reference = asyncio.run(complete(deployment.url, prompts, target="d2"))
    assert [t for t, _ in faulty] == [t for t, _ in reference]
