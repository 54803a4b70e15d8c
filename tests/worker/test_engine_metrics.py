"""The worker hands its engine a `CustomMetrics` before start; the series the engine declares
there (in `start`, as a real adapter does) and updates per step are served, with the worker's
labels, on the worker's own /metrics next to its `turnout_worker_*` series."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx

from common import prometheus_text
from common.custom_metrics import CustomMetrics
from common.discovery import open_discovery
from common.messages import ForwardPass, GenerateRequest, KvBlockStored
from services.worker.args import WorkerConfig
from services.worker.engine import Engine, EngineLoad, StepOutput, StepSink
from services.worker.main import Worker

STEPS = 3


class CountingEngine(Engine):
    """Runs STEPS empty steps at start, counting each in a series of its own."""

    block_size = 16
    max_model_len = 128

    def __init__(self) -> None:
        self.metrics_at_start: CustomMetrics | None = None
        self.steps = 0

    async def start(self, sink: StepSink) -> None:
        self.metrics_at_start = self.metrics
        if self.metrics is None:
            return
        swaps = self.metrics.counter("swaps", "Blocks swapped to host")
        for _ in range(STEPS):
            self.steps += 1
            swaps.inc(2)
            sink(StepOutput(forward_pass=ForwardPass(self.steps, 0, 0, 0, 0.1, 0)))

    async def shutdown(self) -> None:
        pass

    def add_request(self, request: GenerateRequest) -> None:
        pass

    def abort(self, request_id: str) -> None:
        pass

    def load(self) -> EngineLoad:
        return EngineLoad()

    def steps_done(self) -> int:
        return self.steps

    def kv_dump(self) -> list[KvBlockStored]:
        return []


def test_engine_series_are_served_on_the_workers_metrics(tmp_path: Path) -> None:
    engine = CountingEngine()
    assert engine.metrics is None
    config = WorkerConfig(worker_id="w7", served_model_name="m", discovery=f"file:{tmp_path}")

    async def scrape_running_worker() -> prometheus_text.Metrics:
        worker = Worker(config, engine)
        running = asyncio.create_task(worker.run())
        discovery = open_discovery(config.discovery, lease_ttl=config.lease_ttl_s)
        try:
            async with asyncio.timeout(10):
                while not (found := [i for i in await discovery.list() if i.id == "w7"]):
                    assert not running.done(), running
                    await asyncio.sleep(0.02)
            async with httpx.AsyncClient(timeout=5) as http:
                response = await http.get(found[0].endpoints["metrics"])
            assert response.status_code == 200
            return prometheus_text.parse(response.text)
        finally:
            await discovery.close()
            if worker.ready and not running.done():
                os.kill(os.getpid(), signal.SIGTERM)  # its own handler (installed by now)
                await asyncio.wait_for(running, 10)
            else:
                running.cancel()

    metrics = asyncio.run(scrape_running_worker())
    assert isinstance(engine.metrics_at_start, CustomMetrics), "handed over before start"
    assert metrics.samples("turnout_engine_swaps_total") == [prometheus_text.Sample(
        "turnout_engine_swaps_total", {"worker": "w7", "model": "m"}, 2.0 * STEPS)]
    assert metrics.types["turnout_engine_swaps"] == "counter"
    assert metrics.value("turnout_worker_engine_steps_total", worker="w7") == STEPS


def test_prefix_cache_hit_rate() -> None:
    worker = Worker(WorkerConfig(worker_id="w8"), CountingEngine())
    try:
        m = worker.metrics
        m.on_prompt(100, 0)
        m.on_prompt(100, 50)
        labels = {"worker": "w8", "model": "mock"}
        assert m.registry.get_sample_value("turnout_worker_prefix_cache_hit_rate", labels) == 0.25
        assert m.registry.get_sample_value("turnout_worker_cached_tokens_total", labels) == 50
        assert m.registry.get_sample_value("turnout_worker_prompt_tokens_total", labels) == 200
    finally:
        worker.ctx.destroy(linger=0)
