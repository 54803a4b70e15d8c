"""Choosing a TCP port for a process to bind later: tests' and `turnout profile`'s deployments,
and vLLM's NIXL side channel.

A port that is free now can be taken before its process binds it, two ways: an outgoing
connection takes a local port from the kernel's ephemeral range, and a second `free_port()`
call picks the same port while the first process is still starting. So ports come from below
the ephemeral range, and no port is handed out twice in one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[tuple[str, int]] = set()


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' local ports from."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that is free now and that this process has not handed out before."""
    lo, _ = ephemeral_ports()
    rng = random.SystemRandom()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in range(256):
        # Where the ephemeral range starts too low to leave room below it, the kernel chooses.
        port = rng.randrange(10_000, lo) if lo > 11_000 and attempt < 192 else 0
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            chosen = int(s.getsockname()[1])
        if (host, chosen) not in _handed_out:
            _handed_out.add((host, chosen))
            return chosen
    raise OSError(f"no free port left on {host}")


__all__ = ["ephemeral_ports", "free_port"]
