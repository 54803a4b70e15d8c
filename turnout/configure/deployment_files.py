"""Every file `turnout configure` writes for a chosen layout, by path (command and web page
alike): `layout.json`, `k8s/` (the overlay), `compose.override.yaml`, `up.sh` and, with a seed
profile, `planner-profile.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turnout.configure.compose_override import override
from turnout.configure.k8s_overlay import overlay
from turnout.configure.layout import Choice, FrontierPoint
from turnout.configure.up_command import commands

REPO_ROOT = Path(__file__).resolve().parents[2]  # a checkout: k8s/ and docker-compose.yml
PROFILE = "planner-profile.json"


@dataclass(frozen=True, slots=True)
class Base:
    """Turnout's own deployment files the overlay and override extend."""

    k8s: Path
    compose: Path

    @classmethod
    def find(cls, base_dir: str) -> Base | None:
        """The files in `base_dir` (ValueError, one line, when it lacks them), else in the
        checkout this turnout runs from (None when it runs from an installed package)."""
        root = Path(base_dir) if base_dir else REPO_ROOT
        base = cls(root / "k8s", root / "docker-compose.yml")
        if not (base.k8s / "kustomization.yaml").is_file() or not base.compose.is_file():
            if not base_dir:
                return None
            raise ValueError(f"{root} holds no k8s/kustomization.yaml and docker-compose.yml "
                             "to extend (--base-dir: a Turnout checkout)")
        return base


def render(choice: Choice, frontier: list[FrontierPoint], base: Base | None, k8s_base_ref: str,
           aiconfigurator: str, profile: dict[str, Any] | None = None) -> dict[str, str]:
    """The files (relative path → text). `k8s_base_ref` is the base k8s/ directory as the
    overlay's kustomization names it, relative to the overlay. Without a base, no overlay and
    no override."""
    layout = choice.layout
    lines, notes = commands(layout)
    profile_text = json.dumps(profile, indent=1) + "\n" if profile is not None else None
    files: dict[str, str] = {}
    if base is not None:
        files.update({f"k8s/{name}": text for name, text in
                      overlay(layout, base.k8s, k8s_base_ref, profile_text).items()})
        files["compose.override.yaml"] = override(layout, base.compose)
    files["up.sh"] = ("#!/bin/sh\n# turnout configure: " + layout.summary() + "\n"
                      + "".join(f"# note: {n}\n" for n in notes)
                      + ("exec " + lines[0] + "\n" if len(lines) == 1
                         else "".join(f"{line} &\n" for line in lines) + "wait\n"))
    if profile_text is not None:
        files[PROFILE] = profile_text
    doc = layout.as_json()
    doc["aiconfigurator"] = aiconfigurator
    doc["commands"] = lines
    doc["notes"] = notes
    doc["best_by_mode"] = {mode: other.as_json()["predicted"] | {"layout": other.workers_summary()}
                           for mode, other in choice.best_by_mode.items()}
    doc["frontier"] = [{"mode": p.mode, "itl_ms": p.itl_ms, "ttft_ms": p.ttft_ms,
                        "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
                        "tokens_per_s_per_user": p.tokens_per_s_per_user, "gpus": p.gpus}
                       for p in frontier]
    files["layout.json"] = json.dumps(doc, indent=1) + "\n"
    return files

