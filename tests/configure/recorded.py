"""The recorded aiconfigurator answers under fixtures/ (see fixtures/README.md) and the requests
that produced them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from turnout.configure.layout import Request

FIXTURES = Path(__file__).parent / "fixtures"

DISAGG = Request("Qwen/Qwen3-32B-FP8", 16, "h200_sxm", "vllm", 4000, 500, 300.0, 20.0)
INFEASIBLE = Request("Qwen/Qwen3-32B-FP8", 16, "h200_sxm", "vllm", 4000, 500, 300.0, 10.0)
TRTLLM = Request("Qwen/Qwen3-32B-FP8", 16, "h200_sxm", "trtllm", 4000, 500, 300.0, 10.0)
AGG = Request("Qwen/Qwen3-8B", 4, "h200_sxm", "vllm", 2000, 200, 500.0, 20.0)

FILES = {DISAGG: "sweep_qwen3-32b-fp8_16xh200_vllm_itl20.json",
         INFEASIBLE: "sweep_qwen3-32b-fp8_16xh200_vllm_itl10.json",
         TRTLLM: "sweep_qwen3-32b-fp8_16xh200_trtllm_itl10.json",
         AGG: "sweep_qwen3-8b_4xh200_vllm_itl20.json"}
STEPS = "steps_qwen3-32b-fp8_h200_vllm_tp4.json"


def answer(name: str) -> dict[str, Any]:
    """A recorded answer's `result`, as `estimate.run` returns it."""
    raw = json.loads((FIXTURES / name).read_text())
    assert raw["ok"] and raw["aiconfigurator"] == "0.12.0"
    return {**raw["result"], "aiconfigurator": raw["aiconfigurator"]}


def sweep(request: Request) -> dict[str, Any]:
    return answer(FILES[request])
