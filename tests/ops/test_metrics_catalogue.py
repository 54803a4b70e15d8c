"""docs/metrics.md against live processes (frontend, router, worker and a dry-run planner):
every documented series is exported, every exported `turnout_*` series is documented, and the
counters move under load."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest

from common import prometheus_text
from turnout.testing.deployment import Deployment, wait_for

pytestmark = pytest.mark.e2e

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
SECTIONS = {"frontend": "## Frontend", "router": "## Router", "worker": "## Worker",
            "planner": "## Planner"}
_ROW = re.compile(r"^\|\s*(`turnout_[^|]*)\|\s*(\w+)\s*\|")
_NAME = re.compile(r"`(turnout_[a-z0-9_]+)`")
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def catalogue() -> dict[str, dict[str, str]]:
    """service → {exported series name: type}, from the doc's tables."""
    text = DOC.read_text()
    out: dict[str, dict[str, str]] = {}
    for service, heading in SECTIONS.items():
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        rows: dict[str, str] = {}
        for line in text[start:end if end > 0 else None].splitlines():
            m = _ROW.match(line)
            if m is None:
                continue
            kind = m.group(2)
            assert kind in _SUFFIXES, f"unknown type {kind!r} in: {line}"
            names = _NAME.findall(m.group(1))
            assert names, line
            for name in names:
                assert name.startswith(f"turnout_{service}_"), f"{name} is not a {service} series"
                rows[name] = kind
        assert rows, f"no series documented under {heading}"
        out[service] = rows
    return out


def exported(text: str) -> dict[str, str]:
    """Exported series name → type, for every `turnout_*` family the exposition declares
    (labelled families without children yet count: they are declared, just empty)."""
    out: dict[str, str] = {}
    for family, kind in prometheus_text.parse(text).types.items():
        # `_created` timestamps come with every counter and histogram (the doc says so).
        if not family.startswith("turnout_") or family.endswith("_created"):
            continue
        for suffix in _SUFFIXES.get(kind, ("",)):
            out[family + suffix] = kind
    return out


def test_catalogue_parses() -> None:
    docs = catalogue()
    # What the issue asks for at least, per service.
    wanted = {
        "frontend": ["requests_total", "errors_total", "time_to_first_token_seconds_count",
                     "inter_token_latency_seconds_count", "request_duration_seconds_count",
                     "input_tokens_total", "output_tokens_total", "cached_tokens_total",
                     "active_requests", "queued_requests", "client_disconnects_total",
                     "rejections_total"],
        "router": ["decisions_total", "decision_seconds_count", "kv_index_blocks",
                   "kv_events_applied_total", "kv_resyncs_total", "migrations_total",
                   "worker_up"],
        "worker": ["engine_steps_total", "batch_size_count", "running_requests",
                   "waiting_requests", "kv_blocks_used", "kv_blocks_total",
                   "prefix_cache_hit_rate", "prefill_tokens_total", "decode_tokens_total"],
        "planner": ["adjustments_total", "predicted_request_rate", "observed_request_rate",
                    "needed_replicas", "target_replicas", "current_replicas",
                    "scaling_actions_total", "scrape_errors_total"],
    }
    for service, names in wanted.items():
        for name in names:
            assert f"turnout_{service}_{name}" in docs[service], name


