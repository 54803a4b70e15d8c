"""FileDiscovery between real processes: each sees the other, a clean exit is removed at once, a
SIGKILLed process is removed when its lease runs out. Every child is reaped, every wait bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest

from common.discovery import DiscoveryEvent, FileDiscovery
from common.messages import Instance

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[2]

# argv: directory, lease_ttl, instance id[, n]. Prints the ids it found before registering,
# registers, then (given n) updates its record n times back to back and prints "updated". Then it
# waits for SIGTERM, on which it unregisters and exits (a SIGKILL leaves the record behind).
CHILD = """
import asyncio, json, signal, sys
from common.discovery import FileDiscovery
from common.messages import Instance

async def main():
    directory, ttl, instance_id = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    updates = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    disc = FileDiscovery(directory, lease_ttl=ttl, poll_interval=0.05)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    seen = [i.id for i in await disc.list()]
    me = Instance(instance_id, "worker", "m", {"request": "tcp://127.0.0.1:1"}, {"step": 0})
    await disc.register(me)
    print(json.dumps(seen), flush=True)
    if updates:
        for step in range(1, updates + 1):
            me.metadata = {"step": step, "pad": "x" * (20000 + step % 13)}
            await disc.update(me)
        print("updated", flush=True)
    await stop.wait()
    await disc.unregister(instance_id)
    await disc.close()

asyncio.run(main())
"""


async def spawn(directory: Path, ttl: float, instance_id: str,
                updates: int = 0) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(directory), str(ttl), instance_id, str(updates),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, cwd=REPO, env=env)


async def reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await asyncio.wait_for(proc.wait(), 10)


async def next_event(events: AsyncIterator[DiscoveryEvent], within: float = 10.0) -> DiscoveryEvent:
    return await asyncio.wait_for(anext(events), within)


async def test_sigkilled_process_is_removed_when_its_lease_runs_out(tmp_path: Path) -> None:
    ttl = 1.0
    disc = FileDiscovery(tmp_path, lease_ttl=ttl, poll_interval=0.05)
    await disc.register(Instance("router-0", "router"))
    proc = await spawn(tmp_path, ttl, "child-w")
    try:
        async with aclosing(disc.watch(role="worker")) as events:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert json.loads(line) == ["router-0"]  # the child saw this process
            event = await next_event(events)
            assert (event.kind, event.instance.id) == ("added", "child-w")

            # The child keeps its lease alive: still there after two leases.
            await asyncio.sleep(2 * ttl)
            assert [i.id for i in await disc.list(role="worker")] == ["child-w"]

            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
            last_renewal = (tmp_path / "child-w.json").stat().st_mtime
            event = await next_event(events)
            assert (event.kind, event.instance.id) == ("removed", "child-w")
            assert time.time() >= last_renewal + ttl  # removed by the lease running out
        assert await disc.list(role="worker") == []
    finally:
        await reap(proc)
        await disc.close()


async def test_process_unregistering_on_sigterm_is_removed_before_its_lease_ends(
        tmp_path: Path) -> None:
    ttl = 10.0
    disc = FileDiscovery(tmp_path, lease_ttl=ttl, poll_interval=0.05)
    procs = [await spawn(tmp_path, ttl, f"child-{n}") for n in range(2)]
    try:
        async with aclosing(disc.watch()) as events:
            added = {(await next_event(events, 20)).instance.id for _ in procs}
            assert added == {"child-0", "child-1"}
            procs[0].send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(procs[0].wait(), 10) == 0
            event = await next_event(events, within=ttl / 2)  # not the lease: the unregister
            assert (event.kind, event.instance.id) == ("removed", "child-0")
            assert not (tmp_path / "child-0.json").exists()
        assert [i.id for i in await disc.list()] == ["child-1"]
    finally:
        for proc in procs:
            await reap(proc)
        await disc.close()


async def test_reader_never_sees_a_partial_record_while_another_process_rewrites_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disc = FileDiscovery(tmp_path, lease_ttl=10.0, poll_interval=0.05)
    proc = await spawn(tmp_path, 10.0, "child-w", updates=2000)
    reads = 0
    finished: asyncio.Future[bytes] | None = None
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 20)  # registered
        finished = asyncio.ensure_future(proc.stdout.readline())
        with caplog.at_level(logging.WARNING, logger="common.discovery.file"):
            deadline = time.monotonic() + 30
            while not finished.done():
                assert time.monotonic() < deadline, "the writer did not finish"
                assert [i.id for i in await disc.list()] == ["child-w"]
                reads += 1
                await asyncio.sleep(0)
        assert await asyncio.wait_for(finished, 5) == b"updated\n"
        assert caplog.records == []
        assert reads > 50  # the reads really did interleave with the writes
        assert (await disc.list())[0].metadata["step"] == 2000
        assert sorted(os.listdir(tmp_path)) == ["child-w.json"]  # no temp files left behind
    finally:
        if finished is not None:
            finished.cancel()
        await reap(proc)
        await disc.close()
