"""API keys of the frontend: the keys file, its reloading, and finding the key a request presents.

A keys file (`--api-keys-file`, JSON or YAML) is a list of entries, each with an `id` (what
metrics and logs name), the key itself (`key`) or its SHA-256 (`sha256`, hex), and optional
limits: `models` (the allow-list), `requests_per_second`, `tokens_per_minute` and
`max_concurrent_streams`. Only digests are kept in memory; a request's bearer token is hashed
once and looked up by digest, then compared with `hmac.compare_digest`. `--api-key` adds one
unrestricted key with the id `api-key`.

The file is polled (stat every `reload_interval_s`, in a task) and re-read when it changes; a
removed key is refused from the next request on. A file that does not parse keeps the previous
keys and is counted and logged. Does not own quotas (`quotas`) or HTTP answers (`app`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Final

import msgspec
import yaml
from msgspec import Meta

log = logging.getLogger("turnout.frontend")

SINGLE_KEY_ID: Final = "api-key"
_BEARER: Final = b"bearer "
_HEX64: Final = "^[0-9a-fA-F]{64}$"


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message says which entry and why."""


class _Entry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: Annotated[str, Meta(min_length=1, max_length=128)]
    key: Annotated[str, Meta(min_length=1)] | None = None
    sha256: Annotated[str, Meta(pattern=_HEX64)] | None = None
    models: list[str] | None = None
    requests_per_second: Annotated[float, Meta(ge=0)] = 0.0
    tokens_per_minute: Annotated[int, Meta(ge=0)] = 0
    max_concurrent_streams: Annotated[int, Meta(ge=0)] = 0


class KeyPolicy(msgspec.Struct, frozen=True):
    """One key's identity and limits (0: no limit; `models` None: every model)."""

    key_id: str
    digest: bytes
    models: frozenset[str] | None = None
    requests_per_second: float = 0.0
    tokens_per_minute: int = 0
    max_concurrent_streams: int = 0

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def limits(self) -> tuple[float, int, int]:
        return self.requests_per_second, self.tokens_per_minute, self.max_concurrent_streams


def digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def parse_keys(text: str, source: str = "keys file") -> dict[bytes, KeyPolicy]:
    """The policies of a keys file's text, by key digest; `KeysFileError` when unusable."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KeysFileError(f"{source}: not valid JSON or YAML: {exc}") from None
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if not isinstance(data, list):
        raise KeysFileError(f"{source}: expected a list of keys (or {{keys: [...]}})")
    try:
        entries = msgspec.convert(data, list[_Entry])
    except msgspec.ValidationError as exc:
        raise KeysFileError(f"{source}: {exc}") from None
    out: dict[bytes, KeyPolicy] = {}
    ids: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{source}: entry {i} ({entry.id!r})"
        if (entry.key is None) == (entry.sha256 is None):
            raise KeysFileError(f"{where}: give exactly one of 'key' and 'sha256'")
        if entry.id in ids:
            raise KeysFileError(f"{where}: duplicate id")
        ids.add(entry.id)
        key_digest = digest(entry.key) if entry.key is not None else bytes.fromhex(entry.sha256
                                                                                  or "")
        if key_digest in out:
            raise KeysFileError(f"{where}: the same key as {out[key_digest].key_id!r}")
        out[key_digest] = KeyPolicy(
            entry.id, key_digest, None if entry.models is None else frozenset(entry.models),
            entry.requests_per_second, entry.tokens_per_minute, entry.max_concurrent_streams)
    return out


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


class ApiKeys:
    """The keys in force: those of the keys file (if any) plus the single `--api-key`."""

    def __init__(self, path: str | Path | None = None, single_key: str | None = None,
                 on_reload_error: Callable[[], None] | None = None) -> None:
        self.path = Path(path) if path else None
        self._single = ({} if not single_key
                        else {digest(single_key): KeyPolicy(SINGLE_KEY_ID, digest(single_key))})
        self._on_reload_error = on_reload_error
        self._stamp: tuple[int, int, int] | None = None
        self._by_digest: dict[bytes, KeyPolicy] = dict(self._single)
        self.reloads = 0
        if self.path is not None:
            self._load()  # at start-up a bad file is fatal (KeysFileError)

    def policies(self) -> Iterable[KeyPolicy]:
        return self._by_digest.values()

    def lookup(self, headers: Iterable[tuple[bytes, bytes]]) -> KeyPolicy | None:
        """The policy of the request's `Authorization: Bearer <key>`, None when absent or
        unknown. One hash and one dict lookup; the digest compared in constant time."""
        for name, value in headers:
            if name == b"authorization":
                if value[:7].lower() != _BEARER:
                    return None
                token = value[7:].strip()
                if not token:
                    return None
                presented = digest(token)
                policy = self._by_digest.get(presented)
                if policy is not None and hmac.compare_digest(policy.digest, presented):
                    return policy
                return None
        return None

    def _load(self) -> None:
        assert self.path is not None
        try:
            stamp = _stamp(self.path)
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysFileError(f"cannot read keys file {self.path}: {exc}") from None
        keys = parse_keys(text, str(self.path))
        single = {d: p for d, p in self._single.items() if d not in keys}
        self._by_digest = {**keys, **single}
        self._stamp = stamp
        self.reloads += 1

    def reload_if_changed(self) -> bool:
        """Re-read the file if its mtime, size or inode changed; True when new keys apply.
        A file that no longer parses keeps the keys in force."""
        if self.path is None:
            return False
        try:
            stamp = _stamp(self.path)
        except OSError as exc:
            if self._stamp is not None:
                log.error("api keys file unreadable, keeping the keys in force: %s", exc)
                self._stamp = None
                if self._on_reload_error is not None:
                    self._on_reload_error()
            return False
        if stamp == self._stamp:
            return False
        try:
            self._load()
        except KeysFileError as exc:
            self._stamp = stamp  # report once per change, not once per poll
            log.error("api keys file not reloaded, keeping the keys in force: %s", exc)
            if self._on_reload_error is not None:
                self._on_reload_error()
            return False
        log.info("api keys reloaded", extra={"fields": {"keys": len(self._by_digest)}})
        return True

    async def watch(self, interval_s: float,
                    on_change: Callable[[], None] | None = None) -> None:
        """Poll the file every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self.reload_if_changed() and on_change is not None:
                    on_change()
            except Exception:  # a surprise must not stop the frontend: keep the keys in force
                log.exception("api keys reload failed, keeping the keys in force")
                if self._on_reload_error is not None:
                    self._on_reload_error()

