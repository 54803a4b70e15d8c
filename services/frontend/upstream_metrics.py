"""The frontend's request-plane series (`turnout_frontend_router*`, `..._streams_resumed`): routers
lost and how fast, streams resumed through another router. In the frontend's registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class UpstreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.routers = Gauge("turnout_frontend_routers",
                             "Routers this frontend sends requests to (connected, not hung or "
                             "draining)", registry=r)
        self.routers_lost = Counter(
            "turnout_frontend_routers_lost",
            "Routers whose streams were resumed elsewhere, by why (dropped, hung, draining)",
            ["why"], registry=r)
        self.detection = Histogram(
            "turnout_frontend_router_hang_detection_seconds",
            "Silence of a router at the verdict that it hung", registry=r,
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0))
        self.resumed = Counter("turnout_frontend_streams_resumed",
                               "Streams of a lost router resumed through another router, or "
                               "through the same one once its connection is back", registry=r)
        self.resume_gap = Histogram(
            "turnout_frontend_stream_resume_gap_seconds",
            "A resumed stream's pause: from the lost router's last frame to the stream's next "
            "token through the new router", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0))
        self.malformed = Counter("turnout_frontend_malformed_frames",
                                 "Frames from routers dropped as malformed", registry=r)
        self.resume_failed = Counter(
            "turnout_frontend_streams_resume_failed",
            "Streams of a lost router that found no other router within "
            "--router-resume-wait-ms (the client got a 503)",
            registry=r)
