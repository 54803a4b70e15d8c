"""Chat image parts: decoding and checks (Pillow), limits, URL fetching from a loopback server,
and the prompt they make (placeholders where the part was)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from PIL import Image

from common.image_keys import placeholder_ids
from services.frontend import protocol
from services.frontend.errors import ApiError
from services.frontend.images import (
    ChatImages,
    ImageLimits,
    decode_image,
    parse_data_uri,
    tokens_for,
)
from services.frontend.tokenizer import ByteTokenizer


def encoded(fmt: str, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (9, 99, 199),
            **save: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt, **save)
    return out.getvalue()


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def body(*parts: object) -> protocol.ChatCompletionRequest:
    content = [p if isinstance(p, dict) else {"type": "image_url", "image_url": {"url": p}}
               for p in parts]
    return protocol.parse_chat(json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": content}]}).encode())


def text(t: str) -> dict[str, str]:
    return {"type": "text", "text": t}


DEFAULT = ImageLimits()


def prompt(chat: protocol.ChatCompletionRequest, limits: ImageLimits = DEFAULT,
           ) -> tuple[list[int], list]:
    async def run() -> tuple[list[int], list]:
        images = ChatImages(limits)
        try:
            return await images.prompt(chat, ByteTokenizer())
        finally:
            await images.fetcher.close()

    return asyncio.run(run())


def error(chat: protocol.ChatCompletionRequest, limits: ImageLimits = DEFAULT) -> ApiError:
    with pytest.raises(ApiError) as info:
        prompt(chat, limits)
    assert info.value.status == 400
    return info.value


def test_tokens_per_image() -> None:
    assert tokens_for(28, 28) == 1
    assert tokens_for(224, 224) == 64
    assert tokens_for(1, 1) == 1
    assert tokens_for(4096, 4096) <= 1024  # scaled down to the cap


def test_the_hash_is_of_the_pixels_not_the_file() -> None:
    png = decode_image(encoded("PNG"), "image/png", 10**6, "p")
    webp = decode_image(encoded("WEBP", lossless=True), "image/webp", 10**6, "p")
    assert png.hash == webp.hash
    other = decode_image(encoded("PNG", color=(1, 2, 3)), "image/png", 10**6, "p")
    assert other.hash != png.hash
    jpeg = decode_image(encoded("JPEG"), "image/jpeg", 10**6, "p")
    assert (jpeg.width, jpeg.height) == (64, 48)


def test_placeholders_sit_where_the_part_was() -> None:
    ids, images = prompt(body(text("before"), uri(encoded("PNG")), text("after")))
    [image] = images
    assert image.num_tokens == tokens_for(64, 48) == 6
    span = ids[image.offset:image.offset + image.num_tokens]
    assert span == placeholder_ids(image.hash, 6, ByteTokenizer().vocab_size)
    rendered = bytes(i for i in ids[:image.offset] if i < 256).decode()
    assert rendered.endswith("before\n")
    assert bytes(ids[image.offset + 6:]).decode().startswith("\nafter")
    assert image.data == encoded("PNG") and image.mime == "image/png"


def test_same_image_same_prompt_other_image_other_prompt() -> None:
    a1, _ = prompt(body(text("x"), uri(encoded("PNG"))))
    a2, _ = prompt(body(text("x"), uri(encoded("PNG"))))
    b, _ = prompt(body(text("x"), uri(encoded("PNG", color=(0, 0, 0)))))
    assert a1 == a2
    assert a1 != b and len(a1) == len(b)


@pytest.mark.parametrize(("part", "code"), [
    (uri(encoded("PNG")[:60]), "invalid_image"),  # truncated
    (uri(encoded("JPEG"), "image/png"), "image_type_mismatch"),
    (uri(encoded("PNG"), "image/gif"), "unsupported_image_type"),
    ("data:image/png;base64,@@@", "invalid_data_uri"),
    ("data:image/png,plain", "invalid_data_uri"),
    ("ftp://host/a.png", "invalid_image_url"),
    ("https://example.com/a.png", "image_url_disabled"),
])
def test_bad_images_name_the_part(part: str, code: str) -> None:
    e = error(body(text("look"), part))
    assert e.param == "messages[0].content[1]"
    assert e.code == code
    assert e.message.startswith("messages[0].content[1]: ")


def test_pixel_limit_is_checked_before_decoding() -> None:
    e = error(body(uri(encoded("PNG", size=(200, 100)))), ImageLimits(max_pixels=19_999))
    assert e.code == "image_too_large"
    assert "200x100" in e.message and "--max-image-pixels" in e.message


def png_header(width: int, height: int) -> bytes:
    """A PNG that only claims its size (no pixel data): a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                0, 0, 0)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(10_000, 10_000), (30_000, 30_000)])
