"""A kustomize overlay of Turnout's own `k8s/` manifests for a layout.

`kubectl apply -k DIR` then runs the base with strategic-merge patches: the ConfigMap serves the
model; each worker Deployment (`turnout-worker`, `-prefill`, `-decode`) gets its replicas, its
`turnout worker` arguments (engine, mode, batch, parallelism; the base's ports kept) and
`nvidia.com/gpu` limits of one worker's GPUs, so the scheduler gives each pod its own devices;
the planner gets the layout's mode, the targets as its SLOs and room for the layout's worker
counts (it scales from there on the load it sees). With a seed profile, the planner also reads
it (`--profile`) from a generated ConfigMap.

Owns the overlay's files; the base is read for the containers' arguments, never changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from turnout.configure.layout import Layout
from turnout.configure.worker_flags import set_flags, worker_flags

NAMESPACE = "turnout"
WORKER_DEPLOYMENTS = {"aggregated": "turnout-worker", "prefill": "turnout-worker-prefill",
                      "decode": "turnout-worker-decode"}
PROFILE_CONFIGMAP = "turnout-planner-profile"
PROFILE_FILE = "planner-profile.json"
PROFILE_MOUNT = "/etc/turnout/planner"


def base_deployments(base: Path) -> dict[str, dict[str, Any]]:
    """The base's Deployments by name; ValueError when `base` is not Turnout's k8s/."""
    import yaml  # the configure extra's (so a missing extra is reported, not a traceback)

    found: dict[str, dict[str, Any]] = {}
    for path in sorted(base.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Deployment":
                found[doc["metadata"]["name"]] = doc
    missing = {*WORKER_DEPLOYMENTS.values(), "turnout-planner"} - set(found)
    if missing:
        raise ValueError(f"{base} is not Turnout's k8s/ directory (no Deployment "
                         f"{', '.join(sorted(missing))})")
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0]


def _patch(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def planner_flags(layout: Layout) -> list[str]:
    """The planner's flags for this layout (shared with the compose override)."""
    flags = ["--planner-mode", layout.mode, "--ttft-slo-ms", f"{layout.request.ttft_ms:g}",
             "--itl-slo-ms", f"{layout.request.itl_ms:g}"]
    # Room for the layout itself: the most workers any pool could have on the budget.
    most = max(layout.request.gpus // p.gpus_per_worker for p in layout.pools)
    flags += ["--max-replicas", str(max(most, *(p.workers for p in layout.pools)))]
    per_worker = {p.gpus_per_worker for p in layout.pools}
    if len(per_worker) == 1:  # the planner's budget counts one size for every pool
        flags += ["--max-gpus", str(layout.request.gpus), "--gpus-per-worker",
                  str(per_worker.pop())]
    return flags


def overlay(layout: Layout, base: Path, base_ref: str,
            profile: str | None = None) -> dict[str, str]:
    """The overlay's files (name → text). `base_ref` is the base as the kustomization names it
    (relative to the overlay's directory); `profile` the seed profile's text, if any."""
    import yaml  # the configure extra's (so a missing extra is reported, not a traceback)

    deployments = base_deployments(base)
    header = (f"# turnout configure: {layout.summary()}\n# on {layout.request.gpus} x "
              f"{layout.request.system}, {layout.request.backend}; TTFT <= "
              f"{layout.request.ttft_ms:g} ms, ITL <= {layout.request.itl_ms:g} ms\n")
    files: dict[str, str] = {}
    patches = ["config.yaml"]
    files["config.yaml"] = header + yaml.safe_dump({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "turnout-config", "namespace": NAMESPACE},
        "data": {"TURNOUT_MODEL": layout.request.model,
                 "TURNOUT_SERVED_MODEL_NAME": layout.request.model}}, sort_keys=False)
    for role, name in WORKER_DEPLOYMENTS.items():
        pool = layout.pool(role)
        main = _container(deployments[name])
        if pool is None:
            spec: dict[str, Any] = {"replicas": 0}
        else:
            args = set_flags(list(main["args"]), worker_flags(layout, pool))
            spec = {"replicas": pool.workers, "template": {"spec": {"containers": [{
                "name": main["name"], "args": args,
                "resources": {"limits": {"nvidia.com/gpu": pool.gpus_per_worker}}}]}}}
        file = f"{name.removeprefix('turnout-')}.yaml"
        patches.append(file)
        files[file] = header + yaml.safe_dump(_patch(name, spec), sort_keys=False)
    planner = _container(deployments["turnout-planner"])
    args = set_flags(list(planner["args"]), planner_flags(layout))
    container: dict[str, Any] = {"name": planner["name"], "args": args}
    pod: dict[str, Any] = {"containers": [container]}
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [base_ref]}
    if profile is not None:
        files[PROFILE_FILE] = profile
        container["args"] = [*args, "--profile", f"{PROFILE_MOUNT}/{PROFILE_FILE}"]
        container["volumeMounts"] = [{"name": "planner-profile", "mountPath": PROFILE_MOUNT,
                                      "readOnly": True}]
        pod["volumes"] = [{"name": "planner-profile",
                           "configMap": {"name": PROFILE_CONFIGMAP}}]
        kustomization["configMapGenerator"] = [{"name": PROFILE_CONFIGMAP,
                                                "namespace": NAMESPACE,
                                                "files": [PROFILE_FILE]}]
    patches.append("planner.yaml")
    files["planner.yaml"] = header + yaml.safe_dump(
        _patch("turnout-planner", {"template": {"spec": pod}}), sort_keys=False)
    kustomization["patches"] = [{"path": p} for p in patches]
    files["kustomization.yaml"] = (header + "# kubectl apply -k on this directory\n"
                                   + yaml.safe_dump(kustomization, sort_keys=False))
    return files
