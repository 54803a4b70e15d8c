"""File discovery: a directory of JSON records, one `<id>.json` per instance, leased by mtime.

Owns the on-disk layout, atomic writes (temp file in the same directory + `os.replace`, so a
reader never sees half a record), lease renewal (the owner re-touches its files every
`lease_ttl / 3`), expiry, garbage collection of records and temp files older than
`3 * lease_ttl` (by any reader), and polling for watchers. A record is live while its mtime is
within `lease_ttl` of the reader's wall clock, or while this reader saw it renewed (its mtime
change) within `lease_ttl` by its own monotonic clock: a wall clock that jumps (a VM paused or
restored from a snapshot) does not make the records a reader watches lapse, nor get them
collected. A reader whose polls stopped for a while (its process or machine did not run, and
its owners likely did not either) keeps what was live for one more lease of renewals rather
than judging leases nobody could renew. Works for any number of processes sharing the
directory (local disk, or a shared volume whose clients' clocks agree to well within
`lease_ttl`: a record first seen with an mtime three leases old is collected). Does not own
the record type (`common.messages.Instance`).

Whoever can write the directory can register a worker, so it must be writable by its owner only:
a directory or record writable by group or others is refused at start (a clear error), records
are written 0644, and a record that turns group- or other-writable later is skipped (warned once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from common.config import StartupRefused
from common.discovery.base import Discovery, matches
from common.messages import Instance

log = logging.getLogger(__name__)

_SUFFIX = ".json"
_TMP_SUFFIX = ".tmp"
_GC_LEASES = 3  # a record this many leases old is garbage, not just expired

_decoder = msgspec.json.Decoder(Instance)
_encoder = msgspec.json.Encoder()


def check_instance_id(instance_id: str) -> None:
    """Refuse ids that are not a plain file name (they become `<id>.json`)."""
    if (not instance_id or "/" in instance_id or "\0" in instance_id or ".." in instance_id
            or instance_id.startswith(".")):
        raise ValueError(f"instance id {instance_id!r} is not a safe file name: it must be "
                         "non-empty, not start with '.', and contain no '/', '\\0' or '..'")


_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def check_not_writable_by_others(directory: Path) -> None:
    """Refuse a discovery directory, or a record in it, that group or others can write: anyone
    who can write it can register as a worker and receive prompts."""
    for path in [directory, *directory.glob("*" + _SUFFIX)]:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue  # a record removed while we looked
        if mode & _WRITABLE_BY_OTHERS:
            what = "directory" if path == directory else "record"
            raise StartupRefused(f"discovery {what} {path} is writable by group or others "
                             f"(mode {stat.S_IMODE(mode):o}): anyone could register a worker "
                             f"there; chmod go-w it")


@dataclass(slots=True)
class _CachedFile:
    # (inode, mtime_ns, size): a rename gives a new inode, a touch a new mtime.
    key: tuple[int, int, int]
    mtime: float
    instance: Instance | None  # None: malformed
    # When this reader saw the file change (monotonic; None: it has not yet, only its first
    # sight): a renewal seen is a lease kept, whatever the wall clock says of the mtime.
    renewed_at: float | None = None

    def renewed_since(self, moment: float) -> bool:
        return self.renewed_at is not None and self.renewed_at >= moment


class FileDiscovery(Discovery):
    def __init__(self, directory: str | os.PathLike[str], lease_ttl: float = 10.0,
                 poll_interval: float = 0.2,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if lease_ttl <= 0 or poll_interval <= 0:
            raise ValueError("lease_ttl and poll_interval must be positive")
        super().__init__()
        self.directory = Path(os.path.abspath(directory))
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        check_not_writable_by_others(self.directory)
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.wall_clock = wall_clock  # what mtimes are judged against
        self._owned: dict[str, Instance] = {}  # registered by this object: leases to keep
        self._files: dict[str, _CachedFile] = {}  # file name → last read
        self._warned: set[str] = set()  # malformed files already logged
        self._live: dict[str, Instance] = {}  # as of the last scan; what watchers have seen
        self._lease_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._scan_error = ""
        self._last_scan: float | None = None  # monotonic

    def __repr__(self) -> str:
        return f"FileDiscovery({str(self.directory)!r}, lease_ttl={self.lease_ttl})"

    # -- writer side ---------------------------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        self._check_open()
        check_instance_id(instance.id)
        self._write(instance)
        self._owned[instance.id] = instance
        if self._lease_task is None or self._lease_task.done():
            self._lease_task = asyncio.create_task(self._keep_leases(),
                                                   name=f"discovery-lease:{self.directory}")
        self._refresh_quietly()

    async def update(self, instance: Instance) -> None:
        self._check_open()
        if instance.id not in self._owned:
            raise KeyError(f"instance {instance.id!r} is not registered through {self!r}")
        self._write(instance)
        self._owned[instance.id] = instance
        self._refresh_quietly()

    async def unregister(self, instance_id: str) -> None:
        check_instance_id(instance_id)
        self._owned.pop(instance_id, None)
        self._path(instance_id).unlink(missing_ok=True)
        self._refresh_quietly()

    def _path(self, instance_id: str) -> Path:
        return self.directory / (instance_id + _SUFFIX)

    def _write(self, instance: Instance) -> None:
        # The temp name starts with '.', which no record name may, so scans skip it.
        tmp = self.directory / f".{instance.id}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(_encoder.encode(instance))
            os.replace(tmp, self._path(instance.id))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            for instance in list(self._owned.values()):
                try:
                    os.utime(self._path(instance.id))
                except FileNotFoundError:
                    # Collected by a reader while this process stalled; put it back.
                    log.warning("discovery record %s vanished; rewriting it", instance.id)
                    self._rewrite(instance)
                except OSError as err:
                    log.warning("cannot renew the lease of %s: %s", instance.id, err)

    def _rewrite(self, instance: Instance) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # in case it was wiped as a whole
            self._write(instance)
        except OSError as err:
            log.warning("cannot rewrite discovery record %s: %s", instance.id, err)

    # -- reader side ---------------------------------------------------------------------------

    async def list(self, role: str | None = None, model: str | None = None) -> list[Instance]:
        self._refresh()
        return [i for _, i in sorted(self._live.items()) if matches(i, role, model)]

    def _snapshot(self) -> Iterable[Instance]:
        return self._live.values()

    async def _start_watching(self) -> None:
        self._refresh_quietly()
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = asyncio.create_task(self._poll(),
                                                  name=f"discovery-poll:{self.directory}")

    async def _poll(self) -> None:
        # Runs while anyone watches; the next watcher starts it again. The watcher that started
        # it subscribes right after this task is created, before it first runs.
        while self._watched():
            await asyncio.sleep(self.poll_interval)
            self._refresh_quietly()

    def _refresh_quietly(self) -> None:
        try:
            self._refresh()
        except OSError as err:
            if str(err) != self._scan_error:
                log.warning("cannot scan discovery directory %s: %s", self.directory, err)
                self._scan_error = str(err)

    def _refresh(self) -> None:
        """Scan the directory and tell watchers what changed since the last scan."""
        live = self._scan()
        self._scan_error = ""
        old = self._live
        self._live = live
        for instance_id in old.keys() - live.keys():
            self._publish(old[instance_id], None)
        for instance_id, instance in live.items():
            if old.get(instance_id) is not instance:  # an unchanged file keeps its object
                self._publish(old.get(instance_id), instance)

    def _scan(self) -> dict[str, Instance]:
        now = self.wall_clock()
        expire_before = now - self.lease_ttl
        collect_before = now - _GC_LEASES * self.lease_ttl
        seen = time.monotonic()
        # The same two bounds by this reader's own clock, for records it saw renewed.
        live_if_renewed = seen - self.lease_ttl
        kept_if_renewed = seen - _GC_LEASES * self.lease_ttl
        polling = self._poll_task is not None and not self._poll_task.done()
        if polling and self._last_scan is not None and seen - self._last_scan > self.lease_ttl / 2:
            # Polls every `poll_interval` stopped this long: this process (or its machine) did
            # not run, so neither may the owners; what was live gets a lease to be renewed.
            for cached in self._files.values():
                if cached.instance is not None and self._live.get(cached.instance.id) \
                        is cached.instance:
                    cached.renewed_at = seen
        self._last_scan = seen
        live: dict[str, Instance] = {}
        present: set[str] = set()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                is_record = name.endswith(_SUFFIX) and not name.startswith(".")
                is_tmp = name.startswith(".") and name.endswith(_TMP_SUFFIX)
                if not (is_record or is_tmp):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                cached = self._files.get(name)
                if st.st_mtime < collect_before and not (
                        cached is not None and cached.renewed_since(kept_if_renewed)):
                    self._collect(entry.path, collect_before)
                    continue
                if is_tmp:
                    continue
                if st.st_mode & _WRITABLE_BY_OTHERS:
                    if name not in self._warned:
                        self._warned.add(name)
                        log.warning("skipping discovery record %s: writable by group or others "
                                    "(mode %o)", entry.path, stat.S_IMODE(st.st_mode))
                    present.add(name)
                    continue
                present.add(name)
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                if cached is None or cached.key != key:
                    cached = _CachedFile(key, st.st_mtime, self._read(entry.path, name),
                                         None if cached is None else seen)
                    self._files[name] = cached
                if cached.instance is not None and (
                        cached.mtime >= expire_before
                        or cached.renewed_since(live_if_renewed)):
                    live[cached.instance.id] = cached.instance
        for name in self._files.keys() - present:
            del self._files[name]
        self._warned &= present
        return live

    def _read(self, path: str, name: str) -> Instance | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
            instance = _decoder.decode(data)
            if instance.id + _SUFFIX != name:
                raise ValueError(f"its id {instance.id!r} does not match the file name")
        except FileNotFoundError:
            return None  # removed between scandir and open; the next scan drops it
        except (OSError, ValueError) as err:  # msgspec.DecodeError is a ValueError
            if name not in self._warned:
                self._warned.add(name)
                log.warning("skipping malformed discovery record %s: %s", path, err)
            return None
        self._warned.discard(name)
        return instance

    def _collect(self, path: str, collect_before: float) -> None:
        # Look again right before unlinking: the owner may just have renewed or rewritten it.
        with contextlib.suppress(OSError):
            if os.stat(path).st_mtime < collect_before:
                os.unlink(path)
                log.debug("collected expired discovery file %s", path)

    # -- lifecycle -----------------------------------------------------------------------------

    async def _stop_watching(self) -> None:
        tasks = [t for t in (self._lease_task, self._poll_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._lease_task = self._poll_task = None
