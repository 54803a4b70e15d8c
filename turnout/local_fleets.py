"""Where `turnout up` deployments on this machine register, so `turnout status` finds them.

`turnout up` gives each deployment a discovery directory of its own (two on one machine must not
mix their workers), a temporary one unless `--discovery` (or `TURNOUT_DISCOVERY`) names one.
Owns that directory's naming, finding those of the deployments running here, and telling whether
a command line named a discovery itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

UP_DISCOVERY_PREFIX = "turnout-up-"


def new_up_discovery() -> str:
    """A fresh discovery directory for one `turnout up` deployment (it deletes it on exit)."""
    return tempfile.mkdtemp(prefix=UP_DISCOVERY_PREFIX)


def up_discovery_dirs() -> list[Path]:
    """The discovery directories of `turnout up` deployments here: running ones, and any left
    by one that was killed (whose records have expired)."""
    return sorted(p for p in Path(tempfile.gettempdir()).glob(UP_DISCOVERY_PREFIX + "*")
                  if p.is_dir())


def names_discovery(argv: Sequence[str]) -> bool:
    """Whether a command line (or its environment) names a discovery backend itself."""
    return any(a == "--discovery" or a.startswith("--discovery=") for a in argv) \
        or "TURNOUT_DISCOVERY" in os.environ
