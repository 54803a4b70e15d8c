"""Service lifecycle: loops that end or fail stop the service, shutdown steps run once in reverse,
and a real process stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.service import Service, ServiceFailed, new_instance_id

ROOT = Path(__file__).resolve().parents[2]


def test_instance_ids_name_role_and_process() -> None:
    ident = new_instance_id("worker")
    assert re.fullmatch(rf"worker-{os.getpid()}-[0-9a-f]{{6}}", ident)
    assert new_instance_id("worker") != ident
    assert Service("router").id.startswith(f"router-{os.getpid()}-")
    assert Service("router", "r1").id == "r1"


def test_a_failed_loop_stops_the_service_and_shutdown_runs_in_reverse(
        caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []

    async def healthy() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            done.append("healthy cancelled")

    async def broken() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    async def main() -> None:
        async with Service("tiny", "t1") as service:
            service.on_shutdown("context", lambda: done.append("context"))

            async def close_server() -> None:
                await asyncio.sleep(0)
                done.append("server")

            service.on_shutdown("server", close_server)
            service.spawn("healthy", healthy())
            service.spawn("broken", broken())
            service.on_shutdown("unregister", lambda: done.append("unregister"))
            await service.run()
            assert service.failed
            done.append("run returned")

    with caplog.at_level(logging.ERROR, logger="turnout.tiny"), \
            pytest.raises(ServiceFailed, match="broken"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert done == ["run returned", "unregister", "healthy cancelled", "server", "context"]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and "boom" in str(failures[0].exc_info)


def test_a_loop_that_returns_stops_the_service_without_failing() -> None:
    done: list[str] = []

    async def main() -> None:
        async with Service("tiny", "t1") as service:
            service.on_shutdown("context", lambda: done.append("context"))
            service.spawn("short", asyncio.sleep(0))
            await service.run()
            done.append("run returned")

    asyncio.run(asyncio.wait_for(main(), 10))
    assert done == ["run returned", "context"]


def test_a_failing_step_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []

    def broken() -> None:
        raise OSError("already closed")

    async def main() -> None:
        async with Service("tiny", "t1") as service:
            service.on_shutdown("first", lambda: done.append("first"))
            service.on_shutdown("broken", broken)
            service.on_shutdown("last", lambda: done.append("last"))
            service.request_stop()
            await service.run()
        await service.shutdown()  # once only
        done.append("after")

    with caplog.at_level(logging.ERROR, logger="turnout.tiny"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert done == ["last", "first", "after"]
    assert [r.getMessage() for r in caplog.records] == ["shutdown step failed"]


def test_start_up_error_undoes_only_what_was_done() -> None:
    done: list[str] = []

    async def main() -> None:
        async with Service("tiny", "t1") as service:
            service.on_shutdown("context", lambda: done.append("context"))
            raise ValueError("bad engine")

    with pytest.raises(ValueError, match="bad engine"):
        asyncio.run(main())
    assert done == ["context"]


TINY_SERVICE = textwrap.dedent("""
    import asyncio, sys

    from common.config import ProcessConfig
    from common.service import Service, run_service

    def say(line):
        print(line, flush=True)

    async def serve(config):
        async with Service("tiny", "t1") as service:
            service.install_signal_handlers()
            service.on_shutdown("context", lambda: say("closed context"))
            async def close_status():
                await asyncio.sleep(0.05)
                say("closed status")
            service.on_shutdown("status", close_status)
            async def loop():
                try:
                    if sys.argv[1] == "fail":
                        raise RuntimeError("loop broke")
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    say("loop cancelled")
                    raise
            service.spawn("loop", loop())
            service.on_shutdown("unregister", lambda: say("unregistered"))
            say("ready")
            await service.run()

    run_service("tiny", [ProcessConfig], serve, ["--log-level", "info"])
""")


def run_tiny(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", TINY_SERVICE, mode], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return proc.stdout.readline()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_stops_a_real_process_with_ordered_shutdown(sig: int) -> None:
    proc = run_tiny("serve")
    try:
        assert read_line(proc, timeout=20) == "ready\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["unregistered", "loop cancelled", "closed status",
                                "closed context"]
    assert f"stopping signal={signal.Signals(sig).name}" in err


def test_a_failed_loop_exits_the_process_with_an_error_after_shutdown() -> None:
    proc = run_tiny("fail")
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1
    assert out.splitlines() == ["ready", "unregistered", "closed status", "closed context"]
    assert "task failed; stopping task=loop" in err and "RuntimeError: loop broke" in err
    assert err.rstrip().endswith("turnout tiny: loop failed; see the log above")
