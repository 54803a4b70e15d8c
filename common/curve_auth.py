"""The ZAP handler of one ZeroMQ context: admits a CURVE client only if its key is the fleet's.

libzmq asks the handler bound at `inproc://zeromq.zap.01` of a context about every handshake on
that context's CURVE server sockets (once per connection, never per message). This one answers
on the event loop (a `LoopSocket`: no thread, no Future per request): 200 for a CURVE client
whose public key the fleet admits, 400 for anything else (another key, another mechanism).
pyzmq's own authenticators were not used: the thread one runs a thread, the asyncio one brings
pyzmq's per-message Future machinery for what is a dictionary lookup.

Owns the ZAP socket and the verdicts; denials are counted and logged once per peer address.
Does not own the keys (`common.fleet_keys`) or the sockets' options (`common.transport`).
"""

from __future__ import annotations

import logging

import zmq
from zmq.utils import z85

from common.fleet_keys import FleetKeys
from common.loop_socket import LoopSocket
from common.malformed import MalformedFrames

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"turnout"
_VERSION = b"1.0"


class ZapHandler:
    """Bound at construction (so no handshake can slip past before it exists); answers from
    `start()` on the running loop. Handshakes that arrive before are answered then."""

    def __init__(self, ctx: zmq.Context, keys: FleetKeys) -> None:
        self.keys = keys
        self.admitted = 0
        socket = ctx.socket(zmq.ROUTER, socket_class=zmq.Socket)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(ZAP_ENDPOINT)
        self.denied = MalformedFrames("plane handshake (not a fleet key)", logger=log)
        self.socket = LoopSocket(socket, self._on_request)

    def start(self) -> None:
        self.socket.start()

    def _on_request(self, frames: list[bytes]) -> None:
        # [routing id, b"", version, request id, domain, address, identity, mechanism, creds..]
        if len(frames) < 9 or frames[1] != b"" or frames[2] != _VERSION:
            return  # not a ZAP 1.0 request: libzmq never sends one
        request_id, domain, address, mechanism = frames[3], frames[4], frames[5], frames[7]
        peer = address.decode("ascii", "replace")
        if mechanism != b"CURVE":
            verdict = (b"400", b"CURVE required")
        elif domain != ZAP_DOMAIN:
            verdict = (b"400", b"unknown domain")
        else:
            client = z85.encode(frames[8]) if len(frames[8]) == 32 else b""
            verdict = (b"200", b"OK") if self.keys.admits(client) else (b"400", b"unknown key")
        if verdict[0] == b"200":
            self.admitted += 1
        else:
            self.denied.drop(verdict[1].decode(), peer)
        self.socket.send_multipart([frames[0], b"", _VERSION, request_id, *verdict, b"", b""])

    def close(self) -> None:
        self.socket.close()
