"""What a discovery watcher receives, and copying each change of a backend's live set to every
open watcher, filtered by role.

Owns `DiscoveryEvent`, the watchers' queues and the role filter (a record whose role changes
leaves one watcher's view as `removed` and enters another's as `added`). Does not own how a
backend learns of changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from common.messages import Instance

EventKind = Literal["added", "removed", "updated"]


@dataclass(frozen=True, slots=True)
class DiscoveryEvent:
    """A change in the set of live instances; `removed` carries the last record seen."""

    kind: EventKind
    instance: Instance


def matches(instance: Instance, role: str | None, model: str | None = None) -> bool:
    return (role is None or instance.role == role) and (model is None or instance.model == model)


# None on a queue ends its watcher.
WatchQueue = asyncio.Queue[DiscoveryEvent | None]


class Fanout:
    def __init__(self) -> None:
        self._watchers: dict[WatchQueue, str | None] = {}

    def __len__(self) -> int:
        return len(self._watchers)

    def subscribe(self, role: str | None, live: Iterable[Instance]) -> WatchQueue:
        """A new watcher's queue, primed with `added` for each of `live` that matches `role`.

        The caller passes the live set as of the last `publish`, with no await in between, so
        the snapshot and the changes that follow it line up exactly.
        """
        queue: WatchQueue = asyncio.Queue()
        for instance in sorted(live, key=lambda i: i.id):
            if matches(instance, role):
                queue.put_nowait(DiscoveryEvent("added", instance))
        self._watchers[queue] = role
        return queue

    def unsubscribe(self, queue: WatchQueue) -> None:
        self._watchers.pop(queue, None)

    def publish(self, old: Instance | None, new: Instance | None) -> None:
        """One record changed from `old` to `new` (None: absent or not live)."""
        for queue, role in self._watchers.items():
            was = old if old is not None and matches(old, role) else None
            now = new if new is not None and matches(new, role) else None
            if was is not None and now is not None:
                if was != now:
                    queue.put_nowait(DiscoveryEvent("updated", now))
            elif now is not None:
                queue.put_nowait(DiscoveryEvent("added", now))
            elif was is not None:
                queue.put_nowait(DiscoveryEvent("removed", was))

    def close(self) -> None:
        for queue in self._watchers:
            queue.put_nowait(None)  # ends that watcher
        self._watchers.clear()

