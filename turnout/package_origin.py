"""Start-up check that the top-level packages `common` and `services` are Turnout's own.

Turnout's code lives in packages named `common` and `services` (the repository layout). The names
are generic: another distribution may ship a package of the same name, which either shadows
Turnout's (it comes first on `sys.path`) or shares its directory in site-packages (pip lets the
later install overwrite the earlier one's files). Either way imports would fail later with a
confusing error, or run foreign code; this check fails at start-up with one line instead. It
goes away once the code is imported as `turnout.common` / `turnout.services`
(docs/architecture.md, "Package names").
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

PACKAGES = ("common", "services")
ROOT = Path(__file__).resolve().parent.parent  # where Turnout's packages sit side by side


def foreign_packages(root: Path = ROOT) -> list[str]:
    """What is wrong with `common` / `services` as imported from here (empty: nothing)."""
    problems: list[str] = []
    checkout = (root / "pyproject.toml").is_file()
    owners = {} if checkout else importlib.metadata.packages_distributions()
    for name in PACKAGES:
        expected = root / name
        spec = importlib.util.find_spec(name)
        found = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] \
            if spec is not None else []
        if not found or found[0] != expected:
            where = found[0] if found else (spec.origin if spec is not None else "nothing")
            problems.append(f"package '{name}' resolves to {where}, not Turnout's {expected}")
            continue
        # Installed (not a checkout): a second owner of the directory may have overwritten files.
        others = sorted(set(owners.get(name, [])) - {"turnout"})
        if others:
            problems.append(f"package '{name}' is also installed by {', '.join(others)}, which "
                            f"may have overwritten Turnout's files")
    return problems


def check_packages() -> None:
    """Exit with status 2 and one line when `common` or `services` is not Turnout's."""
    problems = foreign_packages()
    if problems:
        print(f"turnout: {'; '.join(problems)}; install Turnout in a virtual environment of "
              f"its own", file=sys.stderr)
        sys.exit(2)
