"""The start-up check that `common` and `services` are Turnout's own packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from turnout.package_origin import foreign_packages

REPO = Path(__file__).resolve().parents[2]


def test_turnouts_own_packages_pass() -> None:
    assert foreign_packages() == []


def test_another_distributions_common_fails_clearly(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "common"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    # Run from elsewhere, so the repository is found through PYTHONPATH, after the impostor.
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, "-m", "turnout", "worker", "--help"], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == (f"turnout: package 'common' resolves to {fake.resolve()}, not "
                           f"Turnout's {REPO / 'common'}; install Turnout in a virtual "
                           f"environment of its own\n")
