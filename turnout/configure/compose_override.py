"""A compose override of Turnout's `docker-compose.yml` for a layout, on one host.

`docker compose -f docker-compose.yml -f FILE up` then runs the layout's workers as one service
each (`worker-1`, `prefill-1`, `decode-1`, ...), every one reserving its own GPUs by device id
(Docker does not share out devices between replicas of one service: each would get the first
ones), the base's `worker` scaled to 0, the model served by workers and frontend, and the
planner (a dry run in the base: it logs what it would scale) given the layout's mode and
targets. Prometheus scrapes the base's service names, so it does not see these workers.

Owns the override's text; the base is read for the services' settings, never changed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from turnout.configure.k8s_overlay import planner_flags
from turnout.configure.layout import Layout
from turnout.configure.worker_flags import set_flags, worker_flags

SERVICE_PREFIX = {"aggregated": "worker", "prefill": "prefill", "decode": "decode"}
_KEPT = ("image", "environment", "volumes", "restart")  # what every Turnout service shares


def base_services(base: Path) -> dict[str, dict[str, Any]]:
    """The base compose file's services (YAML anchors and merges resolved)."""
    import yaml  # the configure extra's (so a missing extra is reported, not a traceback)

    services = yaml.safe_load(base.read_text()).get("services", {})
    if not isinstance(services, dict) or not {"worker", "frontend", "planner"} <= set(services):
        raise ValueError(f"{base} is not Turnout's docker-compose.yml (no worker, frontend "
                         "and planner services)")
    return services


def override(layout: Layout, base: Path) -> str:
    """The override file's text."""
    import yaml  # the configure extra's (so a missing extra is reported, not a traceback)

    services = base_services(base)
    worker = services["worker"]
    model = {"TURNOUT_MODEL": layout.request.model,
             "TURNOUT_SERVED_MODEL_NAME": layout.request.model}
    out: dict[str, Any] = {"worker": {"deploy": {"replicas": 0}},
                           "frontend": {"environment": model}}
    device = 0
    for pool in layout.pools:
        for i in range(pool.workers):
            ids = [str(d) for d in range(device, device + pool.gpus_per_worker)]
            device += pool.gpus_per_worker
            svc = copy.deepcopy({k: worker[k] for k in _KEPT if k in worker})
            svc["environment"] = {**worker.get("environment", {}), **model}
            svc["command"] = set_flags(list(worker["command"]), worker_flags(layout, pool))
            svc["deploy"] = {"replicas": 1, "resources": {"reservations": {"devices": [
                {"driver": "nvidia", "device_ids": ids, "capabilities": ["gpu"]}]}}}
            out[f"{SERVICE_PREFIX[pool.role]}-{i + 1}"] = svc
    out["planner"] = {"command": set_flags(list(services["planner"]["command"]),
                                           planner_flags(layout))}
    header = (f"# turnout configure: {layout.summary()}\n"
              f"# on {layout.request.gpus} x {layout.request.system} (GPUs 0-{device - 1} of this "
              f"host), {layout.request.backend}; TTFT <= {layout.request.ttft_ms:g} ms, ITL <= "
              f"{layout.request.itl_ms:g} ms\n"
              "# docker compose -f docker-compose.yml -f THIS_FILE up  (the image needs the "
              f"engine: pip install '.[{layout.request.backend}]' in the Dockerfile)\n")
    return header + yaml.safe_dump({"services": out}, sort_keys=False)
