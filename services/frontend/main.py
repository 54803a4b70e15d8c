"""The frontend process: the OpenAI HTTP API on uvicorn, in front of the routers it discovers.

Reads top-down: parse config, load the tokenizer, connect the request plane (`RouterClient`),
register in discovery, serve HTTP until SIGTERM/SIGINT, then unregister and close.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Sequence

from common.config import parse_configs
from common.discovery import open_discovery
from common.logs import setup_logging
from common.messages import ROLE_FRONTEND, Instance
from services.frontend.args import FrontendConfig

log = logging.getLogger("turnout.frontend")


def listen_socket(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, with TCP_NODELAY (accepted sockets inherit it): a streamed
    token must leave at once, not wait for Nagle and the client's delayed ACK (~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(config: FrontendConfig) -> None:
    import uvicorn

    from services.frontend.app import FrontendApp
    from services.frontend.metrics import FrontendMetrics
    from services.frontend.tokenizer import load_tokenizer
    from services.frontend.upstream import RouterClient

    frontend_id = config.frontend_id or f"frontend-{os.getpid()}-{secrets.token_hex(3)}"
    t0 = time.monotonic()
    tokenizer = load_tokenizer(config.model or None)
    log.info("tokenizer loaded", extra={"fields": {"model": config.model or "builtin-bytes",
                                                   "seconds": round(time.monotonic() - t0, 2)}})
    discovery = open_discovery(config.discovery, lease_ttl=config.lease_ttl_s)
    upstream = RouterClient(discovery)
    await upstream.start()
    app = FrontendApp(upstream=upstream, tokenizer=tokenizer,
                      served_model_name=config.model_name(), max_model_len=config.max_model_len,
                      metrics=FrontendMetrics(), api_key=config.api_key or None)
    sock = listen_socket(config.host, config.port)
    port = sock.getsockname()[1]
    host = config.advertise_host or config.host
    await discovery.register(Instance(
        id=frontend_id, role=ROLE_FRONTEND, model=config.model_name(),
        endpoints={"http": f"http://{host}:{port}", "metrics": f"http://{host}:{port}/metrics"},
        metadata={"pid": os.getpid(), "started": time.time()}))
    server = uvicorn.Server(uvicorn.Config(
        app, loop="none", http="httptools", lifespan="off", access_log=False,
        log_level=config.log_level, timeout_keep_alive=30, server_header=False))
    log.info("frontend ready", extra={"fields": {"url": f"http://{host}:{port}/v1"}})
    # uvicorn re-raises the signal that stopped it, after restoring the handlers it found:
    # with these in place that is a no-op, and the clean-up below still runs.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        await server.serve(sockets=[sock])
    finally:
        await discovery.unregister(frontend_id)
        await discovery.close()
        await upstream.close()


def main(argv: Sequence[str] | None = None) -> None:
    (config,) = parse_configs([FrontendConfig], list(sys.argv[1:] if argv is None else argv),
                              prog="turnout frontend")
    setup_logging("frontend", config.log_level)
    import uvloop

    uvloop.run(serve(config))
