"""Chaos soak: random faults, one after another, on a disaggregated deployment under streaming
load; what clients see, and whether every stream still carries its clean run's text.

Owns: starting a deployment per seed (the processes `turnout up` would start, each through
`turnout.testing.deployment`: `--routers` routers, `--prefill-workers` + `--decode-workers`
mocker workers at speed-up 1, KV transfer modelled at `--kv-transfer-gbps`, a frontend), sending
`--requests` streaming completions (Poisson arrivals at `--rate`; prompts of 20-120 repeated
sentences, 580-3,380 tokens, each with a distinct head; `--tokens` output tokens, `ignore_eos`),
and meanwhile hitting `--faults` random targets one after another: a worker or router SIGKILLed
(then started again under the same name), SIGTERMed (drains, exits, started again) or
SIGSTOPped for 0.3-2.5 s. With `--pool-faults` each fault kills a whole role at once (every
prefill worker, or every decode worker) and starts it again `--pool-down-s` (1-3 s) later.
Afterwards every prompt runs again on one decode worker named with `x-worker-instance-id`
(whole, no fault): the mocker's tokens depend only on the sequence, so a stream that survived
its faults carries exactly that text. With `--logprobs K` every stream asks for its tokens'
logprobs (and K alternatives), and those must match the clean run's too, token for token.

Prints one JSON line per seed (faults, failed streams with their errors, text mismatches,
migrations, hand-offs and path decisions by cause from the routers' /metrics), then a summary
line.
Progress goes to stderr. Every process it starts is stopped on exit.

    python bench/chaos.py [--seeds 1,2,3] [--routers 2] [--requests 80] [--faults 8]
    python bench/chaos.py --pool-faults --faults 3 [--pool-down-s 5-10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from turnout.testing.deployment import Deployment, Service  # noqa: E402  (path set up above)


def log(message: str) -> None:
    print(f"{time.strftime('%X')} {message}", file=sys.stderr, flush=True)


async def stream(oai: openai.AsyncOpenAI, prompt: str, tokens: int, worker: str = "",
                 logprobs: int | None = None) -> tuple[str, str]:
    """(text, error) of one streamed completion; error '' when it ended normally. With
    `logprobs`, the text is followed by the JSON of its tokens' logprobs."""
    headers = {"x-worker-instance-id": worker} if worker else None
    try:
        chunks = await oai.completions.create(
            model="mock", prompt=prompt, max_tokens=tokens, stream=True, logprobs=logprobs,
            extra_body={"ignore_eos": True}, extra_headers=headers)
        text = ""
        entries: list[Any] = []
        async for chunk in chunks:
            if chunk.choices:
                text += chunk.choices[0].text
                lp = chunk.choices[0].logprobs
                if lp is not None:
                    entries += zip(lp.tokens or [], lp.token_logprobs or [],
                                   lp.top_logprobs or [], strict=True)
        return (text + "\n" + json.dumps(entries) if logprobs is not None else text), ""
    except Exception as exc:  # every failure a client sees is reported
        return "", repr(exc)


class Fleet:
    """The deployment's services by name, each started again under its name after it exits."""

    def __init__(self, dep: Deployment, args: argparse.Namespace) -> None:
        self.dep = dep
        self.worker_args = ["--speedup-ratio", "1", "--kv-transfer-gbps",
                            str(args.kv_transfer_gbps)]
        self.services: dict[str, Service] = {}
        self.router_args = shlex.split(args.router_args)
        for i in range(args.routers):
            self.start("router" if i == 0 else f"router-{i + 1}")
        for role, count in (("p", args.prefill_workers), ("d", args.decode_workers)):
            for i in range(count):
                self.start(f"{role}{i + 1}")

    def start(self, name: str) -> None:
        if name.startswith("router"):
            self.services[name] = self.dep.start_router(*self.router_args, name=name)
            return
        mode = "prefill" if name.startswith("p") else "decode"
        self.services[name] = self.dep.start_worker("--worker-mode", mode, *self.worker_args,
                                                    worker_id=name)

    async def restart(self, names: list[str], pause_s: float = 0.0) -> float:
        """Wait for `names` to exit, then start them again (after `pause_s`); the seconds
        until the first of them was registered again."""
        began = time.monotonic()
        back = 0.0
        for name in names:
            old = self.services[name]
            await asyncio.to_thread(old.process.wait, 120)  # a drain may take a while
            self.dep.services.remove(old)  # not checked for liveness any more
        await asyncio.sleep(pause_s)
        for name in names:
            await asyncio.to_thread(self.start, name)
            back = back or time.monotonic() - began
        return back


async def inject(fleet: Fleet, rng: random.Random, args: argparse.Namespace,
                 faults: list[str]) -> None:
    await asyncio.sleep(1.0)
    for _ in range(args.faults):
        if args.pool_faults:
            role = rng.choice("pd")
            names = sorted(n for n in fleet.services if n[0] == role and n[1:].isdigit())
            log(f"fault: kill {names}")
            for name in names:
                fleet.services[name].signal(signal.SIGKILL)
            outage = await fleet.restart(names, pause_s=rng.uniform(*args.pool_down_s))
            faults.append(f"kill {','.join(names)} ({outage:.1f} s without one)")
        else:
            name = rng.choice(sorted(fleet.services))
            kind = rng.choice(["kill", "stop", "term"])
            faults.append(f"{kind} {name}")
            log(f"fault: {kind} {name}")
            service = fleet.services[name]
            if kind == "stop":
                service.signal(signal.SIGSTOP)
                await asyncio.sleep(rng.uniform(0.3, 2.5))
                service.signal(signal.SIGCONT)
            else:
                service.signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
                await fleet.restart([name])
        await asyncio.sleep(rng.uniform(0.5, 2.0))


