"""StaticDiscovery: loading a list of records (JSON, YAML), filtering, in-memory registration."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import msgspec
import pytest

from common.discovery import DiscoveryEvent, StaticDiscovery
from common.messages import Instance

pytestmark = pytest.mark.asyncio

RECORDS = [
    Instance("w-1", "worker", "llama", {"request": "tcp://10.0.0.1:7000"}, {"mode": "decode"}),
    Instance("w-0", "worker", "qwen", {"request": "tcp://10.0.0.2:7000"}),
    Instance("r-0", "router", "", {"request": "tcp://10.0.0.3:6000"}),
]


async def next_event(events: AsyncIterator[DiscoveryEvent], within: float = 5.0) -> DiscoveryEvent:
    return await asyncio.wait_for(anext(events), within)


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    path = tmp_path / "instances.json"
    path.write_bytes(msgspec.json.encode(RECORDS))
    return path


async def test_loads_list_and_filters(records_file: Path) -> None:
    disc = StaticDiscovery(records_file)
    try:
        assert [i.id for i in await disc.list()] == ["r-0", "w-0", "w-1"]
        assert await disc.list(role="worker", model="llama") == [RECORDS[0]]
        assert await disc.list(role="planner") == []
    finally:
        await disc.close()


async def test_watch_yields_each_then_in_process_changes_then_ends(records_file: Path) -> None:
    disc = StaticDiscovery(records_file)
    async with aclosing(disc.watch(role="worker")) as events:
        assert [(await next_event(events)).instance.id for _ in range(2)] == ["w-0", "w-1"]
        me = Instance("w-2", "worker", "llama")
        await disc.register(me)
        assert await next_event(events) == DiscoveryEvent("added", me)
        me.metadata["draining"] = True  # mutate the registered object itself, then update
        await disc.update(me)
        event = await next_event(events)
        assert (event.kind, event.instance.metadata) == ("updated", {"draining": True})
        await disc.unregister("w-2")
        assert (await next_event(events)).kind == "removed"
        await disc.register(Instance("r-1", "router"))  # filtered out
        await disc.close()
        with pytest.raises(StopAsyncIteration):
            await next_event(events)
    with pytest.raises(KeyError):
        await StaticDiscovery(records_file).update(Instance("nobody", "worker"))


async def test_loads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "instances.yaml"
    path.write_text("- id: w-0\n  role: worker\n  model: qwen\n"
                    "  endpoints: {request: 'tcp://10.0.0.2:7000'}\n")
    assert await StaticDiscovery(path).list() == [RECORDS[1]]


@pytest.mark.parametrize(("name", "content"), [
    ("bad.json", b"{not json"),
    ("object.json", b'{"id": "w-0", "role": "worker"}'),
    ("missing-role.json", b'[{"id": "w-0"}]'),
    ("dupes.json", b'[{"id": "a", "role": "worker"}, {"id": "a", "role": "router"}]'),
    ("bad.yaml", b"- id: [unclosed"),
])
async def test_malformed_file_is_a_clear_error(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(name)):
        StaticDiscovery(path)
