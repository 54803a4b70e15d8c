"""Workers declared dead for a dropped connection that turn out alive.

A dropped request connection nearly always means the worker process died, so the router closes
the handle at once and never re-admits that incarnation from its discovery record. But a
connection can also be cut while both ends live (a network blip, a reset by a middlebox or a
restarted proxy): the worker keeps renewing its record and would stay unused until restarted.
So while a worker declared dead is still listed in discovery, the router keeps trying to reach
it: a probe connection to its request endpoint (reconnecting by itself) and its event plane
kept subscribed. Once the probe is connected and a heartbeat with the worker's id arrives after
that, the same process is alive and reachable again, and it is re-admitted (resynced like a new
worker). A dead process answers neither: its port refuses connections, and it sends no
heartbeats (should another process reuse the port, its heartbeats carry another id).

Owns the probes; re-admitting (from the worker's latest record) is the router's (`main.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

from common.messages import Instance
from common.monitored_dealer import MonitoredDealer

log = logging.getLogger("turnout.router")


class WorkerRevival:
    def __init__(self, ctx: zmq.Context, on_alive: Callable[[str], None]) -> None:
        self.ctx = ctx
        self.on_alive = on_alive
        # Worker id → its probe connection and the task waiting on it.
        self._probes: dict[str, tuple[MonitoredDealer, asyncio.Task[None]]] = {}
        self._heard: dict[str, asyncio.Event] = {}  # set by a heartbeat once the probe is up

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._probes

    def watch(self, instance: Instance) -> None:
        """`instance` was declared dead while listed: try to reach it until it answers or is
        forgotten."""
        self.forget(instance.id)
        probe = MonitoredDealer(self.ctx, instance.endpoints["request"], lambda frames: None)
        self._probes[instance.id] = (probe, asyncio.create_task(self._wait(instance.id, probe)))

    def heard(self, worker_id: str) -> None:
        """A heartbeat from `worker_id`, which has no handle."""
        event = self._heard.get(worker_id)
        if event is not None:
            event.set()

    def forget(self, worker_id: str) -> None:
        """It left discovery, or a new incarnation took its place: stop trying."""
        probe = self._probes.pop(worker_id, None)
        if probe is not None:
            probe[0].close()
            if probe[1] is not asyncio.current_task():
                probe[1].cancel()
        self._heard.pop(worker_id, None)

    def close(self) -> None:
        for worker_id in list(self._probes):
            self.forget(worker_id)

    async def _wait(self, worker_id: str, probe: MonitoredDealer) -> None:
        async for up in probe.changes():
            if up:
                break
        heard = self._heard[worker_id] = asyncio.Event()
        await heard.wait()
        self.forget(worker_id)
        log.warning("worker declared dead is reachable and heartbeating again; re-admitting",
                    extra={"fields": {"worker": worker_id}})
        self.on_alive(worker_id)
