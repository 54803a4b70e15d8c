"""`turnout worker` as a user runs it: grouped --help, settings that cannot run (bad values,
roles an engine cannot take) refused at start-up in one line, by each process and by `up` and the
planner that would start such workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def turnout(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turnout", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=60,
                          env=None if env is None else {**os.environ, **env})


@pytest.mark.parametrize(("argv", "message"), [
    (["worker", "--kv-lease-ms", "0"], "--kv-lease-ms must be positive, got 0"),
    (["up", "--prefill-workers", "1"], "--prefill-workers needs a worker to decode"),
    (["up", "--worker-mode", "decode", "--decode-workers", "1"],
     "give either --worker-mode or --prefill-workers/--decode-workers"),
    (["router", "--local-prefill-max-ratio", "2"], "--local-prefill-max-ratio must lie in"),
    # Turnout moves no KV for these engines: the split would run whole answers in prefill.
    (["worker", "--engine", "sglang", "--worker-mode", "prefill", "--model", "m"],
     "--engine sglang does not run --worker-mode prefill yet"),
    (["worker", "--engine", "trtllm", "--worker-mode", "decode", "--model", "m"],
     "--engine trtllm does not run --worker-mode decode yet"),
    (["up", "--engine", "sglang", "--prefill-workers", "1", "--decode-workers", "1"],
     "--engine sglang does not run --worker-mode prefill yet"),
    (["up", "--engine", "trtllm", "--planner", "--planner-mode", "disaggregated"],
     "--engine trtllm does not run --worker-mode prefill yet"),
    (["planner", "--planner-mode", "disaggregated", "--worker-args", "--engine sglang --model m"],
     "--engine sglang does not run --worker-mode prefill yet"),
    (["planner", "--planner-mode", "disaggregated", "--decode-worker-args=--engine=trtllm"],
     "run trtllm workers aggregated (from --decode-worker-args)"),
    (["planner", "--worker-args", '--model "m'], "--worker-args: No closing quotation"),
    # Values every process would once have started with (a traceback, a tight loop, a division
    # by zero at the first transfer, or a setting silently read as another).
    (["worker", "--heartbeat-interval-ms", "0"], "--heartbeat-interval-ms must be positive"),
    (["worker", "--kv-transfer-gbps", "0"], "kv_transfer_gbps must be positive"),
    (["worker", "--kv-replicas", "-1"], "--kv-replicas must be >= 0"),
    (["worker", "--drain-grace-s", "-1"], "--drain-grace-s must be >= 0"),
    (["router", "--suspect-phi", "-1"], "need 0 < suspect_phi"),
    (["router", "--router-temperature", "-1"], "--router-temperature must be >= 0"),
    (["router", "--migration-limit", "-1"], "--migration-limit must be >= 0"),
    (["frontend", "--lease-ttl-s", "0"], "--lease-ttl-s must be positive"),
    (["frontend", "--port", "70000"], "--port must lie in 0-65535"),
    (["worker", "--worker-metrics-port", "-1"], "--worker-metrics-port must lie in 0-65535"),
    (["up", "--startup-timeout-s", "nan"], "--startup-timeout-s must be >= 0"),
])
def test_settings_that_cannot_run_fail_at_startup_in_one_line(
        argv: list[str], message: str) -> None:
    done = turnout(*argv)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1, done.stderr  # one line, no usage text or traceback
    assert message in done.stderr


def test_the_planner_reads_its_workers_engine_from_the_environment_as_they_would() -> None:
    from_env = turnout("planner", "--planner-mode", "disaggregated",
                       env={"TURNOUT_ENGINE": "sglang"})
    assert from_env.returncode != 0
    assert "--engine sglang does not run --worker-mode prefill yet" in from_env.stderr
    # A flag in --worker-args wins over the environment, as in the worker's own parser.
    from_flag = turnout("planner", "--planner-mode", "disaggregated",
                        "--worker-args", "--engine trtllm", env={"TURNOUT_ENGINE": "sglang"})
    assert from_flag.returncode != 0
    assert "--engine trtllm does not run --worker-mode prefill yet" in from_flag.stderr


def test_help_groups_engine_neutral_and_engine_flags() -> None:
    out = turnout("worker", "--help").stdout
    sections = ["Worker process:", "Every engine (mocker, vllm, sglang, trtllm):",
                "The mocker engine (--engine mocker):",
                "Real engines (--engine vllm, sglang or trtllm):",
                "The vLLM engine (--engine vllm):"]
    starts = [out.index(s) for s in sections]
    assert starts == sorted(starts)

    def section(title: str) -> str:
        i = sections.index(title)
        return out[starts[i]:starts[i + 1] if i + 1 < len(starts) else len(out)]

    neutral = section(sections[1])
    for flag in ("--block-size", "--hash-seed", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens"):
        assert flag + " " in neutral
    assert "--block-size" not in section(sections[2])
    assert "--engine-args" in section(sections[3]) and "--kv-store" in section(sections[4])
    assert "vllm:" not in out  # no engine's settings described as another's
