"""The settings the real engines (vllm, sglang, trtllm) share, with their flags, TURNOUT_*
fallbacks and defaults; each engine translates them into its own terms.

Owns the settings and their validation only (this module imports no engine, so the default
install can read it). vLLM's own settings extend these in `vllm_config`.
"""

from __future__ import annotations

import dataclasses
import shlex

from common.config import opt


@dataclasses.dataclass
class RealEngineConfig:
    """Real engines (--engine vllm, sglang or trtllm)."""

    gpu_memory_utilization: float = opt(0.0, help="share of accelerator memory for the engine "
                                                  "(vllm --gpu-memory-utilization, sglang "
                                                  "--mem-fraction-static, trtllm "
                                                  "free_gpu_memory_fraction); 0: its default")
    enforce_eager: bool = opt(False, help="no CUDA graphs (vllm --enforce-eager, sglang "
                                          "--disable-cuda-graph, trtllm cuda_graph_config=None): "
                                          "a faster start")
    engine_args: str = opt("", help="more arguments in the engine's own terms, winning over "
                                    "the flags here: `vllm serve` flags, SGLang server flags, "
                                    "or TensorRT-LLM LLM() keywords as --name value; e.g. "
                                    "\"--max-num-seqs 8 --dtype bfloat16\"")

    def validate(self) -> None:
        if not 0.0 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError("--gpu-memory-utilization must lie in [0, 1]")
        self.extra_argv()  # raises ValueError on unbalanced quotes

    def extra_argv(self) -> list[str]:
        return shlex.split(self.engine_args)
