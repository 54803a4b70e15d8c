"""`turnout up`'s plan with prefill and decode workers: which processes, in which roles."""

from __future__ import annotations

import pytest

from turnout import up

# An explicit discovery: plan() would otherwise make a temporary directory (nothing is started).
DISCOVERY = ["--discovery", "file:/nonexistent/turnout-plan-test"]


def plan(argv: list[str]) -> up.Plan:
    return up.plan([*argv, *DISCOVERY])


def modes(argv: list[str]) -> dict[str, str]:
    """Child name → its --worker-mode (workers only)."""
    out = {}
    for child in plan(argv).children:
        if child.is_worker:
            out[child.name] = child.argv[child.argv.index("--worker-mode") + 1]
    return out


def test_prefill_and_decode_workers_replace_the_default_aggregated_ones() -> None:
    assert modes(["--prefill-workers", "1", "--decode-workers", "2"]) == {
        "prefill-1": "prefill", "decode-1": "decode", "decode-2": "decode"}
    assert modes([]) == {"worker-1": "aggregated", "worker-2": "aggregated"}


def test_aggregated_workers_beside_them_when_asked_for() -> None:
    assert modes(["--workers", "1", "--prefill-workers", "1", "--decode-workers", "1"]) == {
        "worker-1": "aggregated", "prefill-1": "prefill", "decode-1": "decode"}


def test_worker_ids_get_a_role_suffix() -> None:
    ids = [c.argv[c.argv.index("--worker-id") + 1] for c in plan(
        ["--worker-id", "w", "--prefill-workers", "1", "--decode-workers", "1"]).children
        if c.is_worker]
    assert ids == ["w-prefill-1", "w-decode-1"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--prefill-workers", "2"], "needs a worker to decode"),
    (["--decode-workers", "-1"], "must be >= 0"),
    (["--workers", "0"], "at least 1"),
])
def test_impossible_splits_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        plan(argv)
