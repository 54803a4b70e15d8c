"""Every setting of the `vllm` engine alone, with its flag, TURNOUT_* fallback and default, and
the vLLM command line the settings turn into.

vLLM also takes the engine-neutral flags (`EngineConfig`: `--block-size`, `--hash-seed`, and the
limits `--max-model-len`, `--max-num-seqs`, `--max-num-batched-tokens`, which reach vLLM only
when set; vLLM otherwise derives them itself, context length from the model, batch limits from
the hardware) and the real-engine ones (`RealEngineConfig`). Anything else goes through
`--engine-args` verbatim and wins over everything here.

Owns the settings and the argv only; parsing it into vLLM's `AsyncEngineArgs` is the engine's job
(this module never imports vLLM, so the default install can read it).
"""

from __future__ import annotations

import dataclasses

from common.config import opt
from common.messages import SCHEDULING_FCFS
from services.worker.engines.real_engine_config import RealEngineConfig

# On CPU vLLM sizes the KV cache from a fraction of one NUMA node's memory, and its GPU-minded
# default (0.92) fails there; a fixed size is the sane default for a worker that shares the host.
CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30
_KV_SIZE_FLAGS = ("--gpu-memory-utilization", "--kv-cache-memory-bytes")
KV_TRANSFERS = ("", "nixl")
DEFAULT_KV_LEASE_S = 30
# vLLM's decode side renews a lease every sixth of it, in whole seconds.
MIN_KV_LEASE_S = 6


@dataclasses.dataclass
class VllmConfig(RealEngineConfig):
    """The vLLM engine (--engine vllm)."""

    kv_cache_memory_bytes: int = opt(0, help="KV cache size in bytes; overrides "
                                             "--gpu-memory-utilization (0: sized from it on "
                                             "GPUs, 1 GiB on CPUs)")
    kv_store: str = opt("", help="directory shared by the workers where every full KV block is "
                                 "kept as it fills, so a request migrated off a dead worker "
                                 "loads its blocks instead of recomputing them (empty: off)")
    kv_events_endpoint: str = opt("", help="ZeroMQ endpoint vLLM publishes KV events on "
                                           "(default: an ipc socket in a private temp dir)")
    kv_transfer: str = opt("", choices=KV_TRANSFERS,
                           help="KV transfer between prefill and decode workers: 'nixl' runs "
                                "vLLM's NixlConnector (needs the nixl package), so this worker "
                                "serves requests of phase prefill and decode; empty: off, "
                                "but nixl for --worker-mode prefill|decode")
    kv_transfer_host: str = opt("127.0.0.1", help="address of this worker's NIXL side channel "
                                                  "(a free port on it is chosen at start and "
                                                  "advertised in discovery); decode workers "
                                                  "on other hosts must reach it")
    kv_lease_s: int = opt(DEFAULT_KV_LEASE_S,
                          help="seconds a prefill's KV blocks stay held for a decode worker "
                               "that has not read them (vLLM's kv_lease_duration, renewed "
                               "while the decode side waits); then they are freed")

    def validate(self) -> None:
        super().validate()
        if self.kv_cache_memory_bytes < 0:
            raise ValueError("vllm: --kv-cache-memory-bytes must be >= 0")
        if self.kv_transfer not in KV_TRANSFERS:
            raise ValueError(f"vllm: --kv-transfer must be one of {KV_TRANSFERS}, "
                             f"got {self.kv_transfer!r}")
        if self.kv_transfer:
            if self.kv_store:
                raise ValueError("vllm: --kv-transfer nixl and --kv-store cannot be combined "
                                 "yet (each is a vLLM KV connector of its own)")
            if self.kv_lease_s < MIN_KV_LEASE_S:
                raise ValueError(f"vllm: --kv-lease-s must be at least {MIN_KV_LEASE_S}, got "
                                 f"{self.kv_lease_s}")
            if not self.kv_transfer_host:
                raise ValueError("vllm: --kv-transfer-host must not be empty")
            if any(_flag_name(a) == "--kv-transfer-config" for a in self.extra_argv()):
                raise ValueError("vllm: --kv-transfer nixl sets vLLM's --kv-transfer-config; "
                                 "do not also give one in --engine-args")
        else:
            for name, value, default in (
                    ("--kv-transfer-host", self.kv_transfer_host, "127.0.0.1"),
                    ("--kv-lease-s", self.kv_lease_s, DEFAULT_KV_LEASE_S)):
                if value != default:
                    raise ValueError(f"vllm: {name} needs --kv-transfer nixl")

    def argv(self, model: str, block_size: int, *, on_cpu: bool,
             shared: dict[str, int] | None = None,
             scheduling_policy: str = SCHEDULING_FCFS) -> list[str]:
        """The vLLM command line: our settings, then `--engine-args`, which win: a flag given
        there replaces ours. `shared` holds the engine-neutral limits set on the command line
        (`EngineConfig.limits()`)."""
        extra = self.extra_argv()
        given = {_flag_name(a) for a in extra if a.startswith("--")}
        ours: list[tuple[str, str | None]] = [("--model", model),
                                              ("--block-size", str(block_size)),
                                              ("--enable-prefix-caching", None)]
        if self.enforce_eager:
            ours.append(("--enforce-eager", None))
        if self.gpu_memory_utilization > 0:
            ours.append(("--gpu-memory-utilization", str(self.gpu_memory_utilization)))
        kv_bytes = self.kv_cache_memory_bytes
        if (kv_bytes == 0 and on_cpu and self.gpu_memory_utilization == 0
                and not given & set(_KV_SIZE_FLAGS)):
            kv_bytes = CPU_DEFAULT_KV_CACHE_BYTES
        if kv_bytes > 0:
            ours.append(("--kv-cache-memory-bytes", str(kv_bytes)))
        for name, value in (shared or {}).items():
            ours.append(("--" + name.replace("_", "-"), str(value)))
        if scheduling_policy != SCHEDULING_FCFS:
            ours.append(("--scheduling-policy", scheduling_policy))
        argv: list[str] = []
        for flag, value in ours:
            if flag not in given:
                argv += [flag] if value is None else [flag, value]
        return argv + extra


def _flag_name(arg: str) -> str:
    """`--no-enable-prefix-caching` and `--block-size=16` name `--enable-prefix-caching` and
    `--block-size`."""
    name = arg.split("=", 1)[0]
    return "--" + name[5:] if name.startswith("--no-") else name
