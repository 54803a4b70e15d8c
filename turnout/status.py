"""`turnout status`: the fleet as the live planes see it, in a terminal table or as JSON.

Lists every instance in discovery, listens to the workers' heartbeats and load reports on the
event plane for a moment (`--listen-s`; `--watch` keeps listening and redraws every second until
Ctrl-C), scrapes routers' and frontends' /metrics, and prints per worker: mode, model, health
(alive / draining / stale by heartbeat age), engine (with what it honours that the router places
by: priority scheduling, structured outputs), running and waiting requests, KV blocks in use,
engine steps per second and requests in flight; then routers and frontends with their addresses
and what their metrics say. Reads only: it registers nothing and sends nothing on the request
plane.

Owns gathering and presenting that view. Does not own any of the figures (workers, routers and
frontends do) nor how they are published.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx
import zmq

from common import prometheus_text
from common.config import flag_given, opt, parse
from common.discovery import Discovery, open_discovery
from common.event_plane import EventSubscriber
from common.fleet_keys import KeysError
from common.malformed import MALFORMED
from common.messages import (
    ROLE_FRONTEND,
    ROLE_ROUTER,
    ROLE_WORKER,
    SCHEDULING_FCFS,
    SCHEDULING_PRIORITY,
    TOPIC_HEARTBEAT,
    TOPIC_LOAD,
    Instance,
    LoadReport,
    heartbeat_decoder,
    load_decoder,
)
from common.prometheus_text import Metrics
from common.transport import destroy_context, secure_context
from turnout.local_fleets import up_discovery_dirs

# Steps per second are measured over the heartbeats of this last stretch of time.
RATE_WINDOW_S = 3.0


@dataclasses.dataclass
class StatusConfig:
    discovery: str = opt("file:/tmp/turnout-discovery",
                         help="discovery backend: file:DIR, static:FILE.json or kubernetes "
                         "(not given: the default while anything registers there, else the "
                         "one `turnout up` deployment running on this machine)")
    lease_ttl_s: float = opt(10.0, help="discovery lease the fleet uses (records older than "
                                        "this are gone)")
    watch: bool = opt(False, help="keep listening and redraw every second until Ctrl-C")
    json_output: bool = opt(False, flag="--json", help="print JSON (one object per refresh) "
                                                       "instead of tables")
    listen_s: float = opt(1.0, help="how long to listen to heartbeats before the first view")
    stale_after_s: float = opt(0.5, help="a worker silent this long is shown as stale")
    scrape_timeout_s: float = opt(1.0, help="timeout of each /metrics scrape")
    keys_dir: str = opt("", help="the fleet's CURVE keys, to hear a fleet that runs with them")


@dataclasses.dataclass
class WorkerState:
    """What the event plane told us about one worker."""

    last_heartbeat: float | None = None  # monotonic receive time
    draining: bool = False
    active_requests: int = 0
    load: LoadReport | None = None
    steps: collections.deque[tuple[float, int]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=256))

    def steps_per_s(self) -> float | None:
        if len(self.steps) < 2:
            return None
        (t0, s0), (t1, s1) = self.steps[0], self.steps[-1]
        return (s1 - s0) / (t1 - t0) if t1 - t0 > 0.05 else None


class FleetView:
    """Discovery records, worker events and scrapes, combined into one snapshot."""

    def __init__(self, config: StatusConfig, discovery: Discovery) -> None:
        self.config = config
        self.discovery = discovery
        self.ctx = zmq.Context()
        self.subscriber = EventSubscriber(self.ctx, [TOPIC_HEARTBEAT, TOPIC_LOAD])
        self.instances: list[Instance] = []
        self.workers: dict[str, WorkerState] = {}
        self._events: dict[str, str] = {}  # worker id → event endpoint connected

    async def refresh(self) -> None:
        """Re-read discovery; follow the event plane of workers that appeared, drop the rest."""
        self.instances = await self.discovery.list()
        current = {i.id: i for i in self.instances if i.role == ROLE_WORKER}
        for worker_id in list(self._events):
            endpoint = current[worker_id].endpoints.get("events") if worker_id in current \
                else None
            if endpoint != self._events[worker_id]:  # gone, or a new incarnation
                self.subscriber.disconnect(self._events.pop(worker_id))
                self.workers.pop(worker_id, None)
        for worker_id in list(self.workers):
            if worker_id not in current:
                del self.workers[worker_id]
        for worker_id, inst in current.items():
            self.workers.setdefault(worker_id, WorkerState())
            endpoint = inst.endpoints.get("events")
            if endpoint and worker_id not in self._events:
                self.subscriber.connect(endpoint)
                self._events[worker_id] = endpoint

    async def listen(self) -> None:
        """Apply heartbeats and load reports as they come (runs until cancelled)."""
        while True:
            topic, env = await self.subscriber.recv()
            state = self.workers.get(env.publisher_id)
            if state is None:
                continue
            try:
                if topic == TOPIC_HEARTBEAT:
                    hb = heartbeat_decoder.decode(env.payload)
                    now = time.monotonic()
                    state.last_heartbeat = now
                    state.draining = hb.draining
                    state.active_requests = hb.active_requests
                    state.steps.append((now, hb.steps))
                    while state.steps and now - state.steps[0][0] > RATE_WINDOW_S:
                        state.steps.popleft()
                elif topic == TOPIC_LOAD:
                    state.load = load_decoder.decode(env.payload)
            except MALFORMED:
                continue

    async def snapshot(self, http: httpx.AsyncClient) -> dict[str, Any]:
        scraped = [i for i in self.instances if i.role in (ROLE_ROUTER, ROLE_FRONTEND)]
        results = await asyncio.gather(*(self._scrape(http, i) for i in scraped))
        samples = dict(zip((i.id for i in scraped), results, strict=True))
        now = time.monotonic()  # after the scrapes: heartbeats kept arriving meanwhile
        workers, routers, frontends, others = [], [], [], []
        for inst in self.instances:
            if inst.role == ROLE_WORKER:
                workers.append(self._worker_row(inst, now))
            elif inst.role == ROLE_ROUTER:
                routers.append(_router_row(inst, samples[inst.id]))
            elif inst.role == ROLE_FRONTEND:
                frontends.append(_frontend_row(inst, samples[inst.id]))
            else:
                others.append({"id": inst.id, "role": inst.role, "model": inst.model,
                               "endpoints": inst.endpoints})
        return {"time": time.time(), "workers": workers, "routers": routers,
                "frontends": frontends, "others": others}

    def _worker_row(self, inst: Instance, now: float) -> dict[str, Any]:
        state = self.workers.get(inst.id) or WorkerState()
        age = None if state.last_heartbeat is None else now - state.last_heartbeat
        if age is None or age > self.config.stale_after_s:
            health = "stale"
        elif state.draining:
            health = "draining"
        else:
            health = "alive"
        load = state.load
        rate = state.steps_per_s()
        return {
            "id": inst.id,
            "mode": inst.metadata.get("mode", ""),
            "engine": inst.metadata.get("engine", ""),
            # What the router places by beyond the model (request_needs): an older worker
            # that does not say honours neither.
            "scheduling": inst.metadata.get("scheduling", SCHEDULING_FCFS),
            "structured_outputs": inst.metadata.get("structured_outputs") is True,
            "model": inst.model,
            "health": health,
            "heartbeat_age_s": None if age is None else round(age, 3),
            "running": load.running if load else None,
            "waiting": load.waiting if load else None,
            "kv_used_blocks": load.kv_used_blocks if load else None,
            "kv_total_blocks": load.kv_total_blocks if load else None,
            "kv_used_pct": round(100 * load.kv_used_blocks / load.kv_total_blocks, 3)
            if load and load.kv_total_blocks else None,
            "steps_per_s": None if rate is None else round(rate, 1),
            "in_flight": state.active_requests if state.last_heartbeat is not None else None,
            "endpoints": inst.endpoints,
        }

    async def _scrape(self, http: httpx.AsyncClient,
                      inst: Instance) -> Metrics | None:
        url = inst.endpoints.get("metrics")
        if not url:
            return None
        try:
            response = await http.get(url, timeout=self.config.scrape_timeout_s)
            response.raise_for_status()
            return prometheus_text.parse(response.text)
        except (httpx.HTTPError, ValueError):
            return None

    def close(self) -> None:
        self.subscriber.close()
        destroy_context(self.ctx)


def _total(samples: Metrics | None, name: str) -> float | None:
    return None if samples is None else samples.value(name)


def _router_row(inst: Instance,
                samples: Metrics | None) -> dict[str, Any]:
    migrations = None
    up = None
    disagg = None
    if samples is not None:
        # Where prompts ran with prefill workers about: "path/reason" → requests.
        disagg = {f"{s.labels['path']}/{s.labels['reason']}": int(s.value)
                  for s in samples.samples("turnout_router_disagg_decisions_total")}
        migrations = {cause: int(v) for cause, v in
                      samples.by_label("turnout_router_migrations_total", "cause").items()}
        up = {worker: int(v) for worker, v in
              samples.by_label("turnout_router_worker_up", "worker").items()}
    in_flight = _total(samples, "turnout_router_inflight_requests")
    return {
        "id": inst.id,
        "mode": inst.metadata.get("mode", ""),
        "request": inst.endpoints.get("request", ""),
        "metrics": inst.endpoints.get("metrics", ""),
        "reachable": samples is not None,
        "in_flight": None if in_flight is None else int(in_flight),
        "migrations": migrations,
        "workers_up": up,
        "disagg_decisions": disagg,
    }


def _frontend_row(inst: Instance,
                  samples: Metrics | None) -> dict[str, Any]:
    active = _total(samples, "turnout_frontend_active_requests")
    queued = _total(samples, "turnout_frontend_queued_requests")
    return {
        "id": inst.id,
        "model": inst.model,
        "url": inst.endpoints.get("http", ""),
        "reachable": samples is not None,
        "active_requests": None if active is None else int(active),
        "queued_requests": None if queued is None else int(queued),
    }


# -- presentation ----------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def render(snapshot: dict[str, Any]) -> str:
    parts = []
    workers = snapshot["workers"]
    rows = []
    for w in workers:
        kv = (f"{w['kv_used_blocks']}/{w['kv_total_blocks']}"
              if w["kv_total_blocks"] is not None else None)
        pct = f"{w['kv_used_pct']:.1f}%" if w["kv_used_pct"] is not None else None
        age = f"{w['heartbeat_age_s'] * 1000:.0f}ms" if w["heartbeat_age_s"] is not None \
            else None
        honours = ",".join(name for name, has in (
            ("priority", w["scheduling"] == SCHEDULING_PRIORITY),
            ("structured", w["structured_outputs"])) if has)
        engine = f"{w['engine']}[{honours}]" if honours else w["engine"]
        rows.append([w["id"], w["mode"], w["model"], w["health"], engine, age, w["running"],
                     w["waiting"], kv, pct, w["steps_per_s"], w["in_flight"]])
    parts.append(f"WORKERS ({len(workers)})\n" + _table(
        ["ID", "MODE", "MODEL", "HEALTH", "ENGINE", "HB AGE", "RUNNING", "WAITING",
         "KV USED/TOTAL", "KV%", "STEPS/S", "IN-FLIGHT"], rows))
    rows = []
    for r in snapshot["routers"]:
        migrations = (" ".join(f"{c}={n}" for c, n in sorted(r["migrations"].items())) or "0"
                      if r["migrations"] is not None else None)
        up = (f"{sum(r['workers_up'].values())}/{len(r['workers_up'])}"
              if r["workers_up"] is not None else None)
        disagg = (" ".join(f"{k}={n}" for k, n in sorted(r["disagg_decisions"].items())) or "0"
                  if r["disagg_decisions"] is not None else None)
        rows.append([r["id"], r["mode"], r["request"], r["metrics"], r["in_flight"],
                     migrations, up, disagg])
    parts.append(f"ROUTERS ({len(rows)})\n" + _table(
        ["ID", "MODE", "REQUEST", "METRICS", "IN-FLIGHT", "MIGRATIONS", "WORKERS UP",
         "PREFILL PATH"], rows))
    rows = [[f["id"], f["model"], f["url"], f["active_requests"], f["queued_requests"]]
            for f in snapshot["frontends"]]
    parts.append(f"FRONTENDS ({len(rows)})\n" + _table(
        ["ID", "MODEL", "URL", "ACTIVE", "QUEUED"], rows))
    if snapshot["others"]:
        rows = [[o["id"], o["role"], o["model"]] for o in snapshot["others"]]
        parts.append(f"OTHERS ({len(rows)})\n" + _table(["ID", "ROLE", "MODEL"], rows))
    return "\n\n".join(parts)


# -- command ---------------------------------------------------------------------------------

async def _registered(spec: str, lease_ttl: float) -> bool:
    """Whether anything live registers in discovery `spec` (False where it cannot be read)."""
    try:
        discovery = open_discovery(spec, lease_ttl=lease_ttl)
    except (OSError, ValueError):
        return False
    try:
        return bool(await discovery.list())
    finally:
        await discovery.close()


async def find_fleet(config: StatusConfig) -> str:
    """The discovery to show when the command line names none: the default one while anything
    registers there, else the one `turnout up` deployment running on this machine (each has a
    temporary discovery of its own). ValueError when several run: which one is for the user
    to say."""
    if await _registered(config.discovery, config.lease_ttl_s):
        return config.discovery
    running = [f"file:{d}" for d in up_discovery_dirs()]
    running = [spec for spec in running if await _registered(spec, config.lease_ttl_s)]
    if len(running) > 1:
        raise ValueError(f"nothing registers in {config.discovery}, and {len(running)} "
                         f"`turnout up` deployments run on this machine: name one with "
                         f"--discovery ({', '.join(running)})")
    if running:
        print(f"turnout status: nothing registers in {config.discovery}; showing the "
              f"`turnout up` deployment at {running[0]}", file=sys.stderr)
        return running[0]
    return config.discovery


async def run(config: StatusConfig, named: bool = True) -> int:
    """Print the view (or views, with --watch); the exit status. `named`: the command line
    named the discovery (else `find_fleet` picks it)."""
    try:
        if not named:
            config = dataclasses.replace(config, discovery=await find_fleet(config))
        discovery = open_discovery(config.discovery, lease_ttl=config.lease_ttl_s)
    except ValueError as exc:
        print(f"turnout status: {exc}", file=sys.stderr)
        return 2
    view = FleetView(config, discovery)
    try:
        secure_context(view.ctx, config.keys_dir)
    except KeysError as exc:
        view.close()
        print(f"turnout status: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    listener = asyncio.create_task(view.listen())
    clear = config.watch and not config.json_output and sys.stdout.isatty()
    try:
        async with httpx.AsyncClient() as http:
            await view.refresh()
            await _sleep_unless(stop, config.listen_s)
            while True:
                if config.watch:
                    await view.refresh()
                snapshot = await view.snapshot(http)
                if config.json_output:
                    text = json.dumps(snapshot, indent=None if config.watch else 2)
                else:
                    text = render(snapshot)
                if clear:
                    text = "\x1b[H\x1b[2J" + text
                print(text, flush=True)
                if not config.watch or stop.is_set():
                    if not any(snapshot[kind] for kind in ("workers", "routers",
                                                           "frontends", "others")):
                        print(f"turnout status: nothing registers in {config.discovery}; start "
                              "a deployment with `turnout up` (or `make up`), or name its "
                              "discovery with --discovery", file=sys.stderr)
                    return 0
                if await _sleep_unless(stop, 1.0):
                    return 0
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        view.close()
        await discovery.close()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`; True if `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except TimeoutError:
        return False


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    config = parse(StatusConfig, args, prog="turnout status",
                   description="The fleet as the discovery and event planes see it now.")
    sys.exit(asyncio.run(run(config, named=flag_given(args, "discovery"))))
