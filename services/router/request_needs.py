"""What a request asks of a worker beyond serving its model: scheduling by priority (a request
with a `priority`) and applying structured outputs (a request with an output constraint). Each
is a fact of the worker's discovery record (`WorkerHandle`).

Owns the rule a placement follows: a new request goes only to workers that can honour all it
asks (a 400 naming what no live worker of its model can), and a stream already under way goes
to such a worker while one is left, else anywhere rather than fail. Does not own choosing among
them (the policies) or the modes (selection, disaggregation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from common.messages import GenerateRequest
from services.router.policies import RoutingError
from services.router.worker_pool import WorkerHandle

# (whether a worker has it, what a request that needs it is told when no worker has it)
Need = tuple[Callable[[WorkerHandle], bool], str]

_PRIORITY: Final[Need] = (
    lambda w: w.schedules_by_priority,
    "'priority' needs a worker scheduling by priority (start workers with "
    "--scheduling-policy priority)")
_STRUCTURED: Final[Need] = (
    lambda w: w.applies_structured_outputs,
    "structured outputs (response_format, structured_outputs, a tool_choice of 'required' or "
    "a named function) need a worker whose engine applies them (--engine vllm)")


def needs(request: GenerateRequest) -> list[Need]:
    out = []
    if request.priority:
        out.append(_PRIORITY)
    if request.sampling.structured is not None:
        out.append(_STRUCTURED)
    return out


def honouring(workers: list[WorkerHandle], request: GenerateRequest) -> list[WorkerHandle]:
    """Those of `workers` that honour all `request` asks (perhaps none)."""
    asked = needs(request)
    if not asked:
        return workers
    return [w for w in workers if all(has(w) for has, _ in asked)]


def able_workers(workers: list[WorkerHandle], request: GenerateRequest) -> list[WorkerHandle]:
    """Those of `workers` that honour all `request` asks; a 400 saying what is missing when
    there are workers and none does."""
    for has, missing in needs(request):
        chosen = [w for w in workers if has(w)]
        if workers and not chosen:
            raise RoutingError(f"{missing}, and no live worker of model {request.model!r} "
                               f"does", 400)
        workers = chosen
    return workers


def prefer_able(workers: list[WorkerHandle], request: GenerateRequest) -> list[WorkerHandle]:
    """Those of `workers` that honour all `request` asks, or all of them when none does: where
    a stream already under way goes next (it is never refused midway)."""
    return honouring(workers, request) or workers
