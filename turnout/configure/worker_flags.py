"""A pool of the layout as `turnout worker` flags: engine, mode, batch, parallelism.

Tensor and pipeline parallelism go through `--engine-args`, in each engine's own terms (vLLM
and TensorRT-LLM `--tensor-parallel-size`/`--pipeline-parallel-size`, SGLang
`--tp-size`/`--pp-size`). The batch caps running requests (`--max-num-seqs`) on aggregated and
decode workers, where it is what keeps ITL at the estimate; a prefill worker's batch is requests
per step, which the engine's token budget governs, so it is not capped.
"""

from __future__ import annotations

import shlex

from turnout.configure.layout import Layout, Pool

_PARALLEL_FLAGS = {
    "vllm": ("--tensor-parallel-size", "--pipeline-parallel-size"),
    "trtllm": ("--tensor-parallel-size", "--pipeline-parallel-size"),
    "sglang": ("--tp-size", "--pp-size"),
}


def engine_args(backend: str, pool: Pool) -> str:
    """The `--engine-args` value for a pool ("" when it runs on one GPU)."""
    tp_flag, pp_flag = _PARALLEL_FLAGS[backend]
    args: list[str] = []
    if pool.tp > 1:
        args += [tp_flag, str(pool.tp)]
    if pool.pp > 1:
        args += [pp_flag, str(pool.pp)]
    return shlex.join(args)


def worker_flags(layout: Layout, pool: Pool) -> list[str]:
    """Flags of one worker of `pool` (beside discovery, ports and model)."""
    backend = layout.request.backend
    flags = ["--engine", backend, "--worker-mode", pool.role]
    if pool.role != "prefill":
        flags += ["--max-num-seqs", str(pool.batch)]
    extra = engine_args(backend, pool)
    if extra:
        flags += ["--engine-args", extra]
    return flags


def set_flags(argv: list[str], flags: list[str]) -> list[str]:
    """`argv` with each `--name value` of `flags` replacing the same flag's value, or appended."""
    out = list(argv)
    for i in range(0, len(flags), 2):
        name, value = flags[i], flags[i + 1]
        if name in out[:-1]:
            out[out.index(name) + 1] = value
        else:
            out += [name, value]
    return out