def test_every_documented_series_is_exported_and_moves(deployment: Deployment) -> None:
    docs = catalogue()
    deployment.start(workers=1, worker_args=("--speedup-ratio", "0"))
    # --min-replicas 2 with one worker: every interval decides to scale up (dry run: it does not).
    planner = deployment.start_planner("--dry-run", "--adjustment-interval-s", "0.3",
                                       "--min-replicas", "2")
    services = {"router": deployment.router, "worker": deployment.service("w1"),
                "planner": planner}

    def scrape() -> dict[str, str]:
        texts = {"frontend": httpx.get(deployment.url + "/metrics", timeout=5).text}
        for name, service in services.items():
            texts[name] = httpx.get(service.metrics_url(), timeout=5).text
        return texts

    def adjustments() -> float:
        return planner.metrics().value("turnout_planner_adjustments_total")

    # The planner's labelled series appear with its first interval.
    wait_for(lambda: adjustments() >= 1, 10, "the planner's first adjustment")
    before = {s: prometheus_text.parse(t) for s, t in scrape().items()}
    oai = openai.OpenAI(base_url=deployment.url + "/v1", api_key="x", max_retries=0, timeout=30)
    prompt = "A prompt long enough to fill a few KV blocks of sixty-four tokens each. " * 4
    for _ in range(3):  # the repeats hit the prefix cache
        out = oai.completions.create(model="mock", prompt=prompt, max_tokens=8,
                                     extra_body={"ignore_eos": True})
        assert out.usage is not None and out.usage.completion_tokens == 8
    chunks = list(oai.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        extra_body={"ignore_eos": True}))
    assert chunks
    bad = httpx.post(deployment.url + "/v1/completions", timeout=5,
                     json={"model": "no-such-model", "prompt": "x", "max_tokens": 1})
    assert bad.status_code == 404
    wait_for(lambda: deployment.router.metrics().value("turnout_router_kv_index_blocks") > 0,
             5, "the router to index the KV events")
    done = adjustments()
    wait_for(lambda: adjustments() > done, 10, "an adjustment after the load")

    texts = scrape()
    for service, documented in docs.items():
        live = exported(texts[service])
        missing = sorted(n for n in documented if n not in live)
        assert not missing, f"{service}: documented but not exported: {missing}"
        undocumented = sorted(n for n in live if n not in documented)
        assert not undocumented, f"{service}: exported but not in docs/metrics.md: {undocumented}"
        for name, kind in documented.items():
            assert live[name] == kind, f"{name}: documented as {kind}, exported as {live[name]}"

    after = {s: prometheus_text.parse(t) for s, t in texts.items()}
    moved = {
        "frontend": ["turnout_frontend_requests_total", "turnout_frontend_input_tokens_total",
                     "turnout_frontend_output_tokens_total", "turnout_frontend_cached_tokens_total",
                     "turnout_frontend_time_to_first_token_seconds_count",
                     "turnout_frontend_inter_token_latency_seconds_count",
                     "turnout_frontend_request_duration_seconds_count",
                     "turnout_frontend_rejections_total", "turnout_frontend_errors_total"],
        "router": ["turnout_router_decisions_total", "turnout_router_decision_seconds_count",
                   "turnout_router_requests_total", "turnout_router_kv_events_applied_total",
                   "turnout_router_predicted_overlap_ratio_count"],
        "worker": ["turnout_worker_engine_steps_total", "turnout_worker_batch_size_count",
                   "turnout_worker_prefill_tokens_total", "turnout_worker_decode_tokens_total",
                   "turnout_worker_prompt_tokens_total", "turnout_worker_cached_tokens_total",
                   "turnout_worker_requests_total"],
        "planner": ["turnout_planner_adjustments_total",
                    "turnout_planner_scaling_actions_total"],
    }
    for service, names in moved.items():
        for name in names:
            assert name in docs[service], f"{name} is not in the catalogue"
            assert after[service].value(name) > before[service].value(name), \
                f"{service}: {name} did not move under load"

    f, r, w, p = after["frontend"], after["router"], after["worker"], after["planner"]
    assert f.value("turnout_frontend_output_tokens_total") == 3 * 8 + 4
    assert f.value("turnout_frontend_errors_total", endpoint="completions",
                   error_type="model_not_found", model="") == 1
    assert f.value("turnout_frontend_active_requests") == 0
    assert f.value("turnout_frontend_queued_requests") == 0
    assert r.value("turnout_router_worker_up", worker="w1") == 1
    assert r.value("turnout_router_decisions_total", policy="kv") == 4
    assert r.value("turnout_router_kv_index_blocks") > 0
    assert r.value("turnout_router_kv_resyncs_total") >= 1  # the worker's state, on admission
    assert w.value("turnout_worker_kv_blocks_total") > 0
    hit_rate = w.value("turnout_worker_prefix_cache_hit_rate")
    cached = w.value("turnout_worker_cached_tokens_total")
    prompt_tokens = w.value("turnout_worker_prompt_tokens_total")
    assert 0 < hit_rate < 1 and hit_rate == pytest.approx(cached / prompt_tokens)
    assert p.value("turnout_planner_current_replicas", role="aggregated") == 1
    assert p.value("turnout_planner_target_replicas", role="aggregated") == 2
    assert p.value("turnout_planner_scaling_actions_total", role="aggregated",
                   direction="up") >= 2
    assert p.value("turnout_planner_observed_request_rate") >= 0
    assert p.value("turnout_planner_scrape_errors_total") == 0
