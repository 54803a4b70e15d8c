"""A real Prometheus scraping a real deployment (`turnout up` plus `turnout planner --dry-run`).

The scrape jobs are deploy/prometheus/prometheus.yml's own, with each job's DNS discovery of its
compose service swapped for a file of targets taken from the deployment's discovery records
(compose's fixed ports would collide on one machine). Every Grafana dashboard expression is then
evaluated through the HTTP API: each must parse and run, and the ones that describe traffic must
return finite numbers after real requests. Skipped only when the `prometheus` binary is missing
(`apt-get install -y prometheus`).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.ops.host_run import ROOT, HostRun, chat, free_port, get_ok
from tests.ops.test_dashboard import targets
from turnout.testing.deployment import read_records, scrape, wait_for

pytestmark = pytest.mark.e2e

PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
JOB_ROLE = {"turnout-frontend": "frontend", "turnout-router": "router",
            "turnout-worker": "worker", "turnout-planner": "planner"}
# Panels that only have data after a failure or a scaling decision.
EVENT_ONLY = {"Migrations / s", "Worker failures", "Scaling decisions"}
# Panels that only have data with prefill/decode workers (this deployment is aggregated).
DISAGG_ONLY = {"Prefill path decisions and hand-offs / s", "KV hand-off: blocks pulled vs cached",
               "Lease ends / s", "Hand-off latency (first token to decode)",
               "KV transfer time", "Replicas: prefill pool", "Replicas: decode pool"}
# Series that are NaN by design: no forecast yet, or lengths and latencies observed in an
# interval in which no request ended.
MAY_BE_NAN = {"turnout_planner_needed_replicas", "turnout_planner_observed_input_tokens",
              "turnout_planner_observed_output_tokens", "turnout_planner_observed_ttft_seconds",
              "turnout_planner_observed_itl_seconds"}
SHARED_PREFIX = "You are a careful assistant. Answer briefly and exactly. " * 6


def scrape_config(records: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] not in JOB_ROLE:
            continue  # Prometheus's own job: nothing of Turnout's
        assert set(job) == {"job_name", "dns_sd_configs"}, "the test swaps only the discovery"
        role = JOB_ROLE[job["job_name"]]
        found = []
        for record in records:
            if record["role"] == role:
                url = urlsplit(record["endpoints"]["metrics"])
                assert url.path == "/metrics"
                found.append(url.netloc)
        targets_file = tmp / f"{job['job_name']}.json"
        targets_file.write_text(json.dumps([{"targets": sorted(found)}]))
        del job["dns_sd_configs"]
        job["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]


def dashboard_expr(expr: str) -> str:
    return expr.replace("$__rate_interval", "30s").replace("$model", ".*")


@pytest.mark.timeout(180)
def test_prometheus_scrapes_every_service_and_the_dashboard_queries_work(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (apt-get install -y prometheus)")
    discovery = tmp_path / "discovery"
    port = free_port()
    run = HostRun(tmp_path)
    prom: subprocess.Popen[bytes] | None = None
    try:
        run.start("up", ["up", "--discovery", f"file:{discovery}", "--port", str(port),
                         "--workers", "2", "--speedup-ratio", "4", "--lease-ttl-s", "5"], {})
        run.start("planner", ["planner", "--dry-run", "--discovery", f"file:{discovery}",
                              "--adjustment-interval-s", "1", "--lease-ttl-s", "5"], {})
        base = f"http://127.0.0.1:{port}"

        def records() -> list[dict[str, Any]]:
            run.check_alive()
            return read_records(discovery)

        def every_role_registered() -> list[dict[str, Any]] | None:
            found = records()
            roles = sorted(r["role"] for r in found)
            return found if roles == ["frontend", "planner", "router", "worker", "worker"] \
                else None

        found = wait_for(every_role_registered, 60, "frontend, router, 2 workers and planner")
        wait_for(lambda: get_ok(base + "/health"), 30, "the frontend to be healthy")

        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(found, tmp_path)))  # type: ignore[arg-type]
        prom_port = free_port()
        prom_log = tmp_path / "prometheus.log"
        with open(prom_log, "wb") as out:
            prom = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)
        api = Prometheus(f"http://127.0.0.1:{prom_port}")
        wait_for(lambda: get_ok(api.url + "/-/ready"), 30, "prometheus to be ready")

        def all_up() -> bool:
            assert prom is not None and prom.poll() is None, prom_log.read_text()
            up = api.query("up")
            by_job: dict[str, list[float]] = {}
            for sample in up:
                by_job.setdefault(sample["metric"]["job"], []).append(float(sample["value"][1]))
            return by_job == {"turnout-frontend": [1.0], "turnout-router": [1.0],
                              "turnout-worker": [1.0, 1.0], "turnout-planner": [1.0]}

        wait_for(all_up, 30, "every target to be scraped successfully", interval=0.5)

        def scraped(expr: str) -> float:
            result = api.query(expr)
            return float(result[0]["value"][1]) if result else 0.0

        def live(role: str, name: str) -> float:
            return sum(scrape(r["endpoints"]["metrics"]).value(name)
                       for r in read_records(discovery) if r["role"] == role)

        # Real traffic with a shared prefix (cache hits), until Prometheus has seen it grow in
        # three scrapes (a rate needs two points), then until it has scraped all of it.
        ok_requests = 'sum(turnout_frontend_requests_total{status="200"})'
        deadline = time.monotonic() + 60
        sent = growths = 0
        last = scraped(ok_requests)
        while growths < 3 or sent < 12:
            assert time.monotonic() < deadline, f"Prometheus saw the traffic grow {growths}x"
            chat(base, prompt=f"{SHARED_PREFIX} question {sent}")
            sent += 1
            now = scraped(ok_requests)
            growths, last = growths + (now > last), now
        prompt_tokens = live("worker", "turnout_worker_prompt_tokens_total")
        wait_for(lambda: scraped(ok_requests) >= sent
                 and scraped("sum(turnout_worker_prompt_tokens_total)") >= prompt_tokens,
                 30, "Prometheus to scrape the whole traffic", interval=0.5)

        per_job = api.query('count by (job) ({__name__=~"turnout_.+"})')
        assert {s["metric"]["job"] for s in per_job} == set(JOB_ROLE)
        ok = api.query(
            'sum(increase(turnout_frontend_requests_total{status="200"}[1m]))')
        assert ok and float(ok[0]["value"][1]) >= sent * 0.5

        empty, not_finite = [], []
        for title, expr in targets():
            result = api.query(dashboard_expr(expr))  # asserts it parses and runs
            if title in EVENT_ONLY | DISAGG_ONLY:
                continue
            values = [float(s["value"][1]) for s in result]
            if not values:
                empty.append((title, expr))
            elif not any(math.isfinite(v) for v in values) and \
                    not any(name in expr for name in MAY_BE_NAN):
                not_finite.append((title, expr, values))
        assert not empty, f"dashboard queries with no data after traffic: {empty}"
        assert not not_finite, f"dashboard queries with no finite value: {not_finite}"
        hit = api.query(dashboard_expr(
            "sum(rate(turnout_worker_cached_tokens_total[$__rate_interval])) / "
            "sum(rate(turnout_worker_prompt_tokens_total[$__rate_interval]))"))
        assert 0 < float(hit[0]["value"][1]) < 1, hit
        ttft = api.query(dashboard_expr(
            "histogram_quantile(0.5, sum by (le) (rate("
            "turnout_frontend_time_to_first_token_seconds_bucket[$__rate_interval])))"))
        assert 0 < float(ttft[0]["value"][1]) < 5, ttft
    except BaseException:
        print(run.logs())
        if prom is not None:
            print((tmp_path / "prometheus.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom.kill()
        run.close()


def test_scrape_config_swaps_only_the_discovery(tmp_path: Path) -> None:
    records = [
        {"role": "worker", "endpoints": {"metrics": "http://127.0.0.1:1111/metrics"}},
        {"role": "worker", "endpoints": {"metrics": "http://127.0.0.1:2222/metrics"}},
        {"role": "router", "endpoints": {"metrics": "http://127.0.0.1:3333/metrics"}},
    ]
    config = scrape_config(records, tmp_path)
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == set(JOB_ROLE)
    (worker_sd,) = jobs["turnout-worker"]["file_sd_configs"]
    assert json.loads(Path(worker_sd["files"][0]).read_text()) == [
        {"targets": ["127.0.0.1:1111", "127.0.0.1:2222"]}]
    assert sys.executable  # the deployment itself runs under this interpreter
