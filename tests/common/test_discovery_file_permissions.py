"""The file discovery directory is a door into the fleet: whoever can write it can register a
worker. A directory or record that group or others can write is refused at start, and a record
that becomes so later is not listed."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from common.discovery.file import FileDiscovery
from common.messages import Instance


def test_group_or_other_writable_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    for mode in (0o775, 0o757, 0o1777):
        os.chmod(directory, mode)
        with pytest.raises(ValueError, match=r"discovery directory .* writable by group or others"):
            FileDiscovery(directory)
    os.chmod(directory, 0o755)
    FileDiscovery(directory)


def test_new_directory_and_records_are_owner_writable_only(tmp_path: Path) -> None:
    old = os.umask(0o000)  # a permissive umask must not leak into what discovery writes
    try:
        disco = FileDiscovery(tmp_path / "new")

        async def register() -> None:
            await disco.register(Instance("w1", "worker", "mock"))
            await disco.close()

        asyncio.run(register())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "new" / "w1.json").stat().st_mode) == 0o644


@pytest.mark.asyncio
async def test_writable_record_refused_at_start_and_skipped_later(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    record = directory / "rogue.json"
    record.write_text(json.dumps({"id": "rogue", "role": "worker", "model": "mock"}))
    os.chmod(record, 0o666)
    with pytest.raises(ValueError, match=r"discovery record .*rogue\.json is writable"):
        FileDiscovery(directory)
    os.chmod(record, 0o644)
    disco = FileDiscovery(directory, lease_ttl=30)
    try:
        assert [i.id for i in await disco.list()] == ["rogue"]
        os.chmod(record, 0o646)
        record.touch()
        assert await disco.list() == []
    finally:
        await disco.close()
