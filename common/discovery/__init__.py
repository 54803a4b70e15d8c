"""The discovery plane: who is up, what they serve and where to reach them.

Owns picking a backend from a spec string (`open_discovery`) and re-exports the interface.
Backends: `file` (a shared directory of leased JSON records; the default for `turnout up`),
`static` (a fixed list from a file) and `kubernetes` (pods by label, through the API server; its
client is imported only when that backend is used). Does not own the record type
(`common.messages.Instance`).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from common.discovery.base import Discovery, DiscoveryEvent, EventKind
from common.discovery.file import FileDiscovery, check_instance_id
from common.discovery.static import StaticDiscovery, load_instances

__all__ = [
    "Discovery",
    "DiscoveryEvent",
    "EventKind",
    "FileDiscovery",
    "StaticDiscovery",
    "check_instance_id",
    "load_instances",
    "open_discovery",
]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)
_SPEC_FORMS = ("'file:///abs/dir', 'file:DIR', a bare directory path, "
               "'static:/path/instances.json' or 'kubernetes[:NAMESPACE][?selector=...]'")


def open_discovery(spec: str, lease_ttl: float = 10.0) -> Discovery:
    """The backend `spec` names; ValueError if it names none.

    "file:///abs/dir", "file:dir" (relative or absolute) or a bare directory path → FileDiscovery;
    "static:/path/instances.json" (or .yaml) → StaticDiscovery; "kubernetes",
    "kubernetes:NAMESPACE" or either with "?selector=LABEL_SELECTOR" → KubernetesDiscovery.
    `lease_ttl` applies to file.
    """
    if not spec or not spec.strip():
        raise ValueError(f"empty discovery spec; expected {_SPEC_FORMS}")
    if re.match(r"kubernetes(?:[:?]|$)", spec, re.IGNORECASE):
        from common.discovery.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery.from_spec(spec)
    m = _SCHEME.fullmatch(spec)
    if m is None:
        return FileDiscovery(spec, lease_ttl=lease_ttl)
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        return FileDiscovery(_path_of(spec, rest), lease_ttl=lease_ttl)
    if scheme == "static":
        return StaticDiscovery(_path_of(spec, rest))
    raise ValueError(f"unknown discovery backend {scheme!r} in {spec!r}; expected {_SPEC_FORMS}")


def _path_of(spec: str, rest: str) -> str:
    """The path of `scheme:path` or `scheme:///abs/path` (`//localhost/abs/path` too)."""
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if not slash or host not in ("", "localhost"):
            raise ValueError(f"discovery spec {spec!r}: a URL form needs an absolute local path, "
                             "e.g. 'file:///abs/dir'")
        return unquote("/" + path)
    if not rest:
        raise ValueError(f"discovery spec {spec!r} names no path; expected {_SPEC_FORMS}")
    return rest
