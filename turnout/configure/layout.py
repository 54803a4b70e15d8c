"""The layout chosen from an aiconfigurator sweep, checked against the targets here.

aiconfigurator ranks configurations per experiment (`agg`, `disagg`); a row describes one
*replica*: an aggregated worker, or xPyD prefill and decode workers, on `num_total_gpus` GPUs,
repeated `gpus // num_total_gpus` times. A layout is the replicas flattened into Turnout's worker
pools (`Pool`: role, workers, tensor and pipeline parallelism, batch). Every row's TTFT and ITL
are compared with the targets again (its strict-SLA filter is trusted for nothing), rows Turnout
cannot translate (attention data parallelism, expert parallelism) or run (disaggregated rows of
an engine whose KV it does not move) are left out, and the one with the most output tokens per
second per GPU of the whole budget wins.

Owns reading the sweep and the choice; does not run aiconfigurator (`estimate`) or write files.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from services.worker.engines import SPLIT_ENGINES

MODES = {"agg": "aggregated", "disagg": "disaggregated"}


class NoLayout(RuntimeError):
    """No configuration meets the targets; the message is one line."""


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    model: str
    gpus: int
    system: str
    backend: str
    isl: int
    osl: int
    ttft_ms: float
    itl_ms: float

    def validate(self) -> None:
        """ValueError (one line) on input no sweep can take."""
        if not self.model.strip():
            raise ValueError("--model is required (a Hugging Face id aiconfigurator bundles, "
                             "e.g. Qwen/Qwen3-32B-FP8, or a directory holding config.json)")
        for name in ("gpus", "isl", "osl"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("ttft_ms", "itl_ms"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got "
                                 f"{getattr(self, name)}")
        if not self.system.strip():
            raise ValueError("--system is required (e.g. h200_sxm)")

    def sweep(self) -> dict[str, Any]:
        """The `estimate` child's request for this sweep."""
        return {"kind": "sweep", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True, slots=True)
class Pool:
    role: str  # "aggregated" | "prefill" | "decode" (the worker's --worker-mode)
    workers: int
    tp: int
    pp: int
    batch: int  # requests one worker runs at once (prefill: per step)

    @property
    def gpus_per_worker(self) -> int:
        return self.tp * self.pp

    @property
    def gpus(self) -> int:
        return self.workers * self.gpus_per_worker


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    request: Request
    mode: str  # "aggregated" | "disaggregated"
    pools: tuple[Pool, ...]
    replicas: int  # aiconfigurator's units (its row repeated)
    backend_version: str
    ttft_ms: float
    itl_ms: float
    tokens_per_s_per_gpu: float  # over every GPU of the budget, idle ones included
    tokens_per_s_per_user: float
    requests_per_s: float
    concurrency: int  # requests in flight over the whole layout

    @property
    def gpus_used(self) -> int:
        return sum(p.gpus for p in self.pools)

    def pool(self, role: str) -> Pool | None:
        return next((p for p in self.pools if p.role == role), None)

    def workers_summary(self) -> str:
        """The workers and their parallelism, e.g. `1 prefill worker (TP4, batch 1) + ...`."""
        return " + ".join(f"{p.workers} {p.role} worker{'s' if p.workers != 1 else ''} "
                          f"(TP{p.tp}{f' PP{p.pp}' if p.pp > 1 else ''}, batch {p.batch})"
                          for p in self.pools)

    def summary(self) -> str:
        """One line: the mode, the workers and their parallelism."""
        return f"{self.mode}: {self.workers_summary()}"

    def as_json(self) -> dict[str, Any]:
        return {"request": dataclasses.asdict(self.request), "mode": self.mode,
                "pools": [dataclasses.asdict(p) for p in self.pools],
                "replicas": self.replicas, "gpus_used": self.gpus_used,
                "backend_version": self.backend_version,
                "predicted": {"ttft_ms": self.ttft_ms, "itl_ms": self.itl_ms,
                              "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                              "tokens_per_s_per_user": self.tokens_per_s_per_user,
                              "requests_per_s": self.requests_per_s,
                              "concurrency": self.concurrency}}


@dataclasses.dataclass(frozen=True, slots=True)
class FrontierPoint:
    mode: str
    itl_ms: float
    ttft_ms: float
    tokens_per_s_per_gpu: float  # per GPU the configuration uses
    tokens_per_s_per_user: float
    gpus: int  # of one replica


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    layout: Layout
    best_by_mode: dict[str, Layout]  # each mode's best layout, for comparison
    candidates: int  # rows that met the targets and translate
    missed_targets: int  # rows aiconfigurator returned that miss a target (dropped)
    untranslatable: int  # rows needing data or expert parallelism (dropped)
    unsplittable: int = 0  # disaggregated rows of an engine Turnout cannot split (dropped)


