"""The HTTP API fuzzed by schemathesis against the official OpenAI spec (a small, fixed-seed run
of `bench/api_fuzz.py`) on a real deployment: no server error, no response the spec does not
allow, no spec-invalid body accepted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.api_fuzz import OPERATIONS, WORKER_ARGS, fuzz
from turnout.testing.deployment import Deployment, reaped

pytestmark = pytest.mark.e2e

EXAMPLES = 15
SEED = 13
COVERAGE_STRIDE = 1


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(tmp_path)
    dep.start(workers=1, worker_args=WORKER_ARGS)
    yield from reaped(dep)


def test_fuzzed_api_has_no_server_errors_violations_or_accepted_invalid_bodies(
        stack: Deployment) -> None:
    report = fuzz(stack.url, EXAMPLES, SEED, COVERAGE_STRIDE, timeout_s=30)
    out = report.as_json(show=3)
    detail = json.dumps(out["failures"], ensure_ascii=False, indent=1)
    assert out["server_errors"] == 0, detail
    assert out["spec_violating_responses"] == 0, detail
    assert out["invalid_bodies_accepted"] == 0, detail
    # The run reached the operations and both sides of the contract.
    assert set(report.operations) == {op.name for op in OPERATIONS}
    for op in OPERATIONS:
        tally = report.operations[op.name]
        assert tally.status[200] >= 1, (op.name, tally.summary())
        assert tally.invalid >= 1 and tally.valid >= 1, (op.name, tally.summary())
        if op.stream_response is not None:  # streams were judged event by event
            assert tally.streamed >= 1, (op.name, tally.summary())
    stack.check_alive()
