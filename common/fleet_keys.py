"""The fleet's CURVE keys on disk: the layout, generating it, loading it, and its Secret manifest.

A keys directory holds one fleet key pair, `fleet.key` (public) and `fleet.key_secret`, in
ZeroMQ's certificate format (readable by `zmq.auth.load_certificate` and other ZeroMQ tools).
Every Turnout process of the fleet holds the pair: its server sockets prove the fleet secret, its
client sockets present the fleet public key. The allow-list is every `*.key` file in the
directory (so `fleet.key` itself, plus the public keys of anything else admitted, e.g. a new
fleet key during a rotation). The layout is flat so one Kubernetes Secret mounted as a volume
reproduces it exactly.

Owns the files and their permissions (the secret is written 0600 and refused when others can
read it; the directory is refused when others can write it). Does not own sockets or the ZAP
handler (`common.transport`, `common.curve_auth`).
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from common.config import StartupRefused

FLEET = "fleet"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


class KeysError(StartupRefused):
    """A keys directory that is missing, malformed or unsafe (a start-up error)."""


@dataclass(frozen=True, slots=True)
class FleetKeys:
    """This process's CURVE identity (Z85 bytes) and the public keys it admits."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]

    @property
    def public_text(self) -> str:
        """The public key as it goes into a discovery record."""
        return self.public.decode("ascii")

    def admits(self, public: bytes) -> bool:
        return public in self.allowed


def generate(directory: str | os.PathLike[str], force: bool = False) -> Path:
    """Write a fresh fleet key pair into `directory` (made 0700 if absent); refuses to replace
    an existing pair unless `force`. Returns the secret file's path."""
    if not zmq.has("curve"):
        raise KeysError("this libzmq was built without CURVE support")
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = path / (FLEET + SECRET_SUFFIX)
    public = path / (FLEET + PUBLIC_SUFFIX)
    if not force and (secret.exists() or public.exists()):
        raise KeysError(f"{path} already holds a fleet key pair (--force replaces it)")
    for old in (secret, public):
        old.unlink(missing_ok=True)
    old_umask = os.umask(0o077)  # the secret is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(path, FLEET)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return secret


def holds_nothing(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` exists and holds no file at all: what an optional Kubernetes Secret
    volume mounts when the Secret is absent (its own entries are dot-names: `..data`). Such a
    directory means no keys; one that holds anything is loaded, and must then be complete."""
    path = Path(directory)
    return path.is_dir() and not any(not e.name.startswith(".") for e in path.iterdir())


def load(directory: str | os.PathLike[str]) -> FleetKeys:
    """The fleet keys in `directory`; `KeysError` saying what is wrong otherwise."""
    path = Path(directory)
    if not path.is_dir():
        raise KeysError(f"keys directory {path} does not exist (make one with "
                        "`turnout keys generate DIR`)")
    _refuse_writable_by_others(path, "keys directory")
    secret_file = path / (FLEET + SECRET_SUFFIX)
    if not secret_file.is_file():
        raise KeysError(f"{secret_file} is missing (make one with `turnout keys generate DIR`)")
    mode = secret_file.stat().st_mode  # follows a Kubernetes Secret volume's symlinks
    if mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP:
        raise KeysError(f"{secret_file} is readable or writable by others "
                        f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
    public, secret = _load_certificate(secret_file)
    if secret is None:
        raise KeysError(f"{secret_file} holds no secret key")
    allowed = {public}
    for entry in sorted(path.iterdir()):
        if entry.name.endswith(PUBLIC_SUFFIX) and not entry.name.startswith("."):
            _refuse_writable_by_others(entry, "allowed key")
            allowed.add(_load_certificate(entry)[0])
    return FleetKeys(public, secret, frozenset(allowed))


def secret_manifest(directory: str | os.PathLike[str], name: str = "turnout-fleet-keys",
                    namespace: str = "") -> str:
    """A Kubernetes Secret (YAML) holding the directory's key files as they are, to mount as
    the keys directory (`defaultMode: 0400` keeps the secret unreadable by others)."""
    load(directory)  # refuse to package an unusable directory
    path = Path(directory)
    files = sorted(e for e in path.iterdir() if not e.name.startswith(".") and
                   (e.name.endswith(PUBLIC_SUFFIX) or e.name.endswith(SECRET_SUFFIX)))
    lines = ["apiVersion: v1", "kind: Secret", "metadata:", f"  name: {name}"]
    if namespace:
        lines.append(f"  namespace: {namespace}")
    lines += ["  labels:", "    app.kubernetes.io/part-of: turnout", "type: Opaque", "data:"]
    for entry in files:
        lines.append(f"  {entry.name}: {base64.b64encode(entry.read_bytes()).decode('ascii')}")
    return "\n".join(lines) + "\n"


def _load_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeysError(f"{path} is not a ZeroMQ certificate: {exc}") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeysError(f"{path} does not hold a 40-character Z85 CURVE key")
    return public, secret


def _refuse_writable_by_others(path: Path, what: str) -> None:
    mode = path.stat().st_mode
    # A read-only mount (a Kubernetes Secret volume, whose root is 1777) cannot be written.
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not os.statvfs(path).f_flag & os.ST_RDONLY:
        raise KeysError(f"{what} {path} is writable by group or others "
                        f"(mode {stat.S_IMODE(mode):o}): anyone could add a key; chmod go-w it")
