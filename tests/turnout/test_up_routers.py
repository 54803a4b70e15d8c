"""`turnout up --routers N`: N router processes with distinct ids and free ports, none critical
once there are replicas; bad counts and fixed ports with replicas are refused."""

from __future__ import annotations

import pytest

from turnout.up import plan


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_two_routers_are_two_processes_that_survive_each_other() -> None:
    p = plan(["--routers", "2", "--workers", "1", "--discovery", "file:/tmp/x",
              "--router-id", "r"])
    routers = [c for c in p.children if c.argv[3] == "router"]
    assert [c.name for c in routers] == ["router-1", "router-2"]
    assert [flag(c.argv, "--router-id") for c in routers] == ["r-1", "r-2"]
    assert not any(c.critical for c in routers)


def test_one_router_is_critical_as_before() -> None:
    p = plan(["--workers", "1", "--discovery", "file:/tmp/x"])
    routers = [c for c in p.children if c.argv[3] == "router"]
    assert [c.name for c in routers] == ["router"] and routers[0].critical


@pytest.mark.parametrize("argv", [["--routers", "0"],
                                  ["--routers", "2", "--router-port", "7000"],
                                  ["--routers", "2", "--router-event-port", "7001"]])
def test_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        plan([*argv, "--discovery", "file:/tmp/x"])


@pytest.mark.parametrize("argv", [["--frontend-timeout-ms", "0"],
                                  ["--heartbeat-interval-ms", "0"],
                                  ["--missed-heartbeats", "0"]])
def test_bad_liveness_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        plan([*argv, "--discovery", "file:/tmp/x"])
