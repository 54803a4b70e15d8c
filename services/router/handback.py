"""Rolling restart: a router stopping (SIGTERM) gives its live streams back to their frontends.

Each frontend is told which of its streams to resume elsewhere (`ResumeElsewhere`); it resends
each one, with the tokens its client already has, through another router — the same path as
when a router dies. The router forgets those requests without cancelling them, naming the
worker each runs or waits on (the frontend may not know it: a stream names its worker with its
first token), so the resume goes back there and that worker hands it over to the new router
(no recompute, no second copy); a prompt still in its prefill phase goes back to its prefill
worker, and the new router hands it off at its first token. From then on every new request is
given back the same way until the router exits.

Owns choosing what is given back and telling the frontends. Does not own the resume itself
(`services/frontend/upstream.py`) or the handover (`services/worker/router_watch.py`).
"""

from __future__ import annotations

import logging

from common.messages import KIND_RESUME_ELSEWHERE, ResumeElsewhere, encoder
from services.router.accounting import Accounting
from services.router.encode_routing import EncodeRouting
from services.router.metrics import RouterMetrics
from services.router.migration import Migration
from services.router.parking import ParkingLot
from services.router.streams import FrameSender

log = logging.getLogger("turnout.router")


class HandBack:
    def __init__(self, frontends: FrameSender, accounting: Accounting, parking: ParkingLot,
                 migration: Migration, metrics: RouterMetrics) -> None:
        self.frontends = frontends
        self.accounting = accounting
        self.parking = parking
        self.migration = migration
        self.metrics = metrics
        self.active = False  # draining: every request is given back
        self.encoding: EncodeRouting | None = None  # requests waiting for their embeddings

    def start(self) -> int:
        """Give every stream back; from now on, every new request too. Returns how many."""
        self.active = True
        # Frontend → (request id, the worker running it or "").
        by_frontend: dict[bytes, list[tuple[str, str]]] = {}
        for parked in self.parking.take_all():
            by_frontend.setdefault(parked.frontend, []).append((parked.request.request_id, ""))
        self.migration.stranded.clear()
        if self.encoding is not None:
            for request_id, pending in list(self.encoding.pending.items()):
                self.encoding.cancel(request_id)
                by_frontend.setdefault(pending.frontend, []).append((request_id, ""))
        for request_id, entry in list(self.accounting.requests.items()):
            # Where it runs or waits (a prefill worker before the hand-off), read before
            # `finish` lets go of it: that worker hands it over when its resume arrives.
            worker = entry.worker.id if entry.worker is not None else ""
            entry.disagg = None  # it goes on elsewhere: a prefill worker's hold on its KV stays
            self.accounting.finish(request_id)
            by_frontend.setdefault(entry.frontend, []).append((request_id, worker))
        for frontend, streams in by_frontend.items():
            ids, workers = (list(column) for column in zip(*streams, strict=True))
            self.give_back(frontend, ids, workers=workers)
        n = sum(len(streams) for streams in by_frontend.values())
        self.metrics.inflight.set(0)
        log.info("draining: streams given back to their frontends",
                 extra={"fields": {"streams": n, "frontends": len(by_frontend)}})
        return n

    def give_back(self, frontend: bytes, request_ids: list[str], draining: bool = True,
                  workers: list[str] | None = None) -> None:
        """`workers`: where each of a drain's streams runs ("": nowhere yet)."""
        if draining:
            self.metrics.handed_back.inc(len(request_ids))
        self.frontends.send_multipart([frontend, KIND_RESUME_ELSEWHERE, encoder.encode(
            ResumeElsewhere(request_ids, draining, workers or []))])
