"""A recorded layout → its files: the k8s overlay (applied to k8s/ and validated as
tests/ops/test_k8s_manifests.py validates the base), the compose override, the `turnout up`
line and the planner seed profile, each read back by what consumes it."""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import parse_configs
from services.planner.args import PlannerConfig
from services.planner.performance_model import PerformanceModel
from services.worker.args import WorkerConfig
from services.worker.engines import engine_config_classes
from tests.configure.recorded import AGG, DISAGG, STEPS, TRTLLM, answer, sweep
from tests.ops.test_k8s_manifests import PORT_FLAGS, container, flag, role_of
from turnout.configure.deployment_files import REPO_ROOT, Base, render
from turnout.configure.layout import Choice, choose, frontier, layout_from_row
from turnout.configure.planner_profile import profile_document, steps_request
from turnout.configure.up_command import commands

BASE = Base.find(str(REPO_ROOT))


def files_for(request: Any, profile: dict[str, Any] | None = None,
              ref: str = "../../k8s") -> dict[str, str]:
    recorded = sweep(request)
    return render(choose(request, recorded), frontier(recorded), BASE, ref,
                  recorded["aiconfigurator"], profile)


def base_documents() -> list[dict[str, Any]]:
    names = yaml.safe_load((BASE.k8s / "kustomization.yaml").read_text())["resources"]
    return [d for n in names for d in yaml.safe_load_all((BASE.k8s / n).read_text()) if d]


def merge(target: Any, patch: Any) -> Any:
    """A strategic merge as kustomize does it for these patches: maps merge, lists of named
    maps merge by name, other lists are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        out = dict(target)
        for key, value in patch.items():
            out[key] = merge(target[key], value) if key in target else value
        return out
    if (isinstance(target, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in target + patch)):
        out_list = [copy.deepcopy(x) for x in target]
        for item in patch:
            at = next((i for i, x in enumerate(out_list) if x["name"] == item["name"]), None)
            if at is None:
                out_list.append(item)
            else:
                out_list[at] = merge(out_list[at], item)
        return out_list
    return patch


def applied(files: dict[str, str]) -> list[dict[str, Any]]:
    """The base with the overlay's patches applied."""
    kustomization = yaml.safe_load(files["k8s/kustomization.yaml"])
    docs = base_documents()
    for entry in kustomization["patches"]:
        patch = yaml.safe_load(files[f"k8s/{entry['path']}"])
        at = next(i for i, d in enumerate(docs) if d["kind"] == patch["kind"]
                  and d["metadata"]["name"] == patch["metadata"]["name"])
        docs[at] = merge(docs[at], patch)
    return docs


def deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def worker_flags_of(args: list[str]) -> tuple[WorkerConfig, list[Any]]:
    """`turnout worker`'s own parser on a container's args."""
    assert args[0] == "worker"
    worker, *engines = parse_configs([WorkerConfig, *engine_config_classes()], args[1:])
    return worker, engines


