"""`turnout up --encode-workers K`: encode workers beside the LLM workers, and the embedding
cache flag reaching only them."""

from __future__ import annotations

import pytest

from turnout import up

DISCOVERY = ["--discovery", "file:/nonexistent/turnout-plan-test"]


def workers(argv: list[str]) -> dict[str, list[str]]:
    """Child name → its argv (workers only)."""
    return {c.name: c.argv for c in up.plan([*argv, *DISCOVERY]).children if c.is_worker}


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_encode_workers_beside_aggregated_ones() -> None:
    plan = workers(["--workers", "2", "--encode-workers", "1", "--embedding-cache-mb", "64",
                    "--encode-ms-per-image", "40"])
    assert {n: flag(a, "--worker-mode") for n, a in plan.items()} == {
        "worker-1": "aggregated", "worker-2": "aggregated", "encode-1": "encode"}
    assert float(flag(plan["encode-1"], "--embedding-cache-mb") or 0) == 64
    assert float(flag(plan["worker-1"], "--embedding-cache-mb") or 0) == 512  # the default
    # The mocker's encode time reaches every worker: encode workers, and in-line encoding.
    assert all(float(flag(a, "--encode-ms-per-image") or 0) == 40 for a in plan.values())


@pytest.mark.parametrize(("argv", "message"), [
    (["--encode-workers", "-1"], "must be >= 0"),
    (["--embedding-cache-mb", "64"], "needs --encode-workers"),
    (["--worker-mode", "encode"], "give --encode-workers"),
])
def test_refused(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        up.plan([*argv, *DISCOVERY])


def test_real_engine_encode_workers_get_no_engine_flags_but_the_block_size() -> None:
    """A vLLM encode worker runs only the vision encoder: the vLLM flags given to `up` go to the
    LLM workers, not to it (where they would be accepted and ignored)."""
    plan = workers(["--engine", "vllm", "--model", "/m", "--workers", "1", "--encode-workers",
                    "1", "--engine-args", "--dtype float32", "--max-model-len", "4096",
                    "--block-size", "16"])
    llm, encode = plan["worker-1"], plan["encode-1"]
    assert flag(llm, "--engine-args") == "--dtype float32"
    assert flag(llm, "--max-model-len") == "4096"
    assert "--engine-args" not in encode and "--max-model-len" not in encode
    assert flag(encode, "--block-size") == flag(llm, "--block-size") == "16"


def test_the_planners_real_engine_encode_workers_get_no_engine_flags() -> None:
    plan = up.plan(["--engine", "vllm", "--model", "/m", "--planner", "--encode-max-replicas",
                    "2", "--engine-args", "--dtype float32", *DISCOVERY])
    planner = next(c for c in plan.children if c.name == "planner").argv
    assert "--dtype float32" in flag(planner, "--worker-args")
    assert "--engine-args" not in flag(planner, "--encode-worker-args")
