"""The encode pool's size: encode workers (`--worker-mode encode`) added or removed from what the
routers saw of the encode stage in the last interval.

Observed (`load_observer`, from every router's /metrics): images per second sent to the encode
pool (`turnout_router_images_total{path="encode_pool"}`), images per second encoded in-line by
LLM workers because no encode worker served the model (`{path="inline"}`), and the encode
stage's mean latency per request, from its arrival to its last embedding
(`turnout_router_encode_seconds`).

The rule, once per adjustment interval:
- add one when the stage's mean latency is over `--encode-latency-slo-ms`, or when the pool is
  empty and LLM workers encoded images in-line (the pool scales up from zero on demand);
- remove one when the images in the stage at once (Little's law: image rate x stage latency,
  an over-estimate, as the latency includes queueing) shared by one worker fewer would keep
  each under `margin` (`--reactive-scale-down-margin`) of one image at a time, the latency is
  under `margin` of the SLO, and no scaling action happened for `--scale-down-cooldown-s`; an
  idle pool goes down to `--encode-min-replicas`.
Always within [`--encode-min-replicas`, `--encode-max-replicas`]. A request never fails for want
of an encode worker (its LLM worker encodes in-line), so scaling to zero is safe.

Owns the rule and its cooldown. Does not own observing (`load_observer`) or acting
(`connectors`); encode workers do not count against `--max-gpus`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EncodeStage:
    """The encode stage over one interval, summed over the routers."""

    pool_images_per_s: float  # images sent to encode workers
    inline_images_per_s: float  # images LLM workers encoded for want of an encode worker
    latency_ms: float | None  # mean arrival → last embedding; None: no request went through


class EncodePoolPlanner:
    def __init__(self, slo_ms: float, min_replicas: int, max_replicas: int, margin: float,
                 cooldown_s: float, clock: Callable[[], float]) -> None:
        if not 0 <= min_replicas <= max_replicas:
            raise ValueError(f"encode replicas: need 0 <= min ({min_replicas}) <= max "
                             f"({max_replicas})")
        if slo_ms <= 0:
            raise ValueError(f"--encode-latency-slo-ms must be positive, got {slo_ms}")
        self.slo_ms = slo_ms
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.margin = margin
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._last_change = clock()

    def target(self, stage: EncodeStage | None, current: int) -> int:
        """The pool size to apply now (`current` when nothing should change)."""
        raw = current + self._step(stage, current)
        target = min(self.max_replicas, max(self.min_replicas, raw))
        if target < current and self.clock() - self._last_change < self.cooldown_s:
            target = current
        if target != current:
            self._last_change = self.clock()
        return target

    def note_change(self) -> None:
        """The pool was resized by someone else: restart the cooldown."""
        self._last_change = self.clock()

    def _step(self, stage: EncodeStage | None, current: int) -> int:
        if stage is None:  # no router answered: hold
            return 0
        if current == 0:
            return 1 if stage.inline_images_per_s > 0 else 0
        latency = stage.latency_ms
        if latency is not None and latency > self.slo_ms:
            return 1
        if stage.pool_images_per_s <= 0 and stage.inline_images_per_s <= 0:
            return -1  # idle: down towards the floor, a cooldown at a time
        if current >= 2 and latency is not None and latency < self.margin * self.slo_ms:
            in_stage = stage.pool_images_per_s * latency / 1000.0
            if in_stage / (current - 1) < self.margin:
                return -1
        return 0
