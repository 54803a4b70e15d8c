"""The frontend process: the OpenAI HTTP API on uvicorn, in front of the routers it discovers.

Reads top-down: parse config, load the tokenizer, connect the request plane (`RouterClient`),
register in discovery, serve HTTP until SIGTERM/SIGINT, then let uvicorn finish the requests
under way, unregister and close.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from common.config import StartupRefused
from common.discovery import open_discovery
from common.messages import ROLE_FRONTEND, Instance
from common.service import Service, run_service
from common.transport import identity_metadata, secure_context
from common.vision_layout import VisionLayout, vision_layout
from services.frontend.args import FrontendConfig
from services.frontend.images import ChatImages

log = logging.getLogger("turnout.frontend")


def listen_socket(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, with TCP_NODELAY (accepted sockets inherit it): a streamed
    token must leave at once, not wait for Nagle and the client's delayed ACK (~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        if exc.errno == errno.EADDRINUSE:
            why += ("; another process holds the port (a Turnout already running? `turnout "
                    "status` shows it): stop it, or choose another port with --port")
        raise StartupRefused(why) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(config: FrontendConfig) -> None:
    import uvicorn

    from services.frontend.api_keys import ApiKeys
    from services.frontend.app import FrontendApp
    from services.frontend.limits import AdmissionQueue, HttpLimits, limited_http_protocol
    from services.frontend.metrics import FrontendMetrics
    from services.frontend.quotas import Quotas
    from services.frontend.tokenizer import load_tokenizer
    from services.frontend.upstream import RouterClient
    from services.frontend.upstream_metrics import UpstreamMetrics

    async with Service(ROLE_FRONTEND, config.frontend_id) as service:
        service.install_signal_handlers()
        t0 = time.monotonic()
        tokenizer = load_tokenizer(config.model or None)
        log.info("tokenizer loaded", extra={"fields": {
            "model": config.model or "builtin-bytes", "seconds": round(time.monotonic() - t0, 2)}})
        discovery = open_discovery(config.discovery, lease_ttl=config.lease_ttl_s)
        metrics = FrontendMetrics()
        upstream = RouterClient(discovery, config.heartbeat_interval_ms / 1000,
                                config.missed_heartbeats, UpstreamMetrics(metrics.registry),
                                config.router_resume_wait_ms / 1000)
        secure_context(upstream.ctx, config.keys_dir)
        await upstream.start()
        service.on_shutdown("request plane", upstream.close)
        service.on_shutdown("discovery", discovery.close)
        api_keys = None
        if config.api_keys_file or config.api_key:
            # A keys file that does not parse at start-up is fatal; later, the last good one
            # stays in force.
            api_keys = ApiKeys(config.api_keys_file or None, config.api_key or None,
                               on_reload_error=metrics.keys_reload_errors.inc)
            metrics.keys_loaded.set_function(lambda: sum(1 for _ in api_keys.policies()))
        quotas = Quotas()
        app = FrontendApp(upstream=upstream, tokenizer=tokenizer,
                          served_model_name=config.model_name(),
                          max_model_len=config.max_model_len, metrics=metrics,
                          api_keys=api_keys, quotas=quotas,
                          admission=AdmissionQueue(config.max_active_requests,
                                                   config.max_queued_requests,
                                                   config.queue_timeout_s),
                          max_body_bytes=config.max_body_bytes,
                          max_prompt_tokens=config.max_prompt_tokens,
                          max_output_tokens=config.max_output_tokens,
                          stream_interval=config.stream_interval,
                          tool_call_parser=config.tool_call_parser or None,
                          reasoning_parser=config.reasoning_parser or None,
                          images=ChatImages(config.image_limits(),
                                            layout=_vision_layout(config.model)))
        service.on_shutdown("image fetcher", app.images.fetcher.close)
        if api_keys is not None and api_keys.path is not None:
            keys = api_keys
            service.spawn("api keys reload", keys.watch(
                config.api_keys_reload_s, on_change=lambda: quotas.sync(keys.policies())))
        http_protocol = limited_http_protocol(
            HttpLimits(config.max_body_bytes, config.max_header_bytes, config.max_headers,
                       config.header_timeout_s, config.body_timeout_s),
            on_refusal=lambda limit: metrics.http_refusals.labels(limit).inc())
        sock = listen_socket(config.host, config.port)
        service.on_shutdown("listening socket", sock.close)
        port = sock.getsockname()[1]
        host = config.advertise_host or config.host
        scheme = "https" if config.ssl_certfile else "http"
        service.on_shutdown("unregister", lambda: discovery.unregister(service.id))
        await discovery.register(Instance(
            id=service.id, role=ROLE_FRONTEND, model=config.model_name(),
            endpoints={"http": f"{scheme}://{host}:{port}",
                       "metrics": f"{scheme}://{host}:{port}/metrics"},
            metadata={"pid": os.getpid(), "started": time.time(),
                      **identity_metadata(upstream.ctx)}))
        server = uvicorn.Server(uvicorn.Config(
            app, loop="none", http=http_protocol, lifespan="off", access_log=False,
            log_level=config.log_level, timeout_keep_alive=30, server_header=False,
            ssl_certfile=config.ssl_certfile or None, ssl_keyfile=config.ssl_keyfile or None))
        # While serving, uvicorn takes SIGTERM/SIGINT itself (it stops accepting and lets the
        # requests under way finish); afterwards it restores our handlers and re-raises the
        # signal, which then stops the service.
        http = service.spawn("http", server.serve(sockets=[sock]))

        async def stop_http() -> None:
            server.should_exit = True
            await asyncio.wait({http})

        service.on_shutdown("http server", stop_http)
        log.info("frontend ready", extra={"fields": {"url": f"{scheme}://{host}:{port}/v1"}})
        await service.run()


def _vision_layout(model: str) -> VisionLayout | None:
    """The image layout of a vision-language model directory (None for any other model)."""
    if not model or not Path(model).is_dir():
        return None
    try:
        return vision_layout(model)
    except ValueError as exc:
        log.warning("images will get estimated placeholder counts: %s", exc)
        return None


def main(argv: Sequence[str] | None = None) -> None:
    run_service(ROLE_FRONTEND, [FrontendConfig], serve, argv)
