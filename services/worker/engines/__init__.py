"""Engine adapters and the factory that picks one for `turnout worker --engine NAME`: which
config classes make up the worker's engine flags, and how they become one engine's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.config import declaring_class, env_name, flag_name, is_flag, to_argv
from common.messages import MODE_DECODE, MODE_ENCODE, MODE_PREFILL, SCHEDULING_FCFS
from services.worker.args import EngineConfig, WorkerConfig
from services.worker.engine import Engine

# config.json keys that give a model's context length, in the order they are trusted.
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                       "max_sequence_length", "n_ctx")


def engine_config_classes() -> list[type]:
    """Config dataclasses of the engine flags every worker CLI accepts: the engine-neutral ones
    first, then each engine's own."""
    from services.worker.engines.mocker.config import MockerConfig
    from services.worker.engines.vllm_config import VllmConfig

    return [EngineConfig, MockerConfig, VllmConfig]


def _config_of(configs: list[Any], cls: type) -> Any:
    return next(c for c in configs if type(c) is cls)


def model_config(model: str) -> dict[str, Any]:
    """The model's config.json (a HF model directory is needed: the mocker loads no hub)."""
    path = Path(model) / "config.json"
    if not path.is_file():
        raise SystemExit(f"--model {model!r}: no config.json there (need a HF model directory)")
    return json.loads(path.read_text())


def context_length(cfg: dict[str, Any]) -> int:
    """The model's context length from its config.json (0: it names none); a multimodal
    model's text config counts when the top level has none."""
    for section in (cfg, cfg.get("text_config") or {}):
        for key in CONTEXT_LENGTH_KEYS:
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return 0


def apply_model_config(mocker_config: Any, model: str) -> None:
    """Make the mocker speak a real model's vocabulary: token range and EOS from config.json."""
    if not model:
        return
    cfg = model_config(model)
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


