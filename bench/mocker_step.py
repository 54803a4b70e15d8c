"""CPU cost of the mocker engine itself: µs of process CPU per request, at speed-up 0.

64 concurrent requests of 128 prompt / 64 output tokens (distinct prompts, so no cache hits) run
to completion through `MockerEngine` with a no-op sink; the best of a few rounds is reported as
one JSON line. Run: `.venv/bin/python bench/mocker_step.py`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.messages import GenerateRequest, SamplingParams
from services.worker.engine import StepOutput
from services.worker.engines.mocker.config import MockerConfig
from services.worker.engines.mocker.engine import MockerEngine

CONCURRENCY = 64
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 64
ROUNDS = 5


async def one_round(round_no: int) -> tuple[float, int, int]:
    """(CPU seconds, engine steps, tokens out) for one batch of requests."""
    engine = MockerEngine(MockerConfig(speedup_ratio=0.0))
    done = asyncio.Event()
    state = {"finished": 0, "tokens": 0}

    def sink(out: StepOutput) -> None:
        for chunk in out.chunks:
            state["tokens"] += len(chunk.token_ids)
            if chunk.finish_reason is not None:
                state["finished"] += 1
        if state["finished"] == CONCURRENCY:
            done.set()

    requests = [
        GenerateRequest(f"r{round_no}-{i}", "mock",
                        [32 + (i * 7 + j * 13 + round_no) % 95 for j in range(PROMPT_TOKENS)],
                        SamplingParams(max_tokens=OUTPUT_TOKENS))
        for i in range(CONCURRENCY)
    ]
    await engine.start(sink)
    cpu0 = time.process_time()
    for request in requests:
        engine.add_request(request)
    await asyncio.wait_for(done.wait(), timeout=60)
    cpu = time.process_time() - cpu0
    steps = engine.steps_done()
    await engine.shutdown()
    return cpu, steps, state["tokens"]


async def main() -> None:
    results = [await one_round(r) for r in range(ROUNDS)]
    cpu, steps, tokens = min(results)
    print(json.dumps({
        "bench": "mocker_step",
        "concurrency": CONCURRENCY,
        "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "steps": steps,
        "tokens_out": tokens,
        "cpu_us_per_request": round(cpu * 1e6 / CONCURRENCY, 1),
        "cpu_us_per_token": round(cpu * 1e6 / tokens, 2),
    }))


if __name__ == "__main__":
    asyncio.run(main())
