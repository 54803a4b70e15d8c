"""`turnout configure` as a user runs it: one-line errors, and (where aiconfigurator is
installed: `make test` installs the `configure` extra) real runs end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import turnout.configure.estimate as estimate
from tests.configure.recorded import AGG, sweep
from turnout.configure.deployment_files import REPO_ROOT
from turnout.configure.layout import choose
from turnout.configure.main import main

needs_aiconfigurator = pytest.mark.skipif(
    importlib.util.find_spec("aiconfigurator") is None,
    reason="aiconfigurator is not installed (pip install '.[configure]'; `make test` does)")

AGG_ARGS = ["--model", AGG.model, "--gpus", str(AGG.gpus), "--system", AGG.system,
            "--backend", AGG.backend, "--isl", str(AGG.isl), "--osl", str(AGG.osl),
            "--ttft-ms", f"{AGG.ttft_ms:g}", "--itl-ms", f"{AGG.itl_ms:g}"]


def configure(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "turnout", "configure", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def one_line_error(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode != 0, run.stdout
    lines = run.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("turnout configure: "), run.stderr
    return lines[-1]


def test_bad_input_is_refused_before_any_estimate(tmp_path: Path) -> None:
    run = configure([*AGG_ARGS, "--gpus", "0"], tmp_path)
    assert run.returncode == 1
    assert run.stderr.strip() == "turnout configure: --gpus must be a positive integer, got 0"
    line = one_line_error(configure([a for a in AGG_ARGS if a != AGG.model and a != "--model"],
                                    tmp_path))
    assert "--model is required" in line
    line = one_line_error(configure([*AGG_ARGS, "--serve", "--out", "x"], tmp_path))
    assert "--out applies to one run, not to --serve" in line


def test_without_aiconfigurator_it_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(estimate, "installed", lambda: False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main([*AGG_ARGS, "--out", str(tmp_path / "out")])
    assert caught.value.code == ("turnout configure: aiconfigurator is not installed: pip "
                                 "install 'turnout[configure]' (NVIDIA's "
                                 "aiconfigurator==0.12.0)")
    assert not (tmp_path / "out").exists()


# Runs `turnout configure` where neither aiconfigurator nor PyYAML can be imported (the default
# install without the `configure` extra).
WITHOUT_EXTRA = """
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("aiconfigurator", "yaml"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from turnout.cli import main
main(["configure", *sys.argv[1:]])
"""


@pytest.mark.parametrize("serve", [False, True])
def test_the_default_install_says_to_add_the_extra(tmp_path: Path, serve: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    args = ["--serve", "--port", "1"] if serve else [*AGG_ARGS, "--out", "out"]
    run = subprocess.run([sys.executable, "-c", WITHOUT_EXTRA, *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip() == ("turnout configure: aiconfigurator is not installed: pip "
                                  "install 'turnout[configure]' (NVIDIA's "
                                  "aiconfigurator==0.12.0)")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
@needs_aiconfigurator
def test_a_real_run_prints_the_layout_and_writes_its_files(tmp_path: Path) -> None:
    run = configure([*AGG_ARGS, "--out", "out"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Experiment agg completed" in run.stderr  # aiconfigurator's progress, passed on
    assert "layout: aggregated:" in run.stdout
    assert "turnout up --engine vllm --model Qwen/Qwen3-8B --workers" in run.stdout
    doc = json.loads((tmp_path / "out" / "layout.json").read_text())
    assert doc["predicted"]["ttft_ms"] <= AGG.ttft_ms
    assert doc["predicted"]["itl_ms"] <= AGG.itl_ms
    # aiconfigurator is deterministic: the same layout as the recorded answer.
    recorded = choose(AGG, sweep(AGG)).layout
    assert doc["pools"] == [{"role": p.role, "workers": p.workers, "tp": p.tp, "pp": p.pp,
                             "batch": p.batch} for p in recorded.pools]
    kustomization = yaml.safe_load((tmp_path / "out/k8s/kustomization.yaml").read_text())
    (base,) = kustomization["resources"]
    assert (tmp_path / "out/k8s" / base).resolve() == (REPO_ROOT / "k8s").resolve()
    assert os.access(tmp_path / "out/up.sh", os.X_OK)
    assert (tmp_path / "out/compose.override.yaml").is_file()


@pytest.mark.e2e
@needs_aiconfigurator
def test_an_engine_turnout_cannot_split_gets_its_best_aggregated_layout(tmp_path: Path) -> None:
    # TensorRT-LLM's disaggregated layouts beat its aggregated ones here (478 against 414
    # tokens/s per GPU), but a prefill or decode worker of it would refuse to start.
    run = configure(["--model", "Qwen/Qwen3-32B-FP8", "--gpus", "16", "--system", "h200_sxm",
                     "--backend", "trtllm", "--isl", "4000", "--osl", "500", "--ttft-ms", "300",
                     "--itl-ms", "10"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "layout: aggregated:" in run.stdout
    assert "disaggregated configurations met the targets but were dropped: Turnout does not " \
        "run trtllm disaggregated yet" in run.stdout
    assert "--prefill-workers" not in run.stdout and "--worker-mode" not in run.stdout


@pytest.mark.e2e
@needs_aiconfigurator
def test_no_configuration_meeting_the_targets_fails_in_one_line(tmp_path: Path) -> None:
    args = ["--model", "Qwen/Qwen3-32B-FP8", "--gpus", "16", "--isl", "4000", "--osl", "500",
            "--ttft-ms", "300", "--itl-ms", "10", "--out", "out"]
    line = one_line_error(configure(args, tmp_path))
    assert line.startswith("turnout configure: no configuration of Qwen/Qwen3-32B-FP8 on 16 x "
                           "h200_sxm (vllm) meets TTFT <= 300 ms and ITL <= 10 ms")
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
@needs_aiconfigurator
def test_a_model_or_system_aiconfigurator_lacks_fails_in_one_line(tmp_path: Path) -> None:
    args = [a if a != AGG.model else "acme/not-a-model-7b" for a in AGG_ARGS]
    line = one_line_error(configure(args, tmp_path))
    assert "'acme/not-a-model-7b' is not bundled with aiconfigurator" in line
    args = [a if a != AGG.system else "h300_sxm" for a in AGG_ARGS]
    line = one_line_error(configure(args, tmp_path))
    assert "aiconfigurator has no data for system 'h300_sxm'; systems: " in line
    assert "h200_sxm" in line


def test_a_base_dir_without_turnouts_files_is_refused(tmp_path: Path) -> None:
    line = one_line_error(configure([*AGG_ARGS, "--base-dir", str(tmp_path)], tmp_path))
    assert line == (f"turnout configure: {tmp_path} holds no k8s/kustomization.yaml and "
                    "docker-compose.yml to extend (--base-dir: a Turnout checkout)")