def _int(row: dict[str, Any], key: str, default: int = 1) -> int:
    value = row.get(key)
    return int(value) if isinstance(value, int | float) and value == value else default


def _translatable(row: dict[str, Any], prefix: str) -> bool:
    return _int(row, f"{prefix}dp") == 1 and _int(row, f"{prefix}moe_ep") == 1


def layout_from_row(request: Request, experiment: str, row: dict[str, Any]) -> Layout | None:
    """The layout of one aiconfigurator row; None when Turnout cannot run it (data or expert
    parallelism) or it does not fit the GPUs."""
    per_replica = _int(row, "num_total_gpus", 0)
    if per_replica < 1 or per_replica > request.gpus:
        return None
    replicas = request.gpus // per_replica
    if experiment == "agg":
        if not _translatable(row, ""):
            return None
        pools: tuple[Pool, ...] = (Pool("aggregated", replicas, _int(row, "tp"), _int(row, "pp"),
                                        _int(row, "bs")),)
    elif experiment == "disagg":
        if not (_translatable(row, "(p)") and _translatable(row, "(d)")):
            return None
        pools = (Pool("prefill", replicas * _int(row, "(p)workers"), _int(row, "(p)tp"),
                      _int(row, "(p)pp"), _int(row, "(p)bs")),
                 Pool("decode", replicas * _int(row, "(d)workers"), _int(row, "(d)tp"),
                      _int(row, "(d)pp"), _int(row, "(d)bs")))
    else:
        return None
    version = str(row.get("version") or row.get("(d)version") or "")
    return Layout(
        request=request, mode=MODES[experiment], pools=pools, replicas=replicas,
        backend_version=version, ttft_ms=float(row["ttft"]), itl_ms=float(row["tpot"]),
        tokens_per_s_per_gpu=float(row["tokens/s"]) * replicas / request.gpus,
        tokens_per_s_per_user=float(row["tokens/s/user"]),
        requests_per_s=float(row["request_rate"]) * replicas,
        concurrency=_int(row, "concurrency", 0) * replicas)


def meets(request: Request, row: dict[str, Any]) -> bool:
    return float(row["ttft"]) <= request.ttft_ms and float(row["tpot"]) <= request.itl_ms


def choose(request: Request, sweep: dict[str, Any]) -> Choice:
    """The best layout of the sweep (the `estimate` child's `result`) that meets the targets;
    NoLayout when none does."""
    best: Layout | None = None
    by_mode: dict[str, Layout] = {}
    candidates = missed = untranslatable = unsplittable = 0
    for experiment, found in sweep.get("experiments", {}).items():
        for row in found.get("best", []):
            if not meets(request, row):
                missed += 1
                continue
            if experiment == "disagg" and request.backend not in SPLIT_ENGINES:
                unsplittable += 1
                continue
            layout = layout_from_row(request, experiment, row)
            if layout is None:
                untranslatable += 1
                continue
            candidates += 1
            if best is None or layout.tokens_per_s_per_gpu > best.tokens_per_s_per_gpu:
                best = layout
            mode_best = by_mode.get(layout.mode)
            if mode_best is None or layout.tokens_per_s_per_gpu > mode_best.tokens_per_s_per_gpu:
                by_mode[layout.mode] = layout
    if best is None:
        why = (f"no configuration of {request.model} on {request.gpus} x {request.system} "
               f"({request.backend}) meets TTFT <= {request.ttft_ms:g} ms and ITL <= "
               f"{request.itl_ms:g} ms at ISL {request.isl} / OSL {request.osl}")
        if untranslatable:
            why += (f" ({untranslatable} that do need attention data or expert parallelism, "
                    "which turnout configure does not translate)")
        elif unsplittable:
            why += (f" ({unsplittable} disaggregated ones do, but Turnout does not run "
                    f"{request.backend} disaggregated yet)")
        else:
            why += "; loosen a target, add GPUs or try another --backend"
        raise NoLayout(why)
    return Choice(best, by_mode, candidates, missed, untranslatable, unsplittable)


def frontier(sweep: dict[str, Any]) -> list[FrontierPoint]:
    """Every experiment's Pareto frontier (throughput per GPU against ITL), as aiconfigurator
    returned it with the strict-SLA filter."""
    points = []
    for experiment, found in sweep.get("experiments", {}).items():
        for row in found.get("pareto", []):
            points.append(FrontierPoint(
                MODES.get(experiment, experiment), float(row["tpot"]), float(row["ttft"]),
                float(row["tokens/s/gpu"]), float(row["tokens/s/user"]),
                _int(row, "num_total_gpus", 0)))
    return points
