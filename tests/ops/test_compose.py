"""docker-compose.yml, the Dockerfile and the Prometheus/Grafana files compose mounts.

No Docker engine runs here, so: `docker-compose config` validates the file (skipped, with the
reason, when the `docker-compose` package is not installed); every `turnout` service's command
runs as a real process on 127.0.0.1 with the compose environment, its fixed ports remapped and
its discovery volume replaced by a temporary directory, and must register, serve its metrics
and (all together) answer a chat completion; the banner script runs against that frontend; the
image's entrypoint runs with a stand-in `turnout`. Not exercised: building the image, Docker's
networking and DNS, the published ports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.host_run import ROOT, HostRun, chat, flag_value, get_ok, remap_ports
from turnout.testing.deployment import read_records, wait_for

COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
TURNOUT_SERVICES = {"router", "worker", "prefill-worker", "decode-worker", "encode-worker",
                    "frontend", "planner"}
# The flag that sets each service's /metrics port (the frontend serves it on its HTTP port).
METRICS_FLAG = {"router": "--router-metrics-port", "worker": "--worker-metrics-port",
                "prefill-worker": "--worker-metrics-port",
                "decode-worker": "--worker-metrics-port",
                "encode-worker": "--worker-metrics-port",
                "planner": "--planner-metrics-port", "frontend": "--port"}
ROLE = {"router": "router", "worker": "worker", "prefill-worker": "worker",
        "decode-worker": "worker", "encode-worker": "worker", "frontend": "frontend",
        "planner": "planner"}
# Disaggregated workers: the `disagg` profile, each with its --worker-mode.
WORKER_MODES = {"prefill-worker": "prefill", "decode-worker": "decode"}


def compose() -> dict[str, Any]:
    """The compose file as docker compose reads it with no variables set: anchors and `<<`
    merges resolved (PyYAML does both), `${NAME:-default}` replaced by its default."""
    return _interpolate(yaml.safe_load(COMPOSE.read_text()))


_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def _interpolate(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v) for v in node]
    if isinstance(node, str):
        return _VARIABLE.sub(lambda m: m.group(2) or "", node)
    return node


def turnout_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items()
            if svc.get("image", "").startswith("turnout") and "entrypoint" not in svc}


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    return exe


def test_docker_compose_accepts_the_file() -> None:
    exe = docker_compose()
    run = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    normalized = yaml.safe_load(run.stdout)["services"]
    ours = compose()["services"]
    assert set(normalized) == set(ours) == TURNOUT_SERVICES | {"prometheus", "grafana", "banner"}
    for name in TURNOUT_SERVICES:  # docker-compose reads the commands as PyYAML does
        assert normalized[name]["command"] == ours[name]["command"]
        assert normalized[name]["environment"] == ours[name]["environment"]
    assert normalized["frontend"]["ports"][0]["target"] == 8000
    assert normalized["banner"]["environment"]["PUBLIC_URL"] == "http://localhost:8000/v1"


def test_one_image_shared_discovery_and_scalable_workers() -> None:
    services = turnout_services()
    assert set(services) == TURNOUT_SERVICES
    mounts = set()
    for name, svc in services.items():
        assert svc["image"] == "turnout:latest" and svc["build"] == ".", name
        assert svc["command"][0] == ROLE[name], "each service runs its own subcommand"
        discovery = svc["environment"]["TURNOUT_DISCOVERY"]
        assert discovery.startswith("file:"), name
        volume, target = next((v.split(":")[0], v.split(":")[1]) for v in svc["volumes"])
        assert volume in compose()["volumes"], "a named volume, shared by every service"
        assert discovery.removeprefix("file:").startswith(target + "/"), name
        mounts.add((volume, target))
        assert svc["environment"]["TURNOUT_HOST"] == "0.0.0.0"
    assert len(mounts) == 1
    worker = services["worker"]
    # `--scale worker=N`: nothing in a worker may be the same for two replicas and collide.
    assert worker["deploy"]["replicas"] >= 2
    assert "container_name" not in worker and "ports" not in worker
    assert flag_value(worker["command"], "--worker-id") is None
    assert "TURNOUT_WORKER_ID" not in worker["environment"]
    assert flag_value(worker["command"], "--engine") == "mocker"
    # Router replicas scale the same way (no id, no published port, nothing to collide).
    router = services["router"]
    assert router["deploy"]["replicas"] >= 2
    assert "container_name" not in router and "ports" not in router
    assert flag_value(router["command"], "--router-id") is None
    assert services["planner"]["command"][:2] == ["planner", "--dry-run"]
    for name, mode in WORKER_MODES.items():
        svc = services[name]
        assert flag_value(svc["command"], "--worker-mode") == mode
        assert svc["profiles"] == ["disagg"], "off unless asked for"
        assert "container_name" not in svc and "ports" not in svc  # --scale works
        assert flag_value(svc["command"], "--worker-id") is None
        assert svc["command"][1:] == ["--worker-mode", mode, *worker["command"][1:]]
    encode = services["encode-worker"]  # images: the `multimodal` profile
    assert encode["profiles"] == ["multimodal"]
    assert "container_name" not in encode and "ports" not in encode
    assert encode["command"][1:] == ["--worker-mode", "encode", *worker["command"][1:]]


def test_prometheus_scrapes_every_service_where_it_serves_metrics() -> None:
    services = turnout_services()
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    scraped = set()
    for job in jobs.values():
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A", "one A record per container: scales with --scale"
            for name in sd["names"]:
                svc = services[name]
                assert str(sd["port"]) == flag_value(svc["command"], METRICS_FLAG[name]), name
                assert job["job_name"] == f"turnout-{name}"
                scraped.add(name)
    assert scraped == TURNOUT_SERVICES
    promtool = shutil.which("promtool")
    if promtool is not None:
        run = subprocess.run([promtool, "check", "config", str(PROMETHEUS)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_is_provisioned_with_the_prometheus_and_the_dashboard() -> None:
    svc = compose()["services"]["grafana"]
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in svc["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_dir = mounts["./deploy/grafana/dashboards"]
    (source,) = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    assert "prometheus" in compose()["services"]
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/turnout.yml").read_text())["providers"]
    assert provider["options"]["path"] == dash_dir
    home = svc["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dash_dir + "/")
    dashboard = json.loads((GRAFANA / "dashboards" / Path(home).name).read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}


def test_dockerfile_installs_the_package_and_its_entrypoint_runs_turnout(tmp_path: Path) -> None:
    text = (ROOT / "Dockerfile").read_text()
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for line in text.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            *sources, _dest = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source not in ignored, f"{source} is excluded by .dockerignore"
    for needed in ("common", "services", "turnout", "pyproject.toml"):
        assert needed not in ignored
    assert ".venv" in ignored and ".git" in ignored
    assert 'pip install --no-compile ".[kubernetes]"' in text
    entrypoint = json.loads(next(line for line in text.splitlines()
                                 if line.startswith("ENTRYPOINT"))[len("ENTRYPOINT"):])
    # The entrypoint with a stand-in `turnout` that shows what it was given.
    stub = tmp_path / "turnout"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$TURNOUT_ADVERTISE_HOST" "$@"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    args = ["worker", "--served-model-name", "a b", "--worker-port", "7100"]
    if shutil.which("hostname") is not None:
        run = subprocess.run([*entrypoint, *args], env=env, capture_output=True, text=True,
                             timeout=30)
        assert run.returncode == 0, run.stderr
        host, *passed = run.stdout.splitlines()
        assert passed == args  # quoting survives
        assert host and " " not in host and host not in ("0.0.0.0", "")
    run = subprocess.run([*entrypoint, *args], env={**env, "TURNOUT_ADVERTISE_HOST": "10.0.0.9"},
                         capture_output=True, text=True, timeout=30)
    assert run.stdout.splitlines() == ["10.0.0.9", *args]


def test_planner_command_uses_only_flags_the_planner_has() -> None:
    args_module = pytest.importorskip("services.planner.args")
    from common.config import parse_configs

    (config,) = parse_configs([args_module.PlannerConfig],
                              turnout_services()["planner"]["command"][1:])
    assert config.dry_run is True and config.planner_metrics_port == 9100


def planner_runs() -> bool:
    from turnout import cli

    try:
        cli._entry("planner")
    except (KeyError, ImportError):
        return False
    return True


@pytest.mark.e2e
def test_every_turnout_service_runs_with_its_compose_command(tmp_path: Path) -> None:
    services = turnout_services()
    discovery = tmp_path / "discovery"
    run = HostRun(tmp_path)
    started: dict[str, list[dict[int, int]]] = {}
    names = sorted(TURNOUT_SERVICES - ({"planner"} if not planner_runs() else set()))
    try:
        for name in ("router", "worker", "prefill-worker", "decode-worker", "encode-worker",
                     "frontend", "planner"):
            if name not in names:
                continue
            svc = services[name]
            env = {**{k: str(v) for k, v in svc["environment"].items()},
                   "TURNOUT_DISCOVERY": f"file:{discovery}", "TURNOUT_HOST": "127.0.0.1",
                   # what the image's entrypoint sets: the container's own address
                   "TURNOUT_ADVERTISE_HOST": "127.0.0.1", "TURNOUT_LEASE_TTL_S": "3"}
            for replica in range(svc.get("deploy", {}).get("replicas", 1)):
                argv, ports = remap_ports(svc["command"])
                run.start(f"{name}-{replica + 1}", argv, env)
                started.setdefault(name, []).append(ports)

        def records() -> list[dict[str, Any]]:
            return read_records(discovery)

        def all_registered() -> bool:
            run.check_alive()
            roles = [r["role"] for r in records()]
            return all(roles.count(ROLE[n]) == sum(len(started[m]) for m in names
                                                   if ROLE[m] == ROLE[n]) for n in names)

        wait_for(all_registered, 60, "every compose service to register")
        for name in names:
            for ports in started[name]:
                port = ports[int(flag_value(services[name]["command"], METRICS_FLAG[name]))]
                body = wait_for(lambda p=port: _metrics(p), 20, f"{name} /metrics on {port}")
                assert f"turnout_{ROLE[name]}_" in body, name
        front = f"http://127.0.0.1:{started['frontend'][0][8000]}"
        wait_for(lambda: get_ok(front + "/health"), 30, "the frontend to be healthy")
        reply = chat(front)
        assert reply["choices"][0]["message"]["content"]
        assert reply["usage"]["completion_tokens"] == 8

        # The banner, pointed at this frontend, prints the one URL to use.
        banner = compose()["services"]["banner"]
        env = {**banner["environment"], "FRONTEND_HEALTH_URL": front + "/health",
               "PUBLIC_URL": "http://localhost:8000/v1", "WAIT_S": "20"}
        out = subprocess.run([sys.executable, *banner["entrypoint"][1:], *banner["command"]],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [
            "Turnout is up: http://localhost:8000/v1  (Grafana http://localhost:3000, "
            "Prometheus http://localhost:9090)"]
    except BaseException:
        print(run.logs())
        raise
    finally:
        run.close()
    if "planner" not in names:
        warnings.warn("`turnout planner` is not available yet: every other compose service ran",
                      stacklevel=1)


def _metrics(port: int) -> str | None:
    import httpx

    try:
        resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
    except httpx.HTTPError:
        return None
    return resp.text if resp.status_code == 200 else None


def test_banner_gives_up_with_a_clear_message(tmp_path: Path) -> None:
    banner = compose()["services"]["banner"]
    env = {**banner["environment"], "FRONTEND_HEALTH_URL": "http://127.0.0.1:9/health",
           "WAIT_S": "1"}
    start = time.monotonic()
    out = subprocess.run([sys.executable, *banner["entrypoint"][1:], *banner["command"]],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "not healthy" in out.stderr
    assert time.monotonic() - start < 15


def test_every_service_gets_longer_than_a_worker_drain_to_stop() -> None:
    """`docker compose stop` and scale-downs SIGKILL 10 s after SIGTERM unless told otherwise:
    a worker's drain (its streams, a prefill worker's held KV) must fit before that."""
    from services.worker.args import WorkerConfig

    drain_s = WorkerConfig().drain_grace_s
    for name, svc in turnout_services().items():
        grace = svc.get("stop_grace_period", "10s")
        seconds = float(re.fullmatch(r"(\d+)s", grace).group(1))  # type: ignore[union-attr]
        assert seconds > drain_s, name
