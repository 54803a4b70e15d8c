"""What every vLLM e2e module on a CPU host shares: vLLM's CPU threads (and a CI host's other
load) starve the Turnout processes beside it for a second or more (measured: a router's 166 ms
epoll timeout returning after 973 ms), so leases last the services' default, not the harness's
quick 2 s: a starved router or worker must not drop out of discovery mid-test. Deaths these
tests cause (SIGKILL) are caught by the dropped connection, not by a lease running out."""

from __future__ import annotations

VLLM_LEASE_TTL_S = 10.0
