"""The keys file: parsing, hashed lookup, reload on change (and a bad change keeping the keys)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from services.frontend.api_keys import SINGLE_KEY_ID, ApiKeys, KeysFileError, parse_keys


def _auth(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x"), (b"authorization", b"Bearer " + key.encode())]


def _write(path: Path, entries: object, bump_ns: int = 0) -> None:
    path.write_text(json.dumps(entries))
    if bump_ns:  # a second write within the clock's resolution still counts as a change
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump_ns))


def test_yaml_and_json_entries_with_limits() -> None:
    sha = hashlib.sha256(b"sk-b").hexdigest()
    yaml_text = f"""
keys:
  - id: team-a
    key: sk-a
    models: [tiny, other]
    requests_per_second: 2.5
    tokens_per_minute: 1000
    max_concurrent_streams: 3
  - id: team-b
    sha256: {sha}
"""
    keys = parse_keys(yaml_text)
    by_id = {p.key_id: p for p in keys.values()}
    a = by_id["team-a"]
    assert a.models == frozenset({"tiny", "other"})
    assert a.limits() == (2.5, 1000, 3)
    assert a.allows("tiny") and not a.allows("big")
    b = by_id["team-b"]
    assert b.models is None and b.allows("anything") and b.limits() == (0.0, 0, 0)
    assert b.digest == hashlib.sha256(b"sk-b").digest()
    # The keys themselves are nowhere in what is kept.
    assert b"sk-a" not in repr(keys).encode()
    assert parse_keys(json.dumps([{"id": "x", "key": "k"}]))


@pytest.mark.parametrize(("text", "needle"), [
    ("{not yaml: [", "not valid JSON or YAML"),
    ('{"id": "a"}', "expected a list"),
    ('[{"id": "a"}]', "exactly one of 'key' and 'sha256'"),
    ('[{"id": "a", "key": "k", "sha256": "%s"}]' % ("0" * 64), "exactly one"),
    ('[{"id": "a", "sha256": "abc"}]', "sha256"),
    ('[{"id": "a", "key": "k"}, {"id": "a", "key": "j"}]', "duplicate id"),
    ('[{"id": "a", "key": "k"}, {"id": "b", "key": "k"}]', "the same key as 'a'"),
    ('[{"id": "a", "key": "k", "requests_per_second": -1}]', "requests_per_second"),
    ('[{"id": "a", "key": "k", "rpm": 5}]', "unknown field `rpm`"),
])
def test_bad_files_say_why(text: str, needle: str) -> None:
    with pytest.raises(KeysFileError, match=needle.replace("[", r"\[")):
        parse_keys(text)


def test_lookup_needs_a_known_bearer_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _write(path, [{"id": "a", "key": "sk-a"}])
    keys = ApiKeys(path, single_key="sk-single")
    assert keys.lookup(_auth("sk-a")).key_id == "a"
    assert keys.lookup(_auth("sk-single")).key_id == SINGLE_KEY_ID
    assert keys.lookup(_auth("sk-other")) is None
    assert keys.lookup([(b"authorization", b"Basic c2stYQ==")]) is None
    assert keys.lookup([(b"authorization", b"bearer sk-a")]).key_id == "a"  # scheme: any case
    assert keys.lookup([(b"authorization", b"Bearer ")]) is None
    assert keys.lookup([]) is None


def test_reload_on_change_revokes_and_adds(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _write(path, [{"id": "a", "key": "sk-a"}, {"id": "b", "key": "sk-b"}])
    keys = ApiKeys(path)
    assert not keys.reload_if_changed()  # unchanged: nothing re-read
    _write(path, [{"id": "b", "key": "sk-b"}, {"id": "c", "key": "sk-c"}], bump_ns=10**9)
    assert keys.reload_if_changed()
    assert keys.lookup(_auth("sk-a")) is None
    assert keys.lookup(_auth("sk-c")).key_id == "c"
    # Replaced atomically (a new inode), the way editors and Kubernetes secrets do it.
    tmp = tmp_path / "keys.new"
    _write(tmp, [{"id": "d", "key": "sk-d"}])
    tmp.replace(path)
    assert keys.reload_if_changed()
    assert [p.key_id for p in keys.policies()] == ["d"]


def test_bad_reload_keeps_the_keys_in_force(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _write(path, [{"id": "a", "key": "sk-a"}])
    errors: list[int] = []
    keys = ApiKeys(path, on_reload_error=lambda: errors.append(1))
    path.write_text("[{broken")
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    assert not keys.reload_if_changed()
    assert not keys.reload_if_changed()  # reported once per change, not once per poll
    assert errors == [1]
    assert keys.lookup(_auth("sk-a")).key_id == "a"
    path.unlink()
    assert not keys.reload_if_changed()
    assert errors == [1, 1]
    assert keys.lookup(_auth("sk-a")).key_id == "a"


def test_start_up_with_a_bad_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("- id: a\n")
    with pytest.raises(KeysFileError, match="entry 0"):
        ApiKeys(path)
    with pytest.raises(KeysFileError, match="cannot read"):
        ApiKeys(tmp_path / "missing.yaml")
