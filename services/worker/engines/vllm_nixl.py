"""Disaggregated prefill/decode for the vllm engine: vLLM's `NixlConnector` set up for one
worker, and the per-phase request parameters.

A prefill request runs with `kv_transfer_params={"do_remote_decode": true}` and one token to
generate; vLLM then holds its blocks and returns the parameters a decode engine needs to read them
(engine id, block ids, side-channel host and port). The worker passes those on, as JSON, in the
final chunk's `kv_transfer_params`; the router carries them untouched to the decode worker,
whose vLLM reads the blocks over NIXL (UCX; on one host a zero-copy process-to-process copy) and
then tells the prefill side, which frees them. The decode request continues after prompt + the
prefill's token: vLLM's own connector would load that token too (its KV is not on the prefill
side) and, where it starts a new block, ask the prefill side for one block more than it holds;
`TurnoutNixlConnector` stops the load at the tokens the prefill side computed, so the decode
engine computes the prefill's token itself, as its first step. It also reads the prompt of a
request sent as prompt embeddings (a chat whose images the encode pool embedded), which vLLM's
own connector sizes from token ids such a request has none of, and so recomputes whole.

NIXL's progress thread stays on: with it off (tried), the first read of a new pair of workers
stalled until another request made both engines step (minutes, past the lease). As vLLM creates
the agent, that thread polls its UCX worker with a zero timeout, spinning a core per worker idle
or not; on a 2-core host the spinning starved both engines (the decode's first token 1-15 s after
its request, reads finishing after the prefill side's lease). The connector gives the thread a
poll timeout (`quiet_progress_thread`): it sleeps until a UCX event or 1 ms passes (first
decoded token 0.2-0.4 s on the same host).

Each worker's vLLM listens for NIXL handshakes on a side channel (a ZeroMQ socket in its engine
core); the port is chosen free here and advertised in the worker's discovery record, never fixed.
Blocks the decode side never reads are freed when vLLM's lease (`kv_lease_duration`, engine-wide,
renewed by the decode side's heartbeats while it waits to read) expires.

Owns the connector subclass, the `KVTransferConfig` and side-channel settings, and the mapping of a
request's phase onto vLLM's parameters. Imported only by the vllm engine.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

from common.free_port import free_port
from common.messages import PHASE_AGGREGATED, PHASE_DECODE, PHASE_PREFILL

if TYPE_CHECKING:
    from vllm.v1.request import Request

CONNECTOR_NAME = "TurnoutNixlConnector"
MODULE_PATH = __name__

PHASES = (PHASE_AGGREGATED, PHASE_PREFILL, PHASE_DECODE)

# vLLM reads these two in its engine core (a child process), from the environment it inherits.
ENV_HOST = "VLLM_NIXL_SIDE_CHANNEL_HOST"
ENV_PORT = "VLLM_NIXL_SIDE_CHANNEL_PORT"

log = logging.getLogger(__name__)


# How long NIXL's UCX progress thread sleeps in poll() between wake-ups when no UCX event comes.
# The Python agent hard-codes 0 (`pthrDelay`), which NIXL turns into poll(..., 0): the thread
# spins a core per worker, idle or not (measured: ~92% and ~16% of a core for an idle pair on a
# 2-core host, starving both engines). Events (a read, a notification) still wake it at once.
PROGRESS_WAIT_US = 1000


class TurnoutNixlConnector(NixlConnector):
    """vLLM's NixlConnector, loading at most the tokens the prefill side computed, with a NIXL
    progress thread that sleeps between UCX events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_progress_thread(PROGRESS_WAIT_US)
        super().__init__(*args, **kwargs)

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        count, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        params = request.kv_transfer_params
        if not count and request.prompt_token_ids is None and params \
                and params.get("do_remote_prefill"):
            # vLLM sizes a remote prefill from `prompt_token_ids`, which a prompt-embeddings
            # request (images embedded by the encode pool) lacks: it would read nothing and
            # recompute the whole prompt. Its prompt length is known all the same.
            count, load_async = request.num_prompt_tokens - num_computed_tokens, True
        return cap_to_remote(count, load_async, params, num_computed_tokens)