def check_consistent(docs: list[dict[str, Any]]) -> None:
    """The checks tests/ops/test_k8s_manifests.py makes of the base, on the patched result."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in docs:
        kv.validate(doc, kv.latest_version(), strict=True)
    for dep in deployments(docs).values():
        role = role_of(dep)
        main = container(dep)
        assert main["args"][0] == role
        for key, value in dep["spec"]["template"]["metadata"]["annotations"].items():
            assert flag(main["args"], PORT_FLAGS[(role, key)]) == value, (role, key)
        mode = dep["spec"]["template"]["metadata"]["labels"].get("turnout.dev/mode")
        if mode is not None:
            assert flag(main["args"], "--worker-mode") == mode


def test_the_disaggregated_overlay_sizes_the_pools_and_validates() -> None:
    files = files_for(DISAGG)
    docs = applied(files)
    check_consistent(docs)
    found = deployments(docs)
    assert found["turnout-worker"]["spec"]["replicas"] == 0
    for name, mode, replicas, batch in (("turnout-worker-prefill", "prefill", 1, None),
                                        ("turnout-worker-decode", "decode", 3, 15)):
        dep = found[name]
        assert dep["spec"]["replicas"] == replicas
        main = container(dep)
        assert main["resources"]["limits"] == {"nvidia.com/gpu": 4}
        assert main["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}  # base kept
        worker, engines = worker_flags_of(main["args"])
        assert worker.engine == "vllm" and worker.worker_mode == mode
        assert worker.worker_port == 7100  # the base's ports survive
        engine = engines[0]
        assert engine.max_num_seqs == (batch or 0)
        vllm = next(e for e in engines if type(e).__name__ == "VllmConfig")
        assert vllm.extra_argv() == ["--tensor-parallel-size", "4"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["TURNOUT_MODEL"] == "Qwen/Qwen3-32B-FP8"
    assert config["data"]["TURNOUT_DISCOVERY"] == "kubernetes"  # the rest of the base kept
    planner = container(found["turnout-planner"])["args"]
    (cfg,) = parse_configs([PlannerConfig], planner[1:])
    assert (cfg.planner_mode, cfg.ttft_slo_ms, cfg.itl_slo_ms) == ("disaggregated", 300, 20)
    assert cfg.connector == "kubernetes"
    assert cfg.max_gpus == 16 and cfg.gpus_per_worker == 4 and cfg.max_replicas >= 3


def test_the_aggregated_overlay_scales_turnout_worker() -> None:
    docs = applied(files_for(AGG))
    check_consistent(docs)
    layout = choose(AGG, sweep(AGG)).layout
    pool = layout.pools[0]
    found = deployments(docs)
    assert found["turnout-worker"]["spec"]["replicas"] == pool.workers
    assert found["turnout-worker-prefill"]["spec"]["replicas"] == 0
    assert found["turnout-worker-decode"]["spec"]["replicas"] == 0
    main = container(found["turnout-worker"])
    assert main["resources"]["limits"] == {"nvidia.com/gpu": pool.gpus_per_worker}
    worker, engines = worker_flags_of(main["args"])
    assert worker.worker_mode == "aggregated" and engines[0].max_num_seqs == pool.batch


@pytest.mark.parametrize("with_profile", [False, True])
def test_kubectl_kustomize_builds_the_overlay_as_applied_here(tmp_path: Path,
                                                              with_profile: bool) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its `kustomize` builds the overlay)")
    overlay = tmp_path / "overlay"
    ref = os.path.relpath(BASE.k8s.resolve(), (overlay / "k8s").resolve())
    profile = profile_document(choose(DISAGG, sweep(DISAGG)).layout, answer(STEPS)) \
        if with_profile else None
    files = files_for(DISAGG, profile, ref=ref)
    for name, text in files.items():
        if name.startswith("k8s/"):
            (overlay / name).parent.mkdir(parents=True, exist_ok=True)
            (overlay / name).write_text(text)
    run = subprocess.run([kubectl, "kustomize", str(overlay / "k8s")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    built = [d for d in yaml.safe_load_all(run.stdout) if d]
    check_consistent(built)
    ours = deployments(applied(files))
    theirs = deployments(built)
    for name in ("turnout-worker", "turnout-worker-prefill", "turnout-worker-decode"):
        assert theirs[name]["spec"] == ours[name]["spec"], name
    planner = theirs["turnout-planner"]["spec"]["template"]["spec"]
    base_volumes = {v["name"] for v in deployments(base_documents())["turnout-planner"]["spec"][
        "template"]["spec"].get("volumes", [])}
    added = [v for v in planner.get("volumes", []) if v["name"] not in base_volumes]
    assert base_volumes <= {v["name"] for v in planner.get("volumes", [])}  # kept, not replaced
    if with_profile:
        (volume,) = added
        generated = next(d for d in built if d["kind"] == "ConfigMap"
                         and d["metadata"]["name"] == volume["configMap"]["name"])
        assert generated["metadata"]["name"].startswith("turnout-planner-profile-")
        args = container(theirs["turnout-planner"])["args"]
        path = flag(args, "--profile")
        assert path is not None and path.endswith(next(iter(generated["data"])))
        assert json.loads(next(iter(generated["data"].values()))) == profile
    else:
        assert added == []


def test_compose_override_gives_each_worker_its_own_gpus(tmp_path: Path) -> None:
    text = files_for(DISAGG)["compose.override.yaml"]
    services = yaml.safe_load(text)["services"]
    assert services["worker"]["deploy"]["replicas"] == 0
    workers = {k: v for k, v in services.items() if k.startswith(("prefill-", "decode-"))}
    assert sorted(workers) == ["decode-1", "decode-2", "decode-3", "prefill-1"]
    devices: list[str] = []
    for name, svc in workers.items():
        (reservation,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(reservation["device_ids"]) == 4
        devices += reservation["device_ids"]
        worker, _ = worker_flags_of(svc["command"])
        assert worker.worker_mode == name.split("-")[0]
        assert svc["environment"]["TURNOUT_MODEL"] == "Qwen/Qwen3-32B-FP8"
    assert sorted(devices, key=int) == [str(i) for i in range(16)]  # disjoint, all 16
    (cfg,) = parse_configs([PlannerConfig], services["planner"]["command"][1:])
    assert cfg.dry_run and cfg.planner_mode == "disaggregated"
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    override = tmp_path / "compose.override.yaml"
    override.write_text(text)
    run = subprocess.run([exe, "-f", str(BASE.compose), "-f", str(override), "config"],
                         capture_output=True, text=True, timeout=60, cwd=BASE.compose.parent,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    merged = yaml.safe_load(run.stdout)["services"]
    assert merged["decode-2"]["volumes"] == merged["frontend"]["volumes"]  # shared discovery
    assert merged["frontend"]["environment"]["TURNOUT_MODEL"] == "Qwen/Qwen3-32B-FP8"


def test_the_up_line_is_what_turnout_up_accepts() -> None:
    from turnout.up import plan

    (line,), notes = commands(choose(DISAGG, sweep(DISAGG)).layout)
    argv = shlex.split(line)
    assert argv[:2] == ["turnout", "up"]
    p = plan(argv[2:])
    try:
        names = [c.name for c in p.children if c.is_worker]
        assert names == ["prefill-1", "decode-1", "decode-2", "decode-3"]
        worker = next(c for c in p.children if c.name == "decode-1").argv
        assert "--tensor-parallel-size 4" in worker and "vllm" in worker
    finally:
        if p.tmp is not None:
            shutil.rmtree(p.tmp, ignore_errors=True)
    assert any("CUDA_VISIBLE_DEVICES" in n for n in notes)


def test_pools_of_different_parallelism_get_one_command_per_process() -> None:
    recorded = sweep(TRTLLM)
    row = recorded["experiments"]["disagg"]["best"][2]  # 1 prefill TP4 + 2 decode TP2
    layout = layout_from_row(TRTLLM, "disagg", row)
    assert layout is not None
    assert [(p.role, p.workers, p.tp) for p in layout.pools] == [("prefill", 2, 4),
                                                                 ("decode", 4, 2)]
    lines, notes = commands(layout)
    assert lines[0].startswith("turnout router ") and lines[-1].startswith("turnout frontend ")
    workers = [line for line in lines if line.startswith("turnout worker ")]
    assert len(workers) == 6
    assert sum("--tensor-parallel-size 4" in w for w in workers) == 2
    assert sum("--tensor-parallel-size 2" in w for w in workers) == 4
    assert any("cannot express" in n for n in notes)
    files = render(Choice(layout, {}, 1, 0, 0), [], BASE, "../../k8s", "0.12.0")
    assert files["up.sh"].rstrip().endswith("wait")
    # The planner's budget counts one worker size: with two, it gets none rather than a wrong one.
    planner = container(deployments(applied(files))["turnout-planner"])["args"]
    assert flag(planner, "--max-gpus") is None and flag(planner, "--max-replicas") == "8"


def test_seed_profile_is_read_by_the_planner_and_reproduces_the_estimates(
        tmp_path: Path) -> None:
    layout = choose(DISAGG, sweep(DISAGG)).layout
    request = steps_request(layout)
    steps = answer(STEPS)
    # The recorded steps are those this layout asks for.
    assert [t for t, _ in steps["prefill"]] == request["prefill"]["tokens"]
    assert [b for b, _ in steps["decode"]] == request["decode"]["batches"]
    doc = profile_document(layout, steps)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(doc))
    model = PerformanceModel()
    model.load_profile(path)
    assert model.report.prefill_source == "profile" and model.report.decode_source == "profile"
    assert model.seed == []  # estimates seed the coefficients only, never the fits
    for tokens, ms in steps["prefill"]:
        assert model.prefill_ms(tokens) == pytest.approx(ms, rel=0.05)
    for batch, ms in steps["decode"]:
        assert model.decode_ms(batch, 0.0) == pytest.approx(ms, rel=0.15)
    assert model.decode_ms(30, 0.0) > model.decode_ms(1, 0.0)


def test_layout_json_holds_the_layout_the_commands_and_the_frontier() -> None:
    doc = json.loads(files_for(DISAGG)["layout.json"])
    assert doc["mode"] == "disaggregated" and doc["gpus_used"] == 16
    assert doc["predicted"]["itl_ms"] <= doc["request"]["itl_ms"]
    assert doc["aiconfigurator"] == "0.12.0"
    assert doc["commands"][0].startswith("turnout up ")
    assert len(doc["frontier"]) == 14
    assert set(doc["best_by_mode"]) == {"aggregated", "disaggregated"}


def test_without_turnouts_deployment_files_only_the_layout_and_commands(tmp_path: Path) -> None:
    recorded = sweep(DISAGG)
    files = render(choose(DISAGG, recorded), frontier(recorded), None, "", "0.12.0")
    assert sorted(files) == ["layout.json", "up.sh"]
    with pytest.raises(ValueError, match=r"holds no k8s/kustomization\.yaml"):
        Base.find(str(tmp_path))
