"""FileDiscovery within one process: records, leases, expiry, collection, malformed files, ids.

Two FileDiscovery objects on one directory stand in for two processes here; real processes are
in test_discovery_file_processes.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio

from common.discovery import DiscoveryEvent, FileDiscovery
from common.messages import Instance

pytestmark = pytest.mark.asyncio

TTL = 1.0
POLL = 0.05


def worker(instance_id: str, model: str = "m", **metadata: object) -> Instance:
    return Instance(instance_id, "worker", model, {"request": f"tcp://127.0.0.1:{len(instance_id)}"},
                    dict(metadata))


async def next_event(events: AsyncIterator[DiscoveryEvent], within: float = 5.0) -> DiscoveryEvent:
    return await asyncio.wait_for(anext(events), within)


async def wait_until(predicate: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def disc(tmp_path: Path) -> AsyncIterator[FileDiscovery]:
    d = FileDiscovery(tmp_path / "disc", lease_ttl=TTL, poll_interval=POLL)
    yield d
    await d.close()


async def test_register_list_and_watch_sees_added(disc: FileDiscovery) -> None:
    router = Instance("router-0", "router", "", {"request": "tcp://127.0.0.1:5000"})
    await disc.register(worker("w-b", model="llama"))
    await disc.register(router)
    await disc.register(worker("w-a"))

    assert (disc.directory / "w-a.json").is_file()
    assert [i.id for i in await disc.list()] == ["router-0", "w-a", "w-b"]
    assert [i.id for i in await disc.list(role="worker")] == ["w-a", "w-b"]
    assert [i.id for i in await disc.list(role="worker", model="llama")] == ["w-b"]
    assert await disc.list(role="planner") == []
    assert (await disc.list(role="router")) == [router]  # round-trips exactly

    async with aclosing(disc.watch(role="worker")) as events:
        first = [await next_event(events), await next_event(events)]
        assert [(e.kind, e.instance.id) for e in first] == [("added", "w-a"), ("added", "w-b")]
        await disc.register(worker("w-c"))
        event = await next_event(events)
        assert (event.kind, event.instance) == ("added", worker("w-c"))


async def test_unregister_reports_removed_and_deletes_file(disc: FileDiscovery) -> None:
    await disc.register(worker("w-1"))
    async with aclosing(disc.watch()) as events:
        assert (await next_event(events)).kind == "added"
        await disc.unregister("w-1")
        event = await next_event(events)
        assert (event.kind, event.instance.id) == ("removed", "w-1")
    assert not (disc.directory / "w-1.json").exists()
    assert await disc.list() == []
    await disc.unregister("w-1")  # already gone: not an error


async def test_other_reader_sees_changes_by_polling(tmp_path: Path) -> None:
    writer = FileDiscovery(tmp_path, lease_ttl=TTL, poll_interval=POLL)
    reader = FileDiscovery(tmp_path, lease_ttl=TTL, poll_interval=POLL)
    try:
        async with aclosing(reader.watch()) as events:
            await writer.register(worker("w-1", load=0))
            assert (await next_event(events)).kind == "added"
            await writer.update(worker("w-1", load=7))
            event = await next_event(events)
            assert (event.kind, event.instance.metadata) == ("updated", {"load": 7})
            await writer.unregister("w-1")
            assert (await next_event(events)).kind == "removed"
    finally:
        await writer.close()
        await reader.close()


async def test_updated_events_respect_role_filter(disc: FileDiscovery) -> None:
    await disc.register(worker("w-1", draining=False))
    async with aclosing(disc.watch(role="worker")) as workers, \
            aclosing(disc.watch(role="router")) as routers, aclosing(disc.watch()) as everyone:
        assert (await next_event(workers)).kind == "added"
        assert (await next_event(everyone)).kind == "added"
        await disc.update(worker("w-1", draining=True))
        for events in (workers, everyone):
            event = await next_event(events)
            assert (event.kind, event.instance.metadata) == ("updated", {"draining": True})
        # An unchanged update is no event; the router watcher saw nothing of the worker at all.
        await disc.update(worker("w-1", draining=True))
        await disc.register(Instance("r-1", "router"))
        assert (await next_event(routers)) == DiscoveryEvent("added", Instance("r-1", "router"))
        assert (await next_event(everyone)).instance.id == "r-1"
        # A role change leaves one filtered view and enters another.
        await disc.update(Instance("w-1", "router"))
        assert (await next_event(workers)).kind == "removed"
        event = await next_event(routers)
        assert (event.kind, event.instance.id) == ("added", "w-1")


async def test_update_needs_registration(disc: FileDiscovery) -> None:
    with pytest.raises(KeyError):
        await disc.update(worker("nobody"))
    assert await disc.list() == []


async def test_lease_renewal_keeps_record_live(tmp_path: Path) -> None:
    writer = FileDiscovery(tmp_path, lease_ttl=0.4, poll_interval=POLL)
    reader = FileDiscovery(tmp_path, lease_ttl=0.4, poll_interval=POLL)
    try:
        await writer.register(worker("w-1"))
        for _ in range(6):  # 1.2 s: three leases
            await asyncio.sleep(0.2)
            assert [i.id for i in await reader.list()] == ["w-1"]
    finally:
        await writer.close()
        await reader.close()


async def test_a_wall_clock_jump_lapses_no_record_seen_renewed(tmp_path: Path) -> None:
    """The reader's wall clock leaps three leases ahead (a VM restored from a snapshot): a
    record it has seen renewed stays live and uncollected while renewals go on, and still
    expires on its lease once they stop."""
    jump = [0.0]
    writer = FileDiscovery(tmp_path, lease_ttl=0.4, poll_interval=POLL)
    reader = FileDiscovery(tmp_path, lease_ttl=0.4, poll_interval=POLL,
                           wall_clock=lambda: time.time() + jump[0])
    record = tmp_path / "w-1.json"
    try:
        await writer.register(worker("w-1"))
        assert [i.id for i in await reader.list()] == ["w-1"]
        first = record.stat().st_mtime_ns

        async def renewed() -> bool:
            return record.stat().st_mtime_ns != first

        await wait_until(renewed)
        assert [i.id for i in await reader.list()] == ["w-1"]  # it saw the renewal
        jump[0] = 4 * 0.4
        for _ in range(12):  # 1.2 s: three leases
            await asyncio.sleep(0.1)
            assert [i.id for i in await reader.list()] == ["w-1"]
        assert record.exists()

        await writer.close()  # like a crash: renewals stop

        async def expired() -> bool:
            return await reader.list() == []

        await wait_until(expired, within=3)
        stranger = FileDiscovery(tmp_path, lease_ttl=0.4, poll_interval=POLL,
                                 wall_clock=lambda: time.time() + jump[0])
        assert await stranger.list() == []  # first sight of a stale record: not live
        await stranger.close()
    finally:
        await writer.close()
        await reader.close()


async def test_a_reader_that_did_not_run_gives_what_was_live_a_lease_to_be_renewed(
        tmp_path: Path) -> None:
    """Reader and owner stop together (both SIGSTOPped, a paused VM) for longer than it takes
    to collect a record: back, the reader neither drops nor collects the record its owner had
    no chance to renew; once renewals stop for good, it expires on its lease."""
    reader = FileDiscovery(tmp_path, lease_ttl=0.4, poll_interval=POLL)
    record = tmp_path / "w-1.json"
    record.write_bytes(msgspec.json.encode(worker("w-1")))  # the owner: this test
    try:
        async with aclosing(reader.watch()) as events:
            assert (await next_event(events)).kind == "added"
            time.sleep(1.5)  # noqa: ASYNC251 (nothing on this loop runs: the reader stops)
            assert [i.id for i in await reader.list()] == ["w-1"]
            assert record.exists()
            os.utime(record)  # the owner, back too, renews once, then dies
            renewed = time.monotonic()
            event = await next_event(events, within=3)
            assert (event.kind, event.instance.id) == ("removed", "w-1")
            assert time.monotonic() - renewed >= 0.3, "removed on its lease, not at the pause"
    finally:
        await reader.close()


async def test_close_keeps_record_until_lease_runs_out(tmp_path: Path) -> None:
    writer = FileDiscovery(tmp_path, lease_ttl=TTL, poll_interval=POLL)
    reader = FileDiscovery(tmp_path, lease_ttl=TTL, poll_interval=POLL)
    try:
        await writer.register(worker("w-1"))
        async with aclosing(reader.watch()) as events:
            assert (await next_event(events)).kind == "added"
            await writer.close()  # like a crash: no unregister
            last_renewal = (tmp_path / "w-1.json").stat().st_mtime
            event = await next_event(events, within=TTL + 4)
            assert (event.kind, event.instance.id) == ("removed", "w-1")
            assert time.time() >= last_renewal + TTL  # it took the lease, not the close
        assert await reader.list() == []
        with pytest.raises(RuntimeError):
            await writer.register(worker("w-2"))
    finally:
        await writer.close()
        await reader.close()


async def test_collects_files_three_leases_old(disc: FileDiscovery) -> None:
    now = time.time()
    expired = disc.directory / "expired.json"
    garbage = disc.directory / "garbage.json"
    stale_tmp = disc.directory / ".garbage.123.abcd.tmp"
    for path in (expired, garbage):
        path.write_bytes(msgspec.json.encode(worker(path.stem)))
    stale_tmp.write_bytes(b"{")
    os.utime(expired, (now - 2 * TTL, now - 2 * TTL))
    os.utime(garbage, (now - 4 * TTL, now - 4 * TTL))
    os.utime(stale_tmp, (now - 4 * TTL, now - 4 * TTL))
    await disc.register(worker("fresh"))

    assert [i.id for i in await disc.list()] == ["fresh"]
    assert expired.exists()  # expired, but not yet old enough to collect
    assert not garbage.exists()
    assert not stale_tmp.exists()

    os.utime(expired)  # its owner came back and renewed
    assert [i.id for i in await disc.list()] == ["expired", "fresh"]


async def test_rewrites_own_record_if_collected(tmp_path: Path) -> None:
    directory = tmp_path / "disc"
    record = directory / "w-1.json"
    disc = FileDiscovery(directory, lease_ttl=0.3, poll_interval=POLL)

    async def back() -> bool:
        return record.exists()

    try:
        await disc.register(worker("w-1"))
        record.unlink()  # e.g. collected while this process was stalled
        await wait_until(back, within=3)
        assert msgspec.json.decode(record.read_bytes(), type=Instance) == worker("w-1")
        shutil.rmtree(directory)  # even the whole directory
        await wait_until(back, within=3)
    finally:
        await disc.close()


async def test_malformed_files_skipped_with_one_warning_each(
        disc: FileDiscovery, caplog: pytest.LogCaptureFixture) -> None:
    d = disc.directory
    (d / "garbage.json").write_bytes(b"\x00\xffnot json")
    (d / "half.json").write_bytes(b'{"id": "half", "ro')
    (d / "list.json").write_bytes(b"[1, 2, 3]")
    (d / "no-role.json").write_bytes(b'{"id": "no-role"}')
    (d / "wrong-id.json").write_bytes(msgspec.json.encode(worker("someone-else")))
    (d / "notes.txt").write_bytes(b"ignored: not a record name")
    await disc.register(worker("good"))

    with caplog.at_level(logging.WARNING, logger="common.discovery.file"):
        async with aclosing(disc.watch()) as events:
            event = await next_event(events)
            assert (event.kind, event.instance.id) == ("added", "good")
            for _ in range(3):
                assert [i.id for i in await disc.list()] == ["good"]
            os.utime(d / "garbage.json")  # re-read (new mtime), still broken: no second warning
            assert [i.id for i in await disc.list()] == ["good"]
            await asyncio.sleep(5 * POLL)  # the poller scans too
    warned = sorted(r.getMessage().split("/")[-1].split(":")[0] for r in caplog.records)
    assert warned == ["garbage.json", "half.json", "list.json", "no-role.json", "wrong-id.json"]

    # A fixed file is picked up.
    (d / "half.json").write_bytes(msgspec.json.encode(worker("half")))
    assert [i.id for i in await disc.list()] == ["good", "half"]


@pytest.mark.parametrize("bad_id", ["", "a/b", "../up", "a..b", "..", ".hidden", "nul\0byte"])
async def test_unsafe_ids_refused(disc: FileDiscovery, bad_id: str) -> None:
    with pytest.raises(ValueError, match="safe file name"):
        await disc.register(worker(bad_id))
    with pytest.raises(ValueError):
        await disc.unregister(bad_id)
    assert os.listdir(disc.directory) == []


async def test_many_watchers_all_end_on_close(tmp_path: Path) -> None:
    disc = FileDiscovery(tmp_path, lease_ttl=TTL, poll_interval=POLL)
    await disc.register(worker("w-1"))
    seen: list[list[str]] = [[], [], []]

    async def consume(into: list[str]) -> None:
        async for event in disc.watch():
            into.append(f"{event.kind}:{event.instance.id}")

    tasks = [asyncio.create_task(consume(s)) for s in seen]
    try:
        async def all_added() -> bool:
            return all(s == ["added:w-1"] for s in seen)

        await wait_until(all_added)
        await disc.register(worker("w-2"))

        async def all_saw_w2() -> bool:
            return all(s == ["added:w-1", "added:w-2"] for s in seen)

        await wait_until(all_saw_w2)
        await disc.close()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)  # every watcher ended
    finally:
        for task in tasks:
            task.cancel()
        await disc.close()
    async with aclosing(disc.watch()) as events:  # watching a closed discovery ends at once
        with pytest.raises(StopAsyncIteration):
            await next_event(events)

