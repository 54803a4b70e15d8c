"""Static discovery: a fixed list of instances read once from a JSON (or YAML) file.

Owns loading that list and an in-memory registry on top of it, so a process can still register,
update and unregister itself and its own watchers see it. Nothing is shared between processes and
nothing expires: for fleets whose addresses are known in advance. Does not own the record type.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from common.discovery.base import Discovery, matches
from common.messages import Instance


def load_instances(path: str | os.PathLike[str]) -> list[Instance]:
    """The records in a JSON list (or, for .yaml/.yml, a YAML list); ValueError if malformed."""
    file = Path(path)
    data = file.read_bytes()
    is_yaml = file.suffix.lower() in (".yaml", ".yml")
    raw = _parse_yaml(file, data) if is_yaml else None
    try:
        instances = (msgspec.convert(raw, list[Instance]) if is_yaml
                     else msgspec.json.decode(data, type=list[Instance]))
    except ValueError as err:  # msgspec's errors are ValueErrors
        raise ValueError(f"{file}: not a list of instance records: {err}") from err
    ids = [i.id for i in instances]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{file}: duplicate instance ids {dupes}")
    return instances


def _parse_yaml(path: Path, data: bytes) -> Any:
    try:
        import yaml
    except ImportError as err:
        raise ValueError(f"{path}: reading YAML needs pyyaml; use JSON instead") from err
    try:
        return yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not YAML: {err}") from err


class StaticDiscovery(Discovery):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self._records: dict[str, Instance] = {i.id: i for i in load_instances(self.path)}

    def __repr__(self) -> str:
        return f"StaticDiscovery({str(self.path)!r})"

    async def register(self, instance: Instance) -> None:
        self._check_open()
        self._set(instance)

    async def update(self, instance: Instance) -> None:
        self._check_open()
        if instance.id not in self._records:
            raise KeyError(f"instance {instance.id!r} is not registered in {self!r}")
        self._set(instance)

    async def unregister(self, instance_id: str) -> None:
        old = self._records.pop(instance_id, None)
        if old is not None:
            self._publish(old, None)

    def _set(self, instance: Instance) -> None:
        # Keep a copy, as the file backend effectively does: a caller that mutates its record
        # and calls update() again must still produce an `updated` event.
        instance = msgspec.json.decode(msgspec.json.encode(instance), type=Instance)
        old = self._records.get(instance.id)
        self._records[instance.id] = instance
        self._publish(old, instance)

    async def list(self, role: str | None = None, model: str | None = None) -> list[Instance]:
        return [i for _, i in sorted(self._records.items()) if matches(i, role, model)]

    def _snapshot(self) -> Iterable[Instance]:
        return self._records.values()
