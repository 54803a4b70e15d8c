"""deploy/grafana/dashboards/turnout.json: valid, complete, and every PromQL expression names
only series the services export, with the suffix its type gives it (`_total` for counters,
`_bucket`/`_sum`/`_count` for histograms). The exported names are read from the expositions of
the services' own metrics registries (what their /metrics serve; test_metrics_catalogue.py holds
those to docs/metrics.md on live processes). test_prometheus.py evaluates the same expressions in
a real Prometheus scraping a real deployment."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from common import prometheus_text
from services.frontend.metrics import FrontendMetrics
from services.planner.metrics import PlannerMetrics
from services.router.metrics import RouterMetrics
from services.worker.metrics import WorkerMetrics
from tests.ops.host_run import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "turnout.json"
_SERIES = re.compile(r"\bturnout_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count")}
# One series per thing the dashboard must show.
REQUIRED = {
    "throughput (req/s)": "turnout_frontend_requests_total",
    "throughput (tokens/s)": "turnout_frontend_output_tokens_total",
    "TTFT percentiles": "turnout_frontend_time_to_first_token_seconds_bucket",
    "ITL percentiles": "turnout_frontend_inter_token_latency_seconds_bucket",
    "cache hit rate (cached)": "turnout_worker_cached_tokens_total",
    "cache hit rate (prompt)": "turnout_worker_prompt_tokens_total",
    "running per worker": "turnout_worker_running_requests",
    "waiting per worker": "turnout_worker_waiting_requests",
    "KV blocks used": "turnout_worker_kv_blocks_used",
    "migrations": "turnout_router_migrations_total",
    "planner targets": "turnout_planner_target_replicas",
}


def exported_series() -> dict[str, str]:
    """Exported series name → its type, for every family the services' registries declare
    (labelled families without children included: declared, just empty until first used)."""
    registries = [FrontendMetrics(CollectorRegistry()).registry, RouterMetrics("r").registry,
                  WorkerMetrics("w", "m").registry, PlannerMetrics().registry]
    out: dict[str, str] = {}
    for registry in registries:
        metrics = prometheus_text.parse(generate_latest(registry).decode())
        for family, kind in metrics.types.items():
            for suffix in SUFFIXES[kind]:
                out[family + suffix] = kind
    return out


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def series_in(expr: str) -> set[str]:
    return set(_SERIES.findall(expr))


def resolves(series: str, exported: dict[str, str]) -> bool:
    return series in exported


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] == "turnout" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["type"] == "timeseries" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
            assert expr.count("[") == expr.count("]"), expr
            for var in re.findall(r"\$(\w+)", expr):
                assert var in variables or var.startswith("__"), f"{var} in {expr}"
    assert "model" in variables


def test_every_expression_uses_series_the_code_exports() -> None:
    exported = exported_series()
    assert {"turnout_frontend_requests_total", "turnout_router_migrations_total",
            "turnout_worker_running_requests", "turnout_planner_target_replicas",
            "turnout_frontend_time_to_first_token_seconds_bucket"} <= set(exported)
    bad = {(title, name) for title, expr in targets() for name in series_in(expr)
           if not resolves(name, exported)}
    assert not bad
    assert all(series_in(expr) for _, expr in targets())


def test_the_extraction_catches_a_wrong_name() -> None:
    exported = exported_series()
    assert resolves("turnout_frontend_requests_total", exported)
    assert not resolves("turnout_frontend_requests", exported)  # a counter without _total
    assert not resolves("turnout_worker_running_requests_total", exported)  # a gauge
    assert not resolves("turnout_frontend_ttft_seconds_bucket", exported)
    assert not resolves("turnout_worker_batch_size", exported)  # a histogram, bare
    # Named in the code as a string literal (the engine-series prefix), but no series.
    assert not resolves("turnout_engine_", exported)


def test_every_required_view_is_there() -> None:
    used = set().union(*(series_in(expr) for _, expr in targets()))
    missing = {what: name for what, name in REQUIRED.items() if name not in used}
    assert not missing
