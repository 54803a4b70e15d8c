"""The worker hands its engine a `CustomMetrics` before start; engine series land on /metrics."""

from __future__ import annotations

from prometheus_client import generate_latest

from common.custom_metrics import CustomMetrics
from common.messages import GenerateRequest, KvBlockStored
from services.worker.args import WorkerConfig
from services.worker.engine import Engine, EngineLoad, StepSink
from services.worker.main import Worker


class CountingEngine(Engine):
    block_size = 16
    max_model_len = 128

    async def start(self, sink: StepSink) -> None:
        assert self.metrics is not None

    async def shutdown(self) -> None:
        pass

    def add_request(self, request: GenerateRequest) -> None:
        pass

    def abort(self, request_id: str) -> None:
        pass

    def load(self) -> EngineLoad:
        return EngineLoad()

    def steps_done(self) -> int:
        return 0

    def kv_dump(self) -> list[KvBlockStored]:
        return []


def test_engine_gets_custom_metrics_in_the_worker_registry() -> None:
    engine = CountingEngine()
    assert engine.metrics is None
    worker = Worker(WorkerConfig(worker_id="w7", served_model_name="m"), engine)
    try:
        assert isinstance(engine.metrics, CustomMetrics)
        engine.metrics.counter("swaps", "Blocks swapped to host").inc(5)
        text = generate_latest(worker.metrics.registry).decode()
        assert 'turnout_engine_swaps_total{model="m",worker="w7"} 5.0' in text
        assert "turnout_worker_engine_steps_total" in text
    finally:
        worker.ctx.destroy(linger=0)


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