def cap_to_remote(count: int | None, load_async: bool, params: dict[str, Any] | None,
                  num_computed_tokens: int) -> tuple[int | None, bool]:
    """vLLM's (tokens to load, asynchronously?) answer for a request, cut to the tokens its
    prefill side computed (`remote_num_tokens` of the hand-off): past them the decode engine
    computes, and nothing is loaded when its own cache already holds them all."""
    if not count or not params or not params.get("do_remote_prefill"):
        return count, load_async
    remote = params.get("remote_num_tokens")
    if not isinstance(remote, int) or remote <= 0:
        return count, load_async
    count = min(count, remote - num_computed_tokens)
    return (count, load_async) if count > 0 else (0, False)


class _WaitingProgressBind:
    """NIXL's binding module, except that an agent created with a progress thread and no delay
    gets `delay_us` (the poll timeout of that thread)."""

    def __init__(self, bind: Any, delay_us: int) -> None:
        self._bind = bind
        self.delay_us = delay_us

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bind, name)

    def nixlAgent(self, name: str, config: Any) -> Any:
        if config.useProgThread and config.pthrDelay == 0:
            config.pthrDelay = self.delay_us
        return self._bind.nixlAgent(name, config)


def quiet_progress_thread(delay_us: int) -> bool:
    """Make the NIXL agents this process creates from now on wait `delay_us` in their progress
    thread's poll instead of spinning. vLLM builds its agent through NIXL's Python class, which
    offers no such setting; the agent's native config is filled in by that class and handed to
    the binding, so the binding is where the delay goes. False (and nothing changed) where NIXL's
    layout is not the one this knows."""
    try:
        from nixl import _api
    except ImportError:
        return False
    bind = getattr(_api, "nixlBind", None)
    if isinstance(bind, _WaitingProgressBind):
        bind.delay_us = delay_us
        return True
    if bind is None or not hasattr(bind, "nixlAgent"):
        log.warning("nixl: no nixlBind.nixlAgent in %s; its progress thread keeps spinning",
                    _api.__name__)
        return False
    _api.nixlBind = _WaitingProgressBind(bind, delay_us)
    return True


@dataclass
class NixlSide:
    """One worker's NIXL settings: where its side channel listens, and the lease."""

    host: str
    port: int
    lease_s: int

    @classmethod
    def choose(cls, host: str, lease_s: int) -> NixlSide:
        return cls(host, free_port(host), lease_s)

    def export_env(self) -> None:
        """Before vLLM starts: its engine core reads the side channel from the environment."""
        os.environ[ENV_HOST] = self.host
        os.environ[ENV_PORT] = str(self.port)

    def transfer_config(self) -> KVTransferConfig:
        # kv_both: every worker can be either side, so one pool can serve both phases.
        return KVTransferConfig(
            kv_connector=CONNECTOR_NAME, kv_connector_module_path=MODULE_PATH,
            kv_role="kv_both", kv_buffer_device="cpu",
            # A read that fails (the prefill side gone, its lease expired, a handshake that
            # timed out) recomputes what it lacked instead of failing the stream (vLLM's
            # default is "fail").
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"kv_lease_duration": self.lease_s})

    def metadata(self) -> dict[str, Any]:
        """What the worker's discovery record says about its KV transfer side."""
        return {"kv_transfer": "nixl", "nixl_side_channel": f"{self.host}:{self.port}",
                "kv_lease_s": self.lease_s}


def phase_params(phase: str, kv_transfer_params: bytes) -> dict[str, Any] | None:
    """vLLM's `kv_transfer_params` for a request of `phase` (None: aggregated); ValueError on
    a phase or hand-off it cannot use."""
    if phase == PHASE_AGGREGATED:
        if kv_transfer_params:
            raise ValueError("kv_transfer_params given without a phase")
        return None
    if phase == PHASE_PREFILL:
        if kv_transfer_params:
            raise ValueError("a prefill request takes no kv_transfer_params")
        return {"do_remote_decode": True}
    if phase == PHASE_DECODE:
        if not kv_transfer_params:
            raise ValueError("a decode request needs the prefill's kv_transfer_params")
        try:
            params = json.loads(kv_transfer_params)
        except ValueError as exc:
            raise ValueError(f"kv_transfer_params is not JSON: {exc}") from None
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            raise ValueError("kv_transfer_params is not a vLLM prefill hand-off "
                             "(no do_remote_prefill)")
        return params
    raise ValueError(f"unknown phase {phase!r} (expected one of {', '.join(map(repr, PHASES))})")


def encode_handoff(params: dict[str, Any] | None) -> bytes:
    """The prefill's returned parameters as the bytes its final chunk carries."""
    return json.dumps(params, separators=(",", ":")).encode() if params else b""
