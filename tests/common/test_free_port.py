"""Ports handed to processes that bind them later: never one the kernel may give an outgoing
connection meanwhile, never the same one twice (a process still starting has not bound its
port yet, so `bind` alone cannot tell a port already handed out)."""

from __future__ import annotations

import socket

from common.free_port import ephemeral_ports, free_port


def test_a_port_is_never_handed_out_twice_even_before_anyone_binds_it() -> None:
    # 2,000 draws from the ~22,000 ports below the ephemeral range repeat one almost surely
    # (about 88 pairs expected) unless the ones handed out are remembered.
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)


def test_ports_come_from_below_the_ephemeral_range_and_can_be_bound() -> None:
    lo, _ = ephemeral_ports()
    port = free_port()
    if lo > 11_000:
        assert 10_000 <= port < lo
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))

