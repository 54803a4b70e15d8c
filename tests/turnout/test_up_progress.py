"""What `turnout up` reads from a starting worker: its stage from its output lines, its last
lines for a death report, and CPU time summed over its process tree."""

from __future__ import annotations

import pytest

from turnout.up import TAIL_LINES, Child, _tree_cpu


def worker() -> Child:
    return Child("worker-1", [], is_worker=True)


def test_stage_follows_the_latest_line_that_names_one(capsys: pytest.CaptureFixture[str]) -> None:
    w = worker()
    w.take_output(b"INFO resolved architecture\n", now=1.0)
    assert w.stage == "starting"
    w.take_output(b"INFO Loading weights took 0.5 s\nINFO nothing to see", now=2.0)
    assert w.stage == "loading model"
    assert w.partial == b"INFO nothing to see"  # an unfinished line waits for its end
    w.take_output(b" here\nINFO Warming up model for the compilation...\n", now=3.0)
    assert w.stage == "warming up"
    assert w.progress_at == 3.0
    assert list(w.tail)[-2:] == ["INFO nothing to see here",
                                 "INFO Warming up model for the compilation..."]
    assert "[worker-1] INFO Loading weights took 0.5 s\n" in capsys.readouterr().err


def test_progress_bars_keep_their_latest_state_and_the_tail_is_bounded() -> None:
    w = worker()
    w.take_output(b"shards 1/4\rshards 2/4\rshards 4/4\n", now=1.0)
    assert w.tail[-1] == "shards 4/4"
    for i in range(TAIL_LINES + 5):
        w.take_output(f"line {i}\n".encode(), now=2.0)
    assert len(w.tail) == TAIL_LINES and w.tail[-1] == f"line {TAIL_LINES + 4}"


def test_cpu_is_summed_over_the_process_tree() -> None:
    # pid -> (parent, cpu seconds): 10 is the worker, 11 its engine core, 12 a grandchild.
    table = {10: (1, 1.0), 11: (10, 5.0), 12: (11, 0.5), 20: (1, 99.0)}
    assert _tree_cpu(10, table) == 6.5
    assert _tree_cpu(11, table) == 5.5
    assert _tree_cpu(30, table) == 0.0  # already gone
