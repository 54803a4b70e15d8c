"""CURVE on the planes, in one process over loopback: a secured context's bound sockets admit
only fleet clients (the ZAP handler), its connected sockets talk only to fleet servers, and a
context without keys is plain TCP as before."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
import zmq

from common.fleet_keys import KeysError, generate, load, secret_manifest
from common.loop_socket import LoopSocket
from common.transport import (
    CURVE_KEY_FIELD,
    bind_socket,
    connect_socket,
    destroy_context,
    identity_metadata,
    secure_context,
    trusted_peer,
)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    generate(tmp_path / "keys")
    return tmp_path / "keys"


class Echo:
    """A ROUTER bound through `bind_socket` that answers every message with `b"echo"`."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.received: list[list[bytes]] = []
        sock = ctx.socket(zmq.ROUTER, socket_class=zmq.Socket)
        self.endpoint = bind_socket(sock, "127.0.0.1", 0)
        self.reader = LoopSocket(sock, self._on)
        self.reader.start()

    def _on(self, frames: list[bytes]) -> None:
        self.received.append(frames)
        self.reader.send_multipart([frames[0], b"echo"])


async def ask(sock: zmq.Socket, within_s: float) -> bytes | None:
    """Send one message on a DEALER and wait (bounded) for one reply; None if none came."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    reader = LoopSocket(sock, lambda frames: got.done() or got.set_result(frames[-1]))
    reader.start()
    reader.send_multipart([b"hello"])
    try:
        return await asyncio.wait_for(got, within_s)
    except TimeoutError:
        return None
    finally:
        reader.close()


@pytest.mark.asyncio
async def test_fleet_client_is_served_strangers_get_nothing(keys_dir: Path,
                                                            tmp_path: Path) -> None:
    server_ctx, client_ctx, rogue_ctx = zmq.Context(), zmq.Context(), zmq.Context()
    try:
        secure_context(server_ctx, str(keys_dir))
        secure_context(client_ctx, str(keys_dir))
        echo = Echo(server_ctx)
        fleet = client_ctx.socket(zmq.DEALER, socket_class=zmq.Socket)
        connect_socket(fleet, echo.endpoint)
        assert await ask(fleet, 10) == b"echo"
        # A plain DEALER (no CURVE), and one that knows the fleet's public key (it is in every
        # discovery record) but has its own key pair: neither gets an answer nor is heard.
        plain = rogue_ctx.socket(zmq.DEALER, socket_class=zmq.Socket)
        plain.connect(echo.endpoint)
        stranger = rogue_ctx.socket(zmq.DEALER, socket_class=zmq.Socket)
        public, secret = zmq.curve_keypair()
        stranger.curve_serverkey = load(keys_dir).public
        stranger.curve_publickey, stranger.curve_secretkey = public, secret
        stranger.connect(echo.endpoint)
        results = await asyncio.gather(ask(plain, 1.5), ask(stranger, 1.5))
        assert results == [None, None]
        assert len(echo.received) == 1
        zap = server_ctx_zap_denials(server_ctx)
        assert zap >= 1  # the stranger was refused by the ZAP handler (the plain one earlier)
        # And the other way round: a fleet client never talks to a server without the secret.
        generate(tmp_path / "other")
        impostor_ctx = zmq.Context()
        try:
            secure_context(impostor_ctx, str(tmp_path / "other"))
            impostor = Echo(impostor_ctx)
            to_impostor = client_ctx.socket(zmq.DEALER, socket_class=zmq.Socket)
            connect_socket(to_impostor, impostor.endpoint)
            assert await ask(to_impostor, 1.5) is None
            assert impostor.received == []
        finally:
            destroy_context(impostor_ctx)
    finally:
        for ctx in (server_ctx, client_ctx):
            destroy_context(ctx)
        rogue_ctx.destroy(linger=0)


def server_ctx_zap_denials(ctx: zmq.Context) -> int:
    from common.transport import _secured
    return _secured[ctx].denied.total


@pytest.mark.asyncio
async def test_without_keys_the_planes_stay_plain() -> None:
    ctx = zmq.Context()
    try:
        assert secure_context(ctx, "") is None
        assert identity_metadata(ctx) == {}
        assert trusted_peer(ctx, {})
        echo = Echo(ctx)
        plain = ctx.socket(zmq.DEALER, socket_class=zmq.Socket)
        plain.connect(echo.endpoint)  # a plain peer, as every process was before keys
        assert await ask(plain, 10) == b"echo"
    finally:
        destroy_context(ctx)


@pytest.mark.asyncio
async def test_discovery_records_carry_the_key_and_strangers_are_not_trusted(
        keys_dir: Path) -> None:
    ctx = zmq.Context()
    try:
        keys = secure_context(ctx, str(keys_dir))
        assert keys is not None
        assert identity_metadata(ctx) == {CURVE_KEY_FIELD: keys.public_text}
        assert trusted_peer(ctx, identity_metadata(ctx))
        assert not trusted_peer(ctx, {})
        stranger = zmq.curve_keypair()[0].decode()
        assert not trusted_peer(ctx, {CURVE_KEY_FIELD: stranger})
        assert not trusted_peer(ctx, {CURVE_KEY_FIELD: 42})
    finally:
        destroy_context(ctx)


@pytest.mark.asyncio
async def test_an_empty_keys_directory_is_plain_a_partial_or_missing_one_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # What an optional Kubernetes Secret volume holds when the Secret does not exist.
    mounted = tmp_path / "mounted"
    (mounted / "..data").mkdir(parents=True)
    ctx = zmq.Context()
    try:
        with caplog.at_level(logging.WARNING, logger="common.transport"):
            assert secure_context(ctx, str(mounted)) is None
        assert "keys directory is empty: the planes run without CURVE" in caplog.text
        assert identity_metadata(ctx) == {}
        echo = Echo(ctx)
        plain = ctx.socket(zmq.DEALER, socket_class=zmq.Socket)
        plain.connect(echo.endpoint)
        assert await ask(plain, 10) == b"echo"
    finally:
        destroy_context(ctx)
    only_public = tmp_path / "only-public"
    generate(only_public)
    (only_public / "fleet.key_secret").unlink()
    not_keys = tmp_path / "not-keys"
    not_keys.mkdir()
    (not_keys / "secret.yaml").write_text("kind: Secret\n")
    for directory, why in ((only_public, r"fleet\.key_secret is missing"),
                           (not_keys, r"fleet\.key_secret is missing"),
                           (tmp_path / "absent", "does not exist")):
        ctx = zmq.Context()
        try:
            with pytest.raises(KeysError, match=why):
                secure_context(ctx, str(directory))
        finally:
            destroy_context(ctx)


def test_key_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="does not exist"):
        load(tmp_path / "absent")
    with pytest.raises(KeysError, match="missing"):
        load(tmp_path)
    secret = generate(tmp_path / "k")
    with pytest.raises(KeysError, match="already holds"):
        generate(tmp_path / "k")
    os.chmod(secret, 0o604)
    with pytest.raises(KeysError, match="readable or writable by others"):
        load(tmp_path / "k")
    os.chmod(secret, 0o600)
    os.chmod(tmp_path / "k", 0o777)
    with pytest.raises(KeysError, match="writable by group or others"):
        load(tmp_path / "k")
    os.chmod(tmp_path / "k", 0o700)
    (tmp_path / "k" / "junk.key").write_text("not a certificate\n")
    with pytest.raises(KeysError, match=r"junk\.key"):
        load(tmp_path / "k")


def test_extra_public_keys_are_admitted_and_the_secret_manifest_holds_the_files(
        tmp_path: Path) -> None:
    generate(tmp_path / "k")
    generate(tmp_path / "extra")
    (tmp_path / "k" / "tool.key").write_bytes((tmp_path / "extra" / "fleet.key").read_bytes())
    keys = load(tmp_path / "k")
    assert load(tmp_path / "extra").public in keys.allowed and keys.public in keys.allowed
    manifest = secret_manifest(tmp_path / "k", "fleet", "serving")
    assert "kind: Secret" in manifest and "namespace: serving" in manifest
    assert "  fleet.key_secret: " in manifest and "  tool.key: " in manifest
