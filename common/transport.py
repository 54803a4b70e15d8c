"""ZeroMQ socket set-up shared by the request and event planes: binding, connecting, options.

The one place CURVE is applied: a context made secure with `secure_context` (a process that was
given a keys directory) gets a ZAP handler, every socket bound through `bind_socket` becomes a
CURVE server proving the fleet secret, and every socket connected through `connect_socket` a
CURVE client that presents the fleet key and accepts only a peer proving the fleet secret. A
context that was not made secure is untouched (plain TCP, as before). Sockets bound or connected
any other way (inproc monitors, an engine's own local sockets) are never affected.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

import zmq

from common.curve_auth import ZAP_DOMAIN, ZapHandler
from common.fleet_keys import FleetKeys, holds_nothing, load

log = logging.getLogger(__name__)

# The key a process advertises in its discovery record (Instance.metadata).
CURVE_KEY_FIELD = "curve_key"

_secured: weakref.WeakKeyDictionary[zmq.Context[Any], ZapHandler] = weakref.WeakKeyDictionary()


def secure_context(ctx: zmq.Context[Any], keys_dir: str) -> FleetKeys | None:
    """With a keys directory: load the fleet keys (a `KeysError` says what is wrong), bind the
    ZAP handler and start it on the running loop; every later `bind_socket`/`connect_socket` on
    `ctx` uses CURVE. Without one (""), or with an empty one (an optional Kubernetes Secret that
    is not there; logged): nothing, and None. A missing directory, or one holding only part of
    the keys, is an error. Call before binding or connecting."""
    if not keys_dir:
        return None
    if holds_nothing(keys_dir):
        log.warning("keys directory is empty: the planes run without CURVE (plain TCP)",
                    extra={"fields": {"keys_dir": keys_dir}})
        return None
    if ctx in _secured:
        raise RuntimeError("this context is already secured")
    keys = load(keys_dir)
    zap = _secured[ctx] = ZapHandler(ctx, keys)
    zap.start()
    return keys


def destroy_context(ctx: zmq.Context[Any]) -> None:
    """Close `ctx`'s ZAP handler (its FD leaves the loop first), then every socket of `ctx`."""
    zap = _secured.pop(ctx, None)
    if zap is not None:
        zap.close()
    ctx.destroy(linger=0)


def fleet_keys(ctx: zmq.Context[Any]) -> FleetKeys | None:
    zap = _secured.get(ctx)
    return None if zap is None else zap.keys


def identity_metadata(ctx: zmq.Context[Any]) -> dict[str, str]:
    """What this process adds to its discovery record's metadata: its public key, if secured."""
    keys = fleet_keys(ctx)
    return {} if keys is None else {CURVE_KEY_FIELD: keys.public_text}


def trusted_peer(ctx: zmq.Context[Any], metadata: Mapping[str, Any]) -> bool:
    """Whether a discovered peer (by its record's metadata) may be connected to: always on a
    plain context; on a secured one only if it advertises an admitted key. (The handshake is
    what actually guards the plane; this keeps a peer that cannot pass it from being used.)"""
    keys = fleet_keys(ctx)
    if keys is None:
        return True
    key = metadata.get(CURVE_KEY_FIELD)
    return isinstance(key, str) and keys.admits(key.encode("ascii", "replace"))


def connect_socket(socket: zmq.Socket[Any], endpoint: str) -> None:
    """Connect to a peer's advertised endpoint (as a CURVE client on a secured context)."""
    keys = fleet_keys(socket.context)
    if keys is not None:
        socket.setsockopt(zmq.CURVE_SERVERKEY, keys.public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    socket.connect(endpoint)


def bind_socket(socket: zmq.Socket, host: str, port: int, advertise_host: str | None = None) -> str:
    """Bind to tcp://host:port (port 0: any free port) and return the address peers should use.
    On a secured context the socket is a CURVE server whose clients the ZAP handler vets."""
    socket.setsockopt(zmq.LINGER, 0)
    keys = fleet_keys(socket.context)
    if keys is not None:
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    if port:
        socket.bind(f"tcp://{host}:{port}")
    else:
        port = socket.bind_to_random_port(f"tcp://{host}")
    return advertised_endpoint(host, port, advertise_host)


def advertised_endpoint(host: str, port: int, advertise_host: str | None = None) -> str:
    """The tcp:// address peers should use for something bound at host:port."""
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
