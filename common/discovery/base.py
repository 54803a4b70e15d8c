"""The discovery plane's interface: what every backend (file, static, ...) promises its callers.

Owns `Discovery` (register / update / unregister / list / watch / close) and `DiscoveryEvent`.
Does not own the record format (`common.messages.Instance`) or any storage; see `file`, `static`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from common.messages import Instance

EventKind = Literal["added", "removed", "updated"]


@dataclass(frozen=True, slots=True)
class DiscoveryEvent:
    """A change in the set of live instances; `removed` carries the last record seen."""

    kind: EventKind
    instance: Instance


class Discovery(abc.ABC):
    """A registry of live instances with leases.

    A process registers itself and the backend keeps its lease alive in the background until
    `unregister` or `close`. `close` does not unregister: a record left behind by a process that
    stopped without unregistering (crash, SIGKILL) disappears when its lease runs out, which is
    exactly how everyone else learns about the crash.
    """

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

    @abc.abstractmethod
    def watch(self, role: str | None = None) -> AsyncIterator[DiscoveryEvent]:
        """First `added` for every live instance matching `role`, then each change as it happens.

        Any number of watchers may run at once; every one ends when `close` is called. Leaving an
        `async for` early is fine (the generator's cleanup unsubscribes it).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop lease renewal and end every watcher. Does not unregister anything."""

    async def __aenter__(self) -> Discovery:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def matches(instance: Instance, role: str | None, model: str | None = None) -> bool:
    return (role is None or instance.role == role) and (model is None or instance.model == model)
