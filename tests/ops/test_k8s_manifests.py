"""k8s/: schema-valid, internally consistent, and it runs.

Offline schema validation uses the Kubernetes JSON schemas shipped in `kubernetes-validate`
(strict: unknown fields fail). The consistency checks tie the pieces together (selectors and
labels, the discovery selector, port annotations ↔ container ports ↔ CLI flags, probes, RBAC,
the PodMonitor). The last test plays kubelet: every Deployment's pods are created on
`FakeKubeApi` from their templates, each container's `turnout` command runs as a real process
with its env resolved as Kubernetes would (ConfigMap, downward API), readiness probes are polled
and written to the pods' Ready condition, and the processes find each other only through the
`kubernetes` discovery backend, until a chat completion goes through and a deleted worker pod
leaves the routers' view.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml

from common.discovery import open_discovery
from common.discovery.kubernetes import (
    ANNOTATION_INSTANCE,
    DEFAULT_SELECTOR,
    LABEL_ROLE,
    PORT_ANNOTATIONS,
    KubernetesDiscovery,
)
from common.messages import Instance
from tests.ops.fake_kube_api import FakeKubeApi, make_pod, selector_matches
from tests.ops.host_run import ROOT, HostRun, remap_ports
from turnout.keys import main as keys_main

K8S = ROOT / "k8s"
FILES = sorted(K8S.glob("[0-9][0-9]-*.yaml"))
ROLES = {"frontend", "router", "worker", "planner"}
# Deployments by name (without `turnout-`): the prefill and decode workers are workers too.
# (Named as the planner's --kube-prefill-deployment / --kube-decode-deployment defaults.)
DEPLOYMENTS = {"frontend", "router", "worker", "worker-prefill", "worker-decode",
               "worker-encode", "planner"}
WORKER_MODES = {"worker": "aggregated", "worker-prefill": "prefill", "worker-decode": "decode",
                "worker-encode": "encode"}
# The flag that sets the port each annotation names, per role.
PORT_FLAGS = {
    ("router", "turnout.dev/request-port"): "--router-port",
    ("router", "turnout.dev/event-port"): "--router-event-port",
    ("router", "turnout.dev/metrics-port"): "--router-metrics-port",
    ("worker", "turnout.dev/request-port"): "--worker-port",
    ("worker", "turnout.dev/event-port"): "--worker-event-port",
    ("worker", "turnout.dev/metrics-port"): "--worker-metrics-port",
    ("frontend", "turnout.dev/http-port"): "--port",
    ("planner", "turnout.dev/metrics-port"): "--planner-metrics-port",
}


def documents() -> list[dict[str, Any]]:
    return [doc for path in FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"].removeprefix("turnout-"): d for d in of_kind("Deployment")}


def role_of(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["labels"][LABEL_ROLE])


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def flag(args: list[str], name: str) -> str | None:
    return next((args[i + 1] for i, a in enumerate(args[:-1]) if a == name), None)


# -- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_every_resource_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kv.latest_version() if version == "latest" else version
    docs = documents()
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "ServiceAccount", "Role",
                                         "RoleBinding", "Deployment", "Service"}
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises with the offending path


def test_the_schema_check_rejects_a_broken_manifest() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    broken = json.loads(json.dumps(deployments()["worker"]))
    container(broken)["ports"][0]["containerPort"] = "7100"  # a string, not an integer
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)
    broken = json.loads(json.dumps(deployments()["worker"]))
    container(broken)["readinesProbe"] = {}  # a typo: strict rejects unknown fields
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_kustomization_lists_every_file() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [p.name for p in FILES]


# -- consistency ---------------------------------------------------------------------------------


def test_deployments_are_discoverable_and_their_ports_agree() -> None:
    config = {k: v for cm in of_kind("ConfigMap") for k, v in cm["data"].items()}
    disc = open_discovery(config["TURNOUT_DISCOVERY"])
    assert isinstance(disc, KubernetesDiscovery) and disc.selector == DEFAULT_SELECTOR
    assert config["TURNOUT_HOST"] == "0.0.0.0"
    accounts = {sa["metadata"]["name"] for sa in of_kind("ServiceAccount")}
    found = deployments()
    assert set(found) == DEPLOYMENTS and {role_of(d) for d in found.values()} == ROLES
    for name, mode in WORKER_MODES.items():
        labels = found[name]["spec"]["template"]["metadata"]["labels"]
        assert labels["turnout.dev/mode"] == mode
        assert flag(container(found[name])["args"], "--worker-mode") == mode
    for dep in found.values():
        role = role_of(dep)
        template = dep["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert selector_matches(disc.selector, labels), f"{role} pods are not discovered"
        assert template["spec"]["serviceAccountName"] in accounts
        main = container(dep)
        assert main["args"][0] == role
        assert "command" not in main, "the image's entrypoint sets up and runs `turnout`"
        env = {e["name"]: e for e in main["env"]}
        assert env["TURNOUT_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["TURNOUT_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "status.podIP"
        assert env[f"TURNOUT_{role.upper()}_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.name", "instance id = pod name, so the label record and the own agree"
        assert main["envFrom"] == [{"configMapRef": {"name": "turnout-config"}}]
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        annotations = template["metadata"]["annotations"]
        assert set(annotations) <= set(PORT_ANNOTATIONS)
        for key, value in annotations.items():
            assert flag(main["args"], PORT_FLAGS[(role, key)]) == value, (role, key)
            assert int(value) in ports.values(), (role, key)
        for probe in ("readinessProbe", "livenessProbe"):
            get = main[probe]["httpGet"]
            assert get["port"] in ports and get["path"] == \
                ("/health" if probe == "readinessProbe" else "/live")
        metrics = annotations.get("turnout.dev/metrics-port") or \
            annotations.get("turnout.dev/http-port")
        assert metrics is not None and int(metrics) == ports.get("metrics", ports.get("http"))


KEYS_SECRET = "turnout-fleet-keys"  # the Secret `turnout keys generate` writes (its default)


def test_every_turnout_container_mounts_the_fleet_keys_secret() -> None:
    """The Secret is mounted read-only where TURNOUT_KEYS_DIR points, secret files 0400 and
    readable through the pod's fsGroup (the containers do not run as root), and optional: a
    cluster without it starts, plain."""
    for name, dep in deployments().items():
        spec = dep["spec"]["template"]["spec"]
        for main in spec["containers"]:
            env = {e["name"]: e.get("value") for e in main["env"]}
            keys_dir = env.get("TURNOUT_KEYS_DIR")
            assert keys_dir, (name, main["name"], "TURNOUT_KEYS_DIR is not set")
            mount = next((m for m in main.get("volumeMounts", [])
                          if m["mountPath"] == keys_dir), None)
            assert mount is not None, (name, main["name"], "nothing is mounted at the keys dir")
            assert mount.get("readOnly") is True and "subPath" not in mount, (name, mount)
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            assert volume["secret"] == {"secretName": KEYS_SECRET, "defaultMode": 0o400,
                                        "optional": True}, (name, volume)
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"], name

def test_the_mounted_secret_is_the_one_turnout_keys_generate_writes(tmp_path: Path) -> None:
    secret = keys_secret_of_a_fresh_fleet(tmp_path)
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == (KEYS_SECRET, NS)
    assert set(secret["data"]) == {"fleet.key", "fleet.key_secret"}


def keys_secret_of_a_fresh_fleet(tmp: Path) -> dict[str, Any]:
    """What `turnout keys generate DIR --namespace turnout` writes to DIR/secret.yaml."""
    keys_main(["generate", str(tmp / "keys"), "--namespace", NS])
    return yaml.safe_load((tmp / "keys" / "secret.yaml").read_text())  # type: ignore[no-any-return]


def test_rbac_lets_discovery_watch_and_annotate_pods_and_the_planner_scale() -> None:
    roles = {r["metadata"]["name"]: r for r in of_kind("Role")}

    def allowed(account: str, group: str, resource: str, verb: str) -> bool:
        for binding in of_kind("RoleBinding"):
            if not any(s["kind"] == "ServiceAccount" and s["name"] == account
                       for s in binding["subjects"]):
                continue
            for rule in roles[binding["roleRef"]["name"]]["rules"]:
                if group in rule["apiGroups"] and resource in rule["resources"] \
                        and verb in rule["verbs"]:
                    return True
        return False

    for dep in deployments().values():
        account = dep["spec"]["template"]["spec"]["serviceAccountName"]
        for verb in ("get", "list", "watch", "patch"):
            assert allowed(account, "", "pods", verb), (account, verb)
    planner = deployments()["planner"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert allowed(planner, "apps", "deployments/scale", "patch")
    assert allowed(planner, "apps", "deployments", "get")
    assert not allowed("turnout", "apps", "deployments/scale", "patch"), "least privilege"


def test_services_and_the_pod_monitor_select_real_pods_and_ports() -> None:
    pods = [d["spec"]["template"] for d in of_kind("Deployment")]
    for svc in of_kind("Service"):
        chosen = [t for t in pods if svc["spec"]["selector"].items()
                  <= t["metadata"]["labels"].items()]
        assert chosen, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            for t in chosen:
                assert port["targetPort"] in {p["name"] for c in t["spec"]["containers"]
                                              for p in c["ports"]}
    monitor = yaml.safe_load((K8S / "monitoring" / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    names = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for t in pods:
        assert selector.items() <= t["metadata"]["labels"].items()
        ports = {p["name"] for c in t["spec"]["containers"] for p in c["ports"]}
        assert ports & names, "every pod's /metrics is scraped"


# -- it runs -------------------------------------------------------------------------------------


NS = "turnout"


class Kubelet:
    """Runs the Deployments' pods as local processes and reports their readiness."""

    def __init__(self, api: FakeKubeApi, tmp: Path,
                 secrets_: dict[str, dict[str, bytes]] | None = None) -> None:
        self.api = api
        self.tmp = tmp
        self.secrets = secrets_ or {}  # the namespace's Secrets: name → file name → bytes
        self.run = HostRun(tmp)
        self.pods: dict[str, dict[str, Any]] = {}  # name → {"probe": url, "proc": Popen}
        self.kubeconfig = tmp / "kubeconfig"
        self.kubeconfig.write_text(api.kubeconfig(namespace=NS))
        self.config = {k: v for cm in of_kind("ConfigMap") for k, v in cm["data"].items()}

    async def start(self, deployment: dict[str, Any]) -> str:
        template = deployment["spec"]["template"]
        main = container(deployment)
        name = f"{deployment['metadata']['name']}-{secrets.token_hex(3)}"
        args, ports = remap_ports(main["args"])
        mounts = self.mount(name, template["spec"], main)
        env = dict(self.config)
        for entry in main["env"]:
            if "value" in entry:
                env[entry["name"]] = mounts.get(entry["value"], entry["value"])
                continue
            path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            env[entry["name"]] = {"metadata.name": name, "status.podIP": "127.0.0.1",
                                  "metadata.namespace": NS}[path]
        # Here every pod shares one network namespace: bind loopback, not 0.0.0.0.
        env.update(TURNOUT_HOST="127.0.0.1", KUBECONFIG=str(self.kubeconfig),
                   HOME=str(self.tmp))
        annotations = {k: str(ports[int(v)]) for k, v in
                       template["metadata"]["annotations"].items()}
        await self.api.put_pod(NS, make_pod(name, template["metadata"]["labels"], annotations,
                                            ready=False))
        named = {p["name"]: ports[p["containerPort"]] for p in main["ports"]}
        probe = main["readinessProbe"]["httpGet"]
        self.pods[name] = {
            "probe": f"http://127.0.0.1:{named[probe['port']]}{probe['path']}",
            "proc": self.run.start(name, args, env), "ready": False, "ports": named}
        return name

    def mount(self, pod: str, spec: dict[str, Any], main: dict[str, Any]) -> dict[str, str]:
        """Each of the container's Secret volumes as kubelet makes it, in a local directory:
        the Secret's files with `defaultMode`, or (an `optional` Secret that does not exist)
        an empty directory. Returns mount path → local directory."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        out = {}
        for mount in main.get("volumeMounts", []):
            source = volumes[mount["name"]]["secret"]
            local = self.tmp / "volumes" / pod / mount["name"]
            (local / "..data").mkdir(parents=True)  # kubelet's own entry, in every such volume
            files = self.secrets.get(source["secretName"])
            if files is None:
                assert source.get("optional"), f"{pod}: Secret {source['secretName']} is missing"
            for file, data in (files or {}).items():
                (local / file).write_bytes(data)
                (local / file).chmod(source.get("defaultMode", 0o644))
            out[mount["mountPath"]] = str(local)
        return out

    async def probe_forever(self) -> None:
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                for name, pod in list(self.pods.items()):
                    try:
                        ready = (await client.get(pod["probe"])).status_code == 200
                    except httpx.HTTPError:
                        ready = False
                    if ready != pod["ready"] and (NS, name) in self.api.pods:
                        pod["ready"] = ready
                        await self.api.set_ready(NS, name, ready)
                await asyncio.sleep(0.2)

    async def delete(self, name: str) -> None:
        """`kubectl delete pod`: marked for deletion, SIGTERM, gone once the process exits."""
        pod = json.loads(json.dumps(self.api.pods[(NS, name)]))
        pod["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
        await self.api.put_pod(NS, pod)
        proc = self.pods[name]["proc"]
        proc.send_signal(signal.SIGTERM)
        for _ in range(300):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        await self.api.delete_pod(NS, name)
        del self.pods[name]


@pytest_asyncio.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    pytest.importorskip("kubernetes.aio", reason="needs the [kubernetes] extra")
    server = FakeKubeApi()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def eventually(check: Any, within: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.2)


@pytest.mark.e2e
@pytest.mark.asyncio
@pytest.mark.timeout(180)
@pytest.mark.parametrize("keys_secret", [False, True], ids=["plain", "fleet-keys-secret"])
async def test_the_manifests_run_and_find_each_other_through_the_api(
        api: FakeKubeApi, tmp_path: Path, keys_secret: bool) -> None:
    """Without the keys Secret (optional) the planes are plain; with the one `turnout keys
    generate` writes, every process runs with CURVE and says its key in its record."""
    secrets_ = {}
    if keys_secret:
        secret = keys_secret_of_a_fresh_fleet(tmp_path)
        secrets_[secret["metadata"]["name"]] = {
            file: base64.b64decode(data) for file, data in secret["data"].items()}
    kubelet = Kubelet(api, tmp_path, secrets_)
    prober = asyncio.create_task(kubelet.probe_forever())
    found = deployments()
    try:
        for name in ("router", "worker", "worker-prefill", "worker-decode", "frontend",
                     "planner"):
            # The prefill and decode workers (0 replicas by default) run one each, beside
            # the aggregated ones: a valid mixed deployment.
            for _ in range(found[name]["spec"]["replicas"] or 1):
                await kubelet.start(found[name])

        async def all_ready() -> bool:
            kubelet.run.check_alive()
            return all(p["ready"] for p in kubelet.pods.values())

        await eventually(all_ready, 60, "every pod to pass its readiness probe")
        frontend = next(p for n, p in kubelet.pods.items() if "frontend" in n)
        base = f"http://127.0.0.1:{frontend['ports']['http']}"
        async with httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(f"{base}/v1/chat/completions", json={
                "model": "mock", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 8

        # Every process registered itself on its own pod, under the pod's name.
        for name, pod in kubelet.pods.items():
            raw = api.pods[(NS, name)]["metadata"]["annotations"][ANNOTATION_INSTANCE]
            record = json.loads(raw)
            assert record["id"] == name
            assert ("curve_key" in record["metadata"]) == keys_secret, record
            Instance(**record)
            for url in record["endpoints"].values():
                assert "127.0.0.1:" in url
                assert int(url.split(":")[2].split("/")[0]) in pod["ports"].values()

        # Scale down: a deleted worker pod leaves the router's view; requests still work.
        router = next(p for n, p in kubelet.pods.items() if "router" in n)
        metrics = f"http://127.0.0.1:{router['ports']['metrics']}/metrics"

        async def routable_workers() -> float:
            async with httpx.AsyncClient(timeout=2) as client:
                text = (await client.get(metrics)).text
            line = next(x for x in text.splitlines()
                        if x.startswith('turnout_router_workers{state="routable"}'))
            return float(line.split()[-1])

        assert await routable_workers() == 4
        victim = next(n for n in kubelet.pods if n.startswith("turnout-worker-")
                      and not n.startswith(("turnout-worker-prefill", "turnout-worker-decode")))
        await kubelet.delete(victim)
        await eventually(lambda: _equals(routable_workers(), 3), 20, "the router to drop it")
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(3):
                resp = await client.post(f"{base}/v1/completions", json={
                    "model": "mock", "prompt": f"after {i}", "max_tokens": 4})
                assert resp.status_code == 200, resp.text
    except BaseException:
        print(kubelet.run.logs())
        raise
    finally:
        prober.cancel()
        await asyncio.gather(prober, return_exceptions=True)
        await asyncio.to_thread(kubelet.run.close)


async def _equals(value: Any, expected: float) -> bool:
    return await value == expected


def test_worker_pods_get_longer_than_their_drain_to_stop() -> None:
    """Kubernetes SIGKILLs a pod terminationGracePeriodSeconds after SIGTERM: a worker's drain
    (its streams, a prefill worker's held KV) must fit before that."""
    from services.worker.args import WorkerConfig

    drain_s = WorkerConfig().drain_grace_s
    for name in WORKER_MODES:
        spec = deployments()[name]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > drain_s, name
