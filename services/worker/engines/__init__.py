"""Engine adapters and the factory that picks one for `turnout worker --engine NAME`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.worker.args import WorkerConfig
from services.worker.engine import Engine


def engine_config_classes() -> list[type]:
    """Config dataclasses of the engines whose flags every worker CLI accepts."""
    from services.worker.engines.mocker.config import MockerConfig

    return [MockerConfig]


def apply_model_config(mocker_config: Any, model: str) -> None:
    """Make the mocker speak a real model's vocabulary: token range and EOS from config.json."""
    if not model:
        return
    path = Path(model) / "config.json"
    if not path.is_file():
        raise SystemExit(f"--model {model!r}: no config.json there (need a HF model directory)")
    cfg = json.loads(path.read_text())
    vocab = int(cfg.get("vocab_size") or 0)
    if vocab > 0:
        mocker_config.vocab_size = vocab
        mocker_config.token_range_lo = 0
        mocker_config.token_range_hi = vocab
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if mocker_config.eos_token_id is None and isinstance(eos, int):
        mocker_config.eos_token_id = eos


def create_engine(config: WorkerConfig, engine_configs: list[Any]) -> Engine:
    if config.engine == "mocker":
        from services.worker.engines.mocker.engine import MockerEngine

        mocker_config = engine_configs[0]
        apply_model_config(mocker_config, config.model)
        return MockerEngine(mocker_config)
    raise SystemExit(f"engine {config.engine!r} is not built into this install yet; "
                     f"use --engine mocker")