def test_a_pixel_bomb_is_refused_from_its_header(size: tuple[int, int]) -> None:
    e = error(body(uri(png_header(*size))), ImageLimits(max_pixels=10**12))
    assert e.code == ("image_too_large" if size[0] > 20_000 else "invalid_image")  # truncated
    e = error(body(uri(png_header(*size))))
    assert e.code == "image_too_large" and e.param == "messages[0].content[0]"


def test_too_many_images_names_the_first_one_over() -> None:
    image = uri(encoded("PNG"))
    e = error(body(image, text("and"), image, image), ImageLimits(max_images=2))
    assert e.code == "too_many_images"
    assert e.param == "messages[0].content[3]"


def test_image_url_object_is_checked() -> None:
    chat = body({"type": "image_url", "image_url": {"url": uri(encoded("PNG")),
                                                    "detail": "ultra"}})
    assert error(chat).code == "invalid_value"


def test_data_uri_parsing() -> None:
    assert parse_data_uri("data:IMAGE/PNG;base64,AAEC", "p") == ("image/png", b"\x00\x01\x02")


# --- URLs, from a loopback HTTP server ----------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def http_server(status: int, body: bytes, content_type: str = "image/png",
                      hang: bool = False) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if hang:
            await asyncio.sleep(30)
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
                     f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def fetch(status: int, payload: bytes, limits: ImageLimits, hang: bool = False,
          host: str = "127.0.0.1") -> tuple[list[int], list] | ApiError:
    async def run() -> tuple[list[int], list] | ApiError:
        async with http_server(status, payload, hang=hang) as port:
            images = ChatImages(limits)
            try:
                return await images.prompt(body(f"http://{host}:{port}/a.png"), ByteTokenizer())
            except ApiError as exc:
                return exc
            finally:
                await images.fetcher.close()

    return asyncio.run(run())


ALLOW = ImageLimits(url_hosts=frozenset({"127.0.0.1"}), fetch_timeout_s=1.0,
                    fetch_max_bytes=100_000)


def test_url_from_an_allowed_host() -> None:
    result = fetch(200, encoded("PNG"), ALLOW)
    assert not isinstance(result, ApiError)
    assert result[1][0].hash == decode_image(encoded("PNG"), "image/png", 10**6, "p").hash


@pytest.mark.parametrize(("status", "payload", "limits", "hang", "code"), [
    (404, b"", ALLOW, False, "image_fetch_failed"),
    (200, b"x" * 100_001, ALLOW, False, "image_too_large"),
    (200, b"", ALLOW, True, "image_fetch_failed"),  # a hang is a 400 within the timeout
    (200, b"", ImageLimits(url_hosts=frozenset({"images.example"})), False,
     "image_host_not_allowed"),
])
def test_url_failures(status: int, payload: bytes, limits: ImageLimits, hang: bool,
                      code: str) -> None:
    result = fetch(status, payload, limits, hang)
    assert isinstance(result, ApiError)
    assert (result.code, result.param) == (code, "messages[0].content[0]")


def test_images_in_a_real_chat_template() -> None:
    """The tiny Llama's template: the image's placeholders sit inside the user turn, ids
    within its vocabulary, and the text around them is what the template renders."""
    from services.frontend.tokenizer import HfTokenizer
    from tests.tiny_model import cached_tiny_model

    tokenizer = HfTokenizer(cached_tiny_model())
    chat = body(text("Describe"), uri(encoded("PNG")), text("briefly."))

    async def run() -> tuple[list[int], list]:
        images = ChatImages(DEFAULT)
        try:
            return await images.prompt(chat, tokenizer)
        finally:
            await images.fetcher.close()

    ids, [image] = asyncio.run(run())
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    before = tokenizer.decode(ids[:image.offset])
    after = tokenizer.decode(ids[image.offset + image.num_tokens:])
    assert before.rstrip().endswith("Describe") and "user" in before
    assert after.lstrip().startswith("briefly.") and "assistant" in after
    text_only = tokenizer.render_chat([{"role": "user", "content": "Describe\nbriefly."}])
    assert len(ids) > len(text_only)
