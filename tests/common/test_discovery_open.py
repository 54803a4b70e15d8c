"""open_discovery: which spec strings name which backend, and the error for the rest."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from common.discovery import FileDiscovery, StaticDiscovery, open_discovery
from common.messages import Instance


def test_file_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = {
        f"file://{tmp_path}/a": tmp_path / "a",
        f"file://localhost{tmp_path}/b": tmp_path / "b",
        f"file://{tmp_path}/with%20space": tmp_path / "with space",
        f"file:{tmp_path}/c": tmp_path / "c",
        "file:rel/d": tmp_path / "rel" / "d",
        f"{tmp_path}/e": tmp_path / "e",
        "bare/f": tmp_path / "bare" / "f",
    }
    for spec, directory in cases.items():
        disc = open_discovery(spec, lease_ttl=3.0)
        assert isinstance(disc, FileDiscovery), spec
        assert disc.directory == directory, spec
        assert disc.lease_ttl == 3.0
        assert directory.is_dir()  # created


def test_static_form(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    path.write_bytes(msgspec.json.encode([Instance("w-0", "worker")]))
    for spec in (f"static:{path}", f"static://{path}"):
        disc = open_discovery(spec)
        assert isinstance(disc, StaticDiscovery)
        assert disc.path == path


@pytest.mark.parametrize("spec", ["", "  ", "etcd://127.0.0.1:2379", "kubernetes:", "nats:x",
                                  "file:", "static:", "file://otherhost/dir"])
def test_unknown_or_incomplete_spec_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match=r"discovery (spec|backend)"):
        open_discovery(spec)
