"""One `turnout configure` run: its settings, the estimate (aiconfigurator in a child process,
with progress), the layout chosen and its files, as an `Outcome`. The command line (`main`) and
the web page (`web`) both drive it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from common.config import opt
from turnout.configure.deployment_files import Base, render
from turnout.configure.estimate import (
    AICONFIGURATOR_VERSION,
    EstimateError,
)
from turnout.configure.estimate import run as run_estimate
from turnout.configure.layout import Choice, Request, choose, frontier
from turnout.configure.planner_profile import profile_document, steps_request

BACKENDS = ["vllm", "sglang", "trtllm"]
_TICK_S = 10.0  # a progress line at least this often while aiconfigurator works


@dataclasses.dataclass
class ConfigureConfig:
    """Configure."""

    model: str = opt("", help="model: a Hugging Face id aiconfigurator bundles (e.g. "
                              "Qwen/Qwen3-32B-FP8; others need the Hub) or a directory with "
                              "config.json")
    gpus: int = opt(0, help="GPUs to lay the deployment out on")
    system: str = opt("h200_sxm", help="aiconfigurator's name of the GPU system (h200_sxm, "
                                       "h100_sxm, b200_sxm, gb200, l40s, ...)")
    backend: str = opt("vllm", choices=BACKENDS, help="engine the workers run (and whose "
                                                      "measured kernels are used)")
    isl: int = opt(0, help="input tokens per request (uncached)")
    osl: int = opt(0, help="output tokens per request")
    ttft_ms: float = opt(0.0, help="time-to-first-token target")
    itl_ms: float = opt(0.0, help="inter-token latency target")
    out: str = opt("", help="directory to write layout.json, k8s/, compose.override.yaml and "
                            "up.sh to (none: print only)")
    base_dir: str = opt("", help="Turnout checkout whose k8s/ and docker-compose.yml the files "
                                 "extend (default: the one this turnout runs from)")
    seed_profile: str = opt("", help="also write a planner performance file (`turnout planner "
                                     "--profile`) fitted to aiconfigurator's step estimates")
    serve: bool = opt(False, help="serve a web page instead: the inputs, the Pareto frontier, "
                                  "the layout and its files")
    host: str = opt("127.0.0.1", help="--serve: address to bind")
    port: int = opt(8601, help="--serve: port")


def request_of(cfg: ConfigureConfig) -> Request:
    return Request(cfg.model, cfg.gpus, cfg.system, cfg.backend, cfg.isl, cfg.osl,
                   cfg.ttft_ms, cfg.itl_ms)


@dataclasses.dataclass
class Outcome:
    choice: Choice
    files: dict[str, str]
    aiconfigurator: str


class Ticker:
    """Progress lines: aiconfigurator's own, and a heartbeat while it is silent."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.started = time.monotonic()
        self.last = self.started

    def __call__(self, message: str) -> None:
        self.last = time.monotonic()
        self.say(f"[{self.last - self.started:.0f} s] {message}")

    async def beat(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if time.monotonic() - self.last >= _TICK_S:
                self("still estimating")


async def configure(request: Request, base: Base | None, k8s_base_ref: str, with_profile: bool,
                    say: Callable[[str], None]) -> Outcome:
    """Sweep, choose, (fit the seed profile,) render: EstimateError or NoLayout otherwise."""
    ticker = Ticker(say)
    beat = asyncio.create_task(ticker.beat())
    try:
        sweep = await run_estimate(request.sweep(), ticker)
        version = sweep["aiconfigurator"]
        if version != AICONFIGURATOR_VERSION:
            ticker(f"aiconfigurator {version} is installed; turnout configure reads "
                   f"{AICONFIGURATOR_VERSION}'s answers")
        try:
            choice = choose(request, sweep)
        except (KeyError, TypeError, ValueError) as exc:
            raise EstimateError(f"cannot read aiconfigurator {version}'s answer ({exc!r}); "
                                f"install aiconfigurator=={AICONFIGURATOR_VERSION}") from None
        profile = None
        if with_profile:
            ticker("estimating engine steps for the planner's seed profile")
            steps = await run_estimate(steps_request(choice.layout), ticker)
            try:
                profile = profile_document(choice.layout, steps)
            except (KeyError, TypeError, ValueError) as exc:
                raise EstimateError(f"cannot fit the seed profile to aiconfigurator's step "
                                    f"estimates ({exc})") from None
    finally:
        beat.cancel()
    files = render(choice, frontier(sweep), base, k8s_base_ref, sweep["aiconfigurator"],
                   profile)
    return Outcome(choice, files, sweep["aiconfigurator"])
