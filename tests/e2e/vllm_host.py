"""What every vLLM e2e module on a CPU host shares: vLLM's CPU threads (and a CI host's other
load) starve the Turnout processes beside it for a second or more (measured: a router's 166 ms
epoll timeout returning after 973 ms), so leases last the services' default, not the harness's
quick 2 s: a starved router or worker must not drop out of discovery mid-test. Deaths these
tests cause (SIGKILL) are caught by the dropped connection, not by a lease running out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from turnout.testing.deployment import Deployment

VLLM_LEASE_TTL_S = 10.0


@contextlib.contextmanager
def vllm_deployment(directory: Path, model: str,
                    env: dict[str, str] | None = None) -> Iterator[Deployment]:
    """A deployment of `model` (also its `model` attribute) on vLLM's leases, stopped on the way
    out; a failure while it starts prints the services' logs first. `env`: the services'
    environment (default this process's)."""
    d = Deployment(directory, extra=["--model", model], lease_ttl_s=VLLM_LEASE_TTL_S, env=env)
    d.model = model  # type: ignore[attr-defined]
    try:
        yield d
    except BaseException:
        print(d.logs(6000))
        raise
    finally:
        d.stop()
