"""The discovery plane's interface: what every backend (file, static, ...) promises its callers.

Owns `Discovery` (register / update / unregister / list / watch / close) and its one `watch()`:
a backend keeps its live set current and reports each change through `_publish`; the base hands
every watcher the live set first, then the changes (`fanout`). Does not own the record format
(`common.messages.Instance`) or any storage; see `file`, `static`, `kubernetes`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Iterable
from types import TracebackType

from common.discovery.fanout import DiscoveryEvent, EventKind, Fanout, matches
from common.messages import Instance

__all__ = ["Discovery", "DiscoveryEvent", "EventKind", "matches"]


class Discovery(abc.ABC):
    """A registry of live instances with leases.

    A process registers itself and the backend keeps its lease alive in the background until
    `unregister` or `close`. `close` does not unregister: a record left behind by a process that
    stopped without unregistering (crash, SIGKILL) disappears when its lease runs out, which is
    exactly how everyone else learns about the crash.

    A backend implements the abstract methods, calls `_publish(old, new)` for every change of
    its live set, and may override `_start_watching` (bring the live set up to date and keep it
    so while anyone watches) and `_stop_watching` (end that background work at `close`).
    """

    def __init__(self) -> None:
        self._fanout = Fanout()
        self._closed = False

    @abc.abstractmethod
    async def register(self, instance: Instance) -> None:
        """Publish `instance` and keep its lease alive until `unregister` or `close`."""

    @abc.abstractmethod
    async def update(self, instance: Instance) -> None:
        """Replace the content of a record registered here (same id); KeyError if there is none."""

    @abc.abstractmethod
    async def unregister(self, instance_id: str) -> None:
        """Remove a record now (clean shutdown, drain); a missing record is not an error."""

    @abc.abstractmethod
    async def list(self, role: str | None = None, model: str | None = None) -> list[Instance]:
        """Live instances matching `role` and `model` (None matches any), sorted by id."""

    async def watch(self, role: str | None = None) -> AsyncGenerator[DiscoveryEvent, None]:
        """First `added` for every live instance matching `role`, then each change as it happens.

        Any number of watchers may run at once; every one ends when `close` is called. Leaving an
        `async for` early is fine (the generator's cleanup unsubscribes it).
        """
        if self._closed:
            return
        await self._start_watching()
        if self._closed:
            return
        # No await between the snapshot and subscribing: the changes that follow line up.
        queue = self._fanout.subscribe(role, self._snapshot())
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._fanout.unsubscribe(queue)

    async def close(self) -> None:
        """Stop lease renewal and end every watcher. Does not unregister anything."""
        self._closed = True
        await self._stop_watching()
        self._fanout.close()

    # -- what a backend provides ---------------------------------------------------------------

    @abc.abstractmethod
    def _snapshot(self) -> Iterable[Instance]:
        """The live set as of the last `_publish`: what a new watcher starts from."""

    async def _start_watching(self) -> None:
        """Called before each new watcher subscribes: bring the live set up to date and make sure
        changes keep being published while anyone watches (a poll or a server watch). The static
        backend needs nothing: it publishes each change as it makes it."""
        return None

    async def _stop_watching(self) -> None:
        """Called by `close`: end the background work (lease renewal, polling, server watch)."""
        return None

    # -- for backends --------------------------------------------------------------------------

    def _publish(self, old: Instance | None, new: Instance | None) -> None:
        """One record of the live set changed from `old` to `new` (None: absent or not live)."""
        self._fanout.publish(old, new)

    def _watched(self) -> bool:
        """Anyone is watching (a backend's poll can stop when nobody is)."""
        return len(self._fanout) > 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    async def __aenter__(self) -> Discovery:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