def counters(fleet: Fleet, name: str, label: str) -> dict[str, float]:
    """`name` summed over every live router, by `label`."""
    out: dict[str, float] = {}
    for key, service in fleet.services.items():
        if key.startswith("router"):
            for s in service.metrics().samples(name):
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out


async def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(seed)  # prompts and arrivals; the faults draw from their own
    prompts = [f"chaos {seed} request {i}: " + "lorem ipsum dolor sit amet. "
               * rng.randint(20, 120) for i in range(args.requests)]
    work = Path(tempfile.mkdtemp(prefix="turnout-chaos-"))
    with Deployment(work) as dep:
        fleet = Fleet(dep, args)
        dep.start_frontend()
        dep.wait_healthy(60)
        dep.wait_routable(args.prefill_workers + args.decode_workers, 60)
        # Closed here: left to the collector, it closes on the next seed's loop, not its own.
        async with openai.AsyncOpenAI(base_url=dep.url + "/v1", api_key="x", max_retries=0,
                                      timeout=300) as oai:
            faults: list[str] = []

            async def load() -> list[tuple[str, str]]:
                tasks = []
                for prompt in prompts:
                    tasks.append(asyncio.create_task(stream(oai, prompt, args.tokens,
                                                            logprobs=args.logprobs)))
                    await asyncio.sleep(rng.expovariate(args.rate))
                return list(await asyncio.gather(*tasks))

            log(f"seed {seed}: {args.requests} streams, {args.faults} faults")
            faults_rng = random.Random(f"faults {seed}")
            results, _ = await asyncio.gather(load(), inject(fleet, faults_rng, args, faults))
            dep.wait_routable(args.prefill_workers + args.decode_workers, 60)
            log(f"seed {seed}: clean reference run")
            reference = fleet.services["d1"].instance_id
            clean = [await stream(oai, p, args.tokens, reference, args.logprobs)
                     for p in prompts]
        failed = {i: error for i, (_, error) in enumerate(results) if error}
        pairs = zip(results, clean, strict=True)
        mismatched = [i for i, ((text, error), (want, _)) in enumerate(pairs)
                      if not error and text != want]
        row: dict[str, Any] = {
            "seed": seed, "streams": args.requests, "faults": faults,
            "failed": len(failed), "errors": sorted(set(failed.values()))[:5],
            "mismatched": len(mismatched), "reference_failed": sum(bool(e) for _, e in clean)}
        if args.logprobs is not None:
            # A stream whose logprobs fell short of its tokens (the reference's as well).
            row["logprobs_short"] = sum(
                len(json.loads(text.rpartition("\n")[2])) != args.tokens
                for text, error in [*results, *clean] if not error)
        return {**row,
                "migrations": counters(fleet, "turnout_router_migrations_total", "cause"),
                "handoffs": counters(fleet, "turnout_router_disagg_handoffs_total", "outcome"),
                "decisions": counters(fleet, "turnout_router_disagg_decisions_total", "reason")}


def seconds_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("-")
    try:
        bounds = float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI seconds, got {text!r}") from None
    if not 0 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return bounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3", help="one deployment per seed")
    parser.add_argument("--routers", type=int, default=2)
    parser.add_argument("--prefill-workers", type=int, default=2)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--rate", type=float, default=6.0, help="arrivals per second")
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--faults", type=int, default=8, help="faults per seed, one at a time")
    parser.add_argument("--pool-faults", action="store_true",
                        help="each fault kills every prefill or every decode worker at once")
    parser.add_argument("--pool-down-s", type=seconds_range, default=(1.0, 3.0),
                        metavar="LO-HI", help="--pool-faults: a killed pool is started again "
                        "after a pause drawn from this range (seconds; default 1-3)")
    parser.add_argument("--kv-transfer-gbps", type=float, default=25.0)
    parser.add_argument("--logprobs", type=int, default=None, metavar="K",
                        help="every stream asks for logprobs with K alternatives (0-5), "
                        "checked against the clean run's like its text")
    parser.add_argument("--router-args", default="", help="more flags for every router, e.g. "
                        "'--no-worker-wait-ms 10000' (how long a stream waits through a whole "
                        "pool's outage)")
    args = parser.parse_args(argv)
    if args.routers < 1 or args.prefill_workers < 1 or args.decode_workers < 1:
        parser.error("need at least one router, one prefill and one decode worker")
    if args.requests < 1 or not args.rate > 0 or args.tokens < 1 or args.faults < 0:
        parser.error("--requests, --rate and --tokens must be positive, --faults >= 0")
    if args.logprobs is not None and not 0 <= args.logprobs <= 5:
        parser.error("--logprobs: 0 to 5 alternatives")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds: a comma-separated list of integers, got {args.seeds!r}")
    rows = []
    for seed in seeds:
        row = asyncio.run(run_seed(seed, args))
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"summary": True, "seeds": len(rows),
                      "streams": sum(r["streams"] for r in rows),
                      "faults": sum(len(r["faults"]) for r in rows),
                      "failed": sum(r["failed"] for r in rows),
                      "mismatched": sum(r["mismatched"] for r in rows),
                      **({"logprobs_short": sum(r["logprobs_short"] for r in rows)}
                         if args.logprobs is not None else {})}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
