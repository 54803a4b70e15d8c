"""`turnout keys`: generate a fleet key layout, package it as a Kubernetes Secret, show it."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
import yaml

from common.fleet_keys import load
from turnout.keys import main


def test_generate_writes_keys_and_a_secret_of_the_same_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_dir = tmp_path / "keys"
    main(["generate", str(keys_dir), "--namespace", "serving"])
    keys = load(keys_dir)
    assert keys.public_text in capsys.readouterr().out
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys_dir / "fleet.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((keys_dir / "secret.yaml").stat().st_mode) == 0o600
    secret = yaml.safe_load((keys_dir / "secret.yaml").read_text())
    assert secret["kind"] == "Secret" and secret["metadata"]["namespace"] == "serving"
    for name in ("fleet.key", "fleet.key_secret"):
        assert base64.b64decode(secret["data"][name]) == (keys_dir / name).read_bytes()

    main(["secret", str(keys_dir), "--secret", "other"])
    assert yaml.safe_load(capsys.readouterr().out)["metadata"]["name"] == "other"
    main(["show", str(keys_dir)])
    assert f"fleet public key: {keys.public_text}" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(keys_dir)])
    assert exit_info.value.code == 2
    assert "already holds a fleet key pair" in capsys.readouterr().err
    main(["generate", str(keys_dir), "--force"])
    assert load(keys_dir).public != keys.public
