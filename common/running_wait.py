"""Waiting a bounded time that this process ran, not wall time.

A process that was stopped (SIGSTOP, a paused VM or container, a starved host) wakes with
every timer it set already past due, although the peer it waited on most likely did not run
either and answers a moment later. A wait that gives up on wall time then gives up for
nothing: a KV pull recomputes a prompt whose blocks were on their way. `wait_running` counts
only the time the event loop could have run: it waits in short slices, and a slice that
overran (the loop was not running) counts as twice its length at most.
"""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

T = TypeVar("T")

SLICE_S = 0.05


async def wait_running(future: asyncio.Future[T], seconds: float) -> T:
    """`future`'s result, or TimeoutError once `seconds` of running time passed without it.
    The future is left alone on timeout (the caller owns it)."""
    left = seconds
    while not future.done():
        if left <= 0:
            raise TimeoutError
        step = min(left, SLICE_S)
        t0 = time.monotonic()
        await asyncio.wait((future,), timeout=step)
        # Beyond twice its length a slice was a pause (or starvation), not time run.
        left -= min(time.monotonic() - t0, 2 * step)
    return future.result()
