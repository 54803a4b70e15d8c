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
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from common.config import parse_configs
from turnout.configure.deployment_files import PROFILE, Base
from turnout.configure.estimate import (
    NOT_INSTALLED,
    EstimateError,
    installed,
)
from turnout.configure.layout import Layout, NoLayout
from turnout.configure.run import ConfigureConfig, Outcome, configure, request_of


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
    if outcome.choice.unsplittable:
        lines.append(f"  ({outcome.choice.unsplittable} disaggregated configurations met the "
                     f"targets but were dropped: Turnout does not run {r.backend} "
                     "disaggregated yet)")
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

