"""Engine adapters and the factory that picks one for `turnout worker --engine NAME`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from services.worker.args import WorkerConfig
from services.worker.engine import Engine


def engine_config_classes() -> list[type]:
    """Config dataclasses of the engines whose flags every worker CLI accepts."""
    from services.worker.engines.mocker.config import MockerConfig
    from services.worker.engines.vllm_config import VllmConfig

    return [MockerConfig, VllmConfig]


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
        # The default range suits the built-in byte tokenizer; a range set on purpose stays
        # (capped by the vocabulary in the mocker).
        defaults = type(mocker_config)()
        if (mocker_config.token_range_lo, mocker_config.token_range_hi) == (
                defaults.token_range_lo, defaults.token_range_hi):
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
    if config.engine in ("vllm", "sglang", "trtllm"):
        return _create_real_engine(config, engine_configs)
    raise SystemExit(f"engine {config.engine!r} is not built into this install yet; "
                     f"use --engine mocker")


def _shared_limits(mocker_config: Any) -> dict[str, int]:
    """The mocker-named limits (`--max-model-len`, `--max-num-seqs`,
    `--max-num-batched-tokens`) that were set away from the mocker's defaults: only those
    reach a real engine, which otherwise derives them from the model and hardware."""
    defaults = {f.name: f.default for f in dataclasses.fields(mocker_config)}
    return {name: getattr(mocker_config, name)
            for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens")
            if getattr(mocker_config, name) != defaults[name]}


def _create_real_engine(config: WorkerConfig, engine_configs: list[Any]) -> Engine:
    """vllm, sglang or trtllm; each is imported only here, so the default install needs none."""
    from services.worker.engines.mocker.config import MockerConfig
    from services.worker.engines.vllm_config import VllmConfig

    mocker = next(c for c in engine_configs if isinstance(c, MockerConfig))
    real = next(c for c in engine_configs if isinstance(c, VllmConfig))
    if not config.model:
        raise SystemExit(f"--engine {config.engine} needs --model (a HF model directory or name)")
    common = {"block_size": mocker.block_size, "hash_seed": mocker.hash_seed,
              "shared": _shared_limits(mocker)}
    try:
        real.validate()
        if config.engine == "vllm":
            from services.worker.engines.vllm_engine import VllmEngine

            return VllmEngine(real, config.model, **common)
        if config.engine == "sglang":
            from services.worker.engines.sglang_engine import SglangEngine

            return SglangEngine(real, config.model, **common)
        from services.worker.engines.trtllm_engine import TrtllmEngine

        return TrtllmEngine(real, config.model, **common)
    except ImportError as exc:
        raise SystemExit(f"--engine {config.engine}: {exc}; install it with "
                         f"`pip install 'turnout[{config.engine}]'`") from exc
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
