"""ZMTP on the loop (`common.zmtp`) against libzmq on loopback: both directions interoperate,
messages keep their frames and order (any size, split anywhere by TCP), a client reconnects and
says so, and peers that cannot speak to a plain plane are refused without reaching a handler."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
import zmq
import zmq.asyncio

from common.zmtp import ZmtpClient, ZmtpServer, encode


def run(main: object) -> None:
    uvloop.run(main)  # type: ignore[arg-type]  (the services' loop)


async def echo_server() -> tuple[ZmtpServer, int, list[list[bytes]]]:
    seen: list[list[bytes]] = []
    server: ZmtpServer

    def on_message(frames: list[bytes]) -> None:
        seen.append(frames)
        server.send_multipart([frames[0], b"echo", *frames[1:]])

    server = ZmtpServer(on_message)
    port = await server.bind("127.0.0.1", 0)
    server.start()
    return server, port, seen


def test_a_libzmq_dealer_talks_to_the_server_both_ways() -> None:
    async def main() -> None:
        server, port, seen = await echo_server()
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        try:
            big = bytes(range(256)) * 4096  # a long frame (1 MiB)
            await dealer.send_multipart([b"k", b"", big])
            reply = await asyncio.wait_for(dealer.recv_multipart(), 10)
            assert reply == [b"echo", b"k", b"", big]
            ident = seen[0][0]
            assert len(ident) == 5 and ident[0] == 0  # libzmq's form of a routing id
            assert seen[0][1:] == [b"k", b"", big]
        finally:
            dealer.close(linger=0)
            ctx.destroy(linger=0)
            server.close()

    run(main())


def test_the_client_talks_to_a_libzmq_router_and_follows_it_going_and_coming_back() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        replies: asyncio.Queue[list[bytes]] = asyncio.Queue()
        changes: asyncio.Queue[bool] = asyncio.Queue()
        client = ZmtpClient(f"tcp://127.0.0.1:{port}", replies.put_nowait, changes.put_nowait)
        try:
            client.send_multipart([b"sent", b"before connecting"])  # waits for the connection
            assert await asyncio.wait_for(changes.get(), 10) is True
            ident, *body = await asyncio.wait_for(router.recv_multipart(), 10)
            assert body == [b"sent", b"before connecting"]
            await router.send_multipart([ident, b"t", b"reply"])
            assert await asyncio.wait_for(replies.get(), 10) == [b"t", b"reply"]

            router.close(linger=0)  # the peer goes away
            assert await asyncio.wait_for(changes.get(), 10) is False
            assert not client.connected
            client.send_multipart([b"while down"])
            router = ctx.socket(zmq.ROUTER)  # and comes back on the same address
            router.bind(f"tcp://127.0.0.1:{port}")
            assert await asyncio.wait_for(changes.get(), 10) is True
            _, *body = await asyncio.wait_for(router.recv_multipart(), 10)
            assert body == [b"while down"]
        finally:
            client.close()
            router.close(linger=0)
            ctx.destroy(linger=0)

    run(main())


def test_many_messages_between_native_ends_keep_order_and_frames() -> None:
    async def main() -> None:
        server, port, seen = await echo_server()
        replies: list[list[bytes]] = []
        done = asyncio.get_running_loop().create_future()

        def on_reply(frames: list[bytes]) -> None:
            replies.append(frames)
            if len(replies) == 2000 and not done.done():
                done.set_result(None)

        client = ZmtpClient(f"tcp://127.0.0.1:{port}", on_reply, lambda up: None)
        try:
            sent = [[b"%d" % i, b"x" * (i % 700)] for i in range(2000)]
            for frames in sent:
                client.send_multipart(frames)
            await asyncio.wait_for(done, 20)
            assert replies == [[b"echo", *frames] for frames in sent]
            assert len({frames[0] for frames in seen}) == 1  # one connection, one routing id
        finally:
            client.close()
            server.close()

    run(main())


def test_frames_split_anywhere_by_tcp_arrive_whole() -> None:
    async def main() -> None:
        server, port, seen = await echo_server()
        message = [b"a", b"b" * 300, b""]
        wire = encode(message)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            greeting = bytearray(await asyncio.wait_for(reader.readexactly(64), 10))
            assert greeting[0] == 0xFF and greeting[9] == 0x7F and greeting[12:16] == b"NULL"
            hello = bytes(greeting) + bytes((4, 28)) + b"\x05READY\x0bSocket-Type" + (
                6).to_bytes(4, "big") + b"DEALER"
            stream = hello + wire + wire
            for i in range(len(stream)):  # one byte per write
                writer.write(stream[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0)
            for _ in range(200):
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.05)
            assert [frames[1:] for frames in seen] == [message, message]
        finally:
            writer.close()
            server.close()

    run(main())


def test_a_curve_peer_and_garbage_are_refused_before_any_handler() -> None:
    async def main() -> None:
        server, port, seen = await echo_server()
        ctx = zmq.asyncio.Context()
        public, secret = zmq.curve_keypair()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.CURVE_SERVERKEY, public)
        dealer.setsockopt(zmq.CURVE_PUBLICKEY, public)
        dealer.setsockopt(zmq.CURVE_SECRETKEY, secret)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        try:
            await dealer.send_multipart([b"from a curve peer"])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\n" + b"x" * 100 + b"\r\n\r\n")
            # Our greeting and READY, then the connection closes.
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer[:1] == b"\xff" and len(answer) < 100
            writer.close()
            # A plain client still gets through afterwards, and nothing else got in.
            replies: asyncio.Queue[list[bytes]] = asyncio.Queue()
            client = ZmtpClient(f"tcp://127.0.0.1:{port}", replies.put_nowait, lambda up: None)
            client.send_multipart([b"plain"])
            assert await asyncio.wait_for(replies.get(), 10) == [b"echo", b"plain"]
            client.close()
            assert [frames[1:] for frames in seen] == [[b"plain"]]
        finally:
            dealer.close(linger=0)
            ctx.destroy(linger=0)
            server.close()

    run(main())


def test_messages_before_start_wait_and_a_raising_handler_ends_run() -> None:
    async def main() -> None:
        got: list[list[bytes]] = []

        def on_message(frames: list[bytes]) -> None:
            if frames[1] == b"boom":
                raise RuntimeError("handler failed")
            got.append(frames[1:])

        server = ZmtpServer(on_message)
        port = await server.bind("127.0.0.1", 0)
        changes: asyncio.Queue[bool] = asyncio.Queue()
        client = ZmtpClient(f"tcp://127.0.0.1:{port}", lambda frames: None, changes.put_nowait)
        try:
            client.send_multipart([b"early"])
            assert await asyncio.wait_for(changes.get(), 10) is True
            await asyncio.sleep(0.1)
            assert got == []  # held until start
            running = asyncio.create_task(server.run())
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.05)
            assert got == [[b"early"]]
            client.send_multipart([b"boom"])
            with pytest.raises(RuntimeError, match="handler failed"):
                await asyncio.wait_for(running, 10)
        finally:
            client.close()
            server.close()

    run(main())


def test_a_client_of_an_endpoint_that_is_not_tcp_is_an_error() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="tcp://host:port"):
            ZmtpClient("ipc:///tmp/x", lambda frames: None, lambda up: None)

    run(main())
