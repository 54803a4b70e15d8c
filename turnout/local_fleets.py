"""Where `turnout up` deployments on this machine register, so `turnout status` finds them.

`turnout up` gives each deployment a discovery directory of its own (two on one machine must not
mix their workers), a temporary one unless `--discovery` (or `TURNOUT_DISCOVERY`) names one.
Owns that directory's naming and finding those of the deployments running here.
"""

from __future__ import annotations

import tempfile
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
