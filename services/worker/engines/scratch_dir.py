"""An engine's scratch directory in the system's temporary directory (its IPC sockets), and
clearing those whose worker died without removing its own (SIGKILL, the OOM killer).

A live directory's `.owner` file is held under an exclusive `flock` by its owner (and by a
child it forks, such as vLLM's engine core, until that ends too). The kernel drops the lock
however the processes end, so a directory whose lock can be taken belongs to nobody. A lock,
not a pid file: pids are reused, and differ between containers sharing a temporary directory.
Directories without `.owner` (made by an older Turnout) are left alone: nothing says whether
one is in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

OWNER = ".owner"

log = logging.getLogger("turnout.worker.scratch")


class ScratchDir:
    """A new directory named `<prefix>…` in the temporary directory, owned until `remove`."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        # Locked before it takes its name, so a sweeper never finds `.owner` unlocked.
        pending = self.path / f"{OWNER}.new"
        self._fd: int | None = os.open(pending, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(pending, self.path / OWNER)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def sweep_orphans(prefix: str, root: Path | None = None) -> int:
    """Delete the `<prefix>…` directories in `root` (the temporary directory) whose owner is
    gone; returns how many."""
    swept = 0
    for directory in Path(root or tempfile.gettempdir()).glob(f"{prefix}*"):
        if directory.is_symlink() or not directory.is_dir():
            continue
        try:
            fd = os.open(directory / OWNER, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # no owner file (an older Turnout's, or not made by one), or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner lives
        try:
            shutil.rmtree(directory, ignore_errors=True)
            swept += 1
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    if swept:
        log.info("removed scratch directories of workers that died",
                 extra={"fields": {"count": swept, "prefix": prefix}})
    return swept
