"""`turnout configure`: the layout, predicted figures and deployment files for a model on N GPUs
under TTFT/ITL targets (`--serve`: the same as a web page).

It runs NVIDIA's aiconfigurator (the `configure` extra; offline, on CPU, ~10-30 s) with its
strict-SLA option, checks every configuration's figures against the targets itself, picks the
one with the most output tokens per second per GPU, prints it with the `turnout up` line and,
with `--out DIR`, writes `layout.json`, `k8s/` (a kustomize overlay of Turnout's k8s/),
`compose.override.yaml` and `up.sh`; `--seed-profile FILE` also writes a planner performance
file from aiconfigurator's step estimates. Progress goes to stderr; every failure is one line
and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common.config import opt, parse_configs
from turnout.configure.deployment_files import PROFILE, Base, render
from turnout.configure.estimate import (
    AICONFIGURATOR_VERSION,
    NOT_INSTALLED,
    EstimateError,
    installed,
)
from turnout.configure.estimate import run as run_estimate
from turnout.configure.layout import Choice, Layout, NoLayout, Request, choose, frontier
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


def report(outcome: Outcome) -> str:
    """What the command prints: the layout, its predicted figures and how to run it."""
    layout: Layout = outcome.choice.layout
    r = layout.request
    doc = json.loads(outcome.files["layout.json"])
    lines = [
        f"{r.model} on {r.gpus} x {r.system}, {r.backend} {layout.backend_version}, ISL {r.isl} "
        f"/ OSL {r.osl} (aiconfigurator {outcome.aiconfigurator}):",
        f"  layout: {layout.summary()}",
        f"  GPUs: {layout.gpus_used} of {r.gpus} used",
        "predicted (an estimate: the planner corrects it online):",
        f"  TTFT {layout.ttft_ms:.0f} ms (target {r.ttft_ms:g}), ITL {layout.itl_ms:.1f} ms "
        f"(target {r.itl_ms:g})",
        f"  {layout.tokens_per_s_per_gpu:.1f} output tokens/s per GPU, "
        f"{layout.tokens_per_s_per_user:.1f} tokens/s per user, "
        f"{layout.requests_per_s:.2f} requests/s at {layout.concurrency} in flight",
    ]
    for mode, other in sorted(outcome.choice.best_by_mode.items()):
        if mode != layout.mode:
            lines.append(f"  best {mode} for comparison: {other.tokens_per_s_per_gpu:.1f} "
                         f"tokens/s per GPU ({other.workers_summary()})")
    if outcome.choice.missed_targets:
        lines.append(f"  ({outcome.choice.missed_targets} configurations aiconfigurator "
                     "returned missed a target here and were dropped)")
    lines.append("run it on this machine:")
    lines += [f"  {c}" for c in doc["commands"]]
    lines += [f"  note: {n}" for n in doc["notes"]]
    return "\n".join(lines)


def write_files(files: dict[str, str], out: Path) -> list[Path]:
    written = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if name.endswith(".sh"):
            path.chmod(0o755)
        written.append(path)
    return written


def _fail(message: str) -> None:
    raise SystemExit(f"turnout configure: {message}")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    (cfg,) = parse_configs([ConfigureConfig], args, prog="turnout configure",
                           description=__doc__.split("\n\n")[0])
    try:
        base = Base.find(cfg.base_dir)
    except ValueError as exc:
        _fail(str(exc))
    if cfg.serve:
        given = [f for f in ("out", "seed_profile") if getattr(cfg, f)]
        if given:
            _fail(f"--{given[0].replace('_', '-')} applies to one run, not to --serve (the page "
                  "offers the files for download)")
        if not installed():
            _fail(NOT_INSTALLED)
        from turnout.configure.web import serve

        serve(cfg, base)
        return
    request = request_of(cfg)
    try:
        request.validate()
    except ValueError as exc:
        _fail(str(exc))
    out = Path(cfg.out) if cfg.out else None
    if out is not None and base is None:
        _fail("no k8s/ and docker-compose.yml beside this turnout (an installed package) for "
              "the files to extend: give --base-dir, a Turnout checkout")
    k8s_dir = (out or Path.cwd()).resolve() / "k8s"  # without --out nothing is written
    ref = os.path.relpath(base.k8s.resolve(), k8s_dir) if base is not None else ""

    def say(text: str) -> None:
        print(f"turnout configure: {text}", file=sys.stderr, flush=True)

    try:
        outcome = asyncio.run(configure(request, base, ref, bool(cfg.seed_profile), say))
    except (EstimateError, NoLayout) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted")
    print(report(outcome), flush=True)
    try:
        if cfg.seed_profile:
            Path(cfg.seed_profile).write_text(outcome.files[PROFILE])
            print(f"wrote {cfg.seed_profile}: `turnout planner --profile {cfg.seed_profile}`")
        if out is not None:
            write_files(outcome.files, out)
            print(f"wrote {out}/: layout.json; k8s/ (kubectl apply -k {out}/k8s); "
                  f"compose.override.yaml (docker compose -f docker-compose.yml -f "
                  f"{out}/compose.override.yaml up); up.sh")
    except OSError as exc:
        _fail(str(exc))