def mocker_settings(config: WorkerConfig, engine_configs: list[Any]) -> Any:
    """The mocker's full settings: its own flags, the engine-neutral ones, and what `--model`
    says (vocabulary, EOS, context length). Without `--max-model-len` the context is the
    model's own, or without a model what the simulated KV pool holds; either way capped by the
    pool, as a real engine's is by its KV cache."""
    from services.worker.engines.mocker.config import (
        DEFAULT_MAX_NUM_BATCHED_TOKENS,
        DEFAULT_MAX_NUM_SEQS,
        MockerConfig,
    )

    engine: EngineConfig = _config_of(engine_configs, EngineConfig)
    mocker: MockerConfig = _config_of(engine_configs, MockerConfig)
    apply_model_config(mocker, config.model)
    max_model_len = engine.max_model_len
    if not max_model_len:
        pool = mocker.num_blocks * engine.block_size
        model_len = context_length(model_config(config.model)) if config.model else 0
        max_model_len = min(model_len, pool) if model_len else pool
    try:
        return dataclasses.replace(
            mocker, block_size=engine.block_size, hash_seed=engine.hash_seed,
            max_model_len=max_model_len, scheduling_policy=engine.scheduling_policy,
            max_num_seqs=engine.max_num_seqs or DEFAULT_MAX_NUM_SEQS,
            max_num_batched_tokens=engine.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def refuse_foreign_flags(engine: str, engine_configs: list[Any]) -> None:
    """A flag of another engine than the chosen one, set away from its default, is an error:
    it would otherwise be accepted and ignored."""
    from services.worker.engines.mocker.config import MockerConfig
    from services.worker.engines.real_engine_config import RealEngineConfig
    from services.worker.engines.vllm_config import VllmConfig

    owners: dict[type, set[str]] = {MockerConfig: {"mocker"},
                                    RealEngineConfig: {"vllm", "sglang", "trtllm"},
                                    VllmConfig: {"vllm"}}
    foreign: list[str] = []
    for cfg in engine_configs:
        for field in dataclasses.fields(cfg):
            if not is_flag(field):
                continue
            owner = declaring_class(type(cfg), field.name)
            if owner in owners and engine not in owners[owner] \
                    and getattr(cfg, field.name) != field.default:
                foreign.append("--" + field.name.replace("_", "-"))
    if foreign:
        raise SystemExit(f"--engine {engine} does not take {', '.join(foreign)} (another "
                         f"engine's flags; see `turnout worker --help`)")


# The engine flags an encode worker on a real engine uses: it runs only the model's vision
# encoder (transformers), never the engine itself.
ENCODE_ENGINE_FLAGS = ("block_size",)


def engine_argv(mode: str, engine: str, engine_configs: list[Any]) -> list[str]:
    """The engine flags that reproduce `engine_configs` for a worker of `mode`: all of them,
    except for an encode worker on a real engine, which takes only `ENCODE_ENGINE_FLAGS`."""
    only = ENCODE_ENGINE_FLAGS if mode == MODE_ENCODE and engine != "mocker" else None
    return [arg for cfg in engine_configs for arg in to_argv(cfg, only=only)]


def refuse_flags_unused_by_encode(engine_configs: list[Any]) -> None:
    """An engine flag set away from its default on an encode worker of a real engine is an
    error: that worker never starts the engine, so it would be accepted and ignored."""
    unused = [flag_name(field) for cfg in engine_configs for field in dataclasses.fields(cfg)
              if is_flag(field) and field.name not in ENCODE_ENGINE_FLAGS
              and field.default is not dataclasses.MISSING
              and getattr(cfg, field.name) != field.default]
    if unused:
        raise SystemExit(f"--worker-mode encode runs only the model's vision encoder, not the "
                         f"engine: it does not take {', '.join(unused)} (give those to the LLM "
                         f"workers)")


# Engines whose KV Turnout moves between a prefill and a decode worker. SGLang's and
# TensorRT-LLM's own disaggregation (bootstrap rooms; disaggregated params) is not wired in: a
# prefill worker there would run whole answers, and a decode worker recompute every prompt.
SPLIT_ENGINES = ("mocker", "vllm")


def split_refusal(engine: str, mode: str) -> str | None:
    """Why a worker of `engine` cannot run in `mode` (None: it can): a prefill or decode worker
    of an engine Turnout cannot move KV for."""
    if mode not in (MODE_PREFILL, MODE_DECODE) or engine in SPLIT_ENGINES:
        return None
    return (f"--engine {engine} does not run --worker-mode {mode} yet: Turnout moves KV between "
            f"prefill and decode workers for "
            f"{' and '.join('--engine ' + e for e in SPLIT_ENGINES)}; run {engine} workers "
            f"aggregated")


def engine_named_in(worker_argv: Sequence[str]) -> str:
    """The --engine a `turnout worker` started with `worker_argv` (and this environment) runs:
    the last one given, else $TURNOUT_ENGINE, else the mocker, as the worker's own parser
    reads it."""
    field = next(f for f in dataclasses.fields(WorkerConfig) if f.name == "engine")
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(flag_name(field), dest="engine",
                        default=os.environ.get(env_name(field)) or field.default)
    return str(parser.parse_known_args(list(worker_argv))[0].engine)


def create_engine(config: WorkerConfig, engine_configs: list[Any]) -> Engine:
    if config.engine not in ("mocker", "vllm", "sglang", "trtllm"):
        raise SystemExit(f"engine {config.engine!r} is not built into this install; "
                         f"use --engine mocker")
    refuse_foreign_flags(config.engine, engine_configs)
    refusal = split_refusal(config.engine, config.worker_mode)
    if refusal:
        raise SystemExit(refusal)
    if config.engine == "mocker":
        from services.worker.engines.mocker.engine import MockerEngine

        return MockerEngine(mocker_settings(config, engine_configs))
    if config.engine == "vllm" and config.worker_mode == MODE_ENCODE:
        # An encode worker runs the model's vision encoder (transformers), no vLLM.
        from services.worker.engines.vision_encoder import VisionEncodeEngine

        refuse_flags_unused_by_encode(engine_configs)
        try:
            return VisionEncodeEngine(config.model, _config_of(engine_configs,
                                                               EngineConfig).block_size)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
    return _create_real_engine(config, engine_configs)


def default_kv_transfer(worker_mode: str, vllm: Any) -> None:
    """A vLLM prefill or decode worker moves KV over NIXL unless told otherwise: without a
    transfer no request of either phase could run there."""
    if worker_mode not in (MODE_PREFILL, MODE_DECODE) or vllm.kv_transfer:
        return
    if vllm.kv_store:
        raise ValueError(f"vllm: --worker-mode {worker_mode} moves KV with --kv-transfer nixl, "
                         "which cannot be combined with --kv-store yet")
    vllm.kv_transfer = "nixl"


def _create_real_engine(config: WorkerConfig, engine_configs: list[Any]) -> Engine:
    """vllm, sglang or trtllm; each is imported only here, so the default install needs none."""
    from services.worker.engines.vllm_config import VllmConfig

    engine: EngineConfig = _config_of(engine_configs, EngineConfig)
    real: VllmConfig = _config_of(engine_configs, VllmConfig)
    if not config.model:
        raise SystemExit(f"--engine {config.engine} needs --model (a HF model directory or name)")
    common = {"block_size": engine.block_size, "hash_seed": engine.hash_seed,
              "shared": engine.limits()}
    try:
        if config.engine == "vllm":
            default_kv_transfer(config.worker_mode, real)
        real.validate()
        if config.engine == "vllm":
            from services.worker.engines.vllm_engine import VllmEngine

            return VllmEngine(real, config.model, **common,
                              scheduling_policy=engine.scheduling_policy)
        if engine.scheduling_policy != SCHEDULING_FCFS:
            raise ValueError(f"--scheduling-policy {engine.scheduling_policy}: the vllm and "
                             f"mocker engines only; {config.engine} schedules first come, "
                             f"first served here")
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
