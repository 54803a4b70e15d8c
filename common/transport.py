"""ZeroMQ socket set-up shared by the request and event planes: binding, addresses, options."""

from __future__ import annotations

import zmq


def bind_socket(socket: zmq.Socket, host: str, port: int, advertise_host: str | None = None) -> str:
    """Bind to tcp://host:port (port 0: any free port) and return the address peers should use."""
    socket.setsockopt(zmq.LINGER, 0)
    if port:
        socket.bind(f"tcp://{host}:{port}")
    else:
        port = socket.bind_to_random_port(f"tcp://{host}")
    shown = advertise_host or host
    if shown in ("0.0.0.0", "*", ""):
        shown = "127.0.0.1"
    return f"tcp://{shown}:{port}"


def tune_stream_socket(socket: zmq.Socket) -> None:
    """Options for request-plane sockets: deep queues (never drop a token), no linger on close."""
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    # ZeroMQ sets TCP_NODELAY on its TCP connections itself; keepalive catches dead peers that
    # vanished without a FIN (a powered-off host), heartbeats catch everything faster.
    socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
    socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
    socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
