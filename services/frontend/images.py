"""Images in chat requests: OpenAI `image_url` content parts to checked images and prompt tokens.

A part's `url` is a `data:` URI (base64 PNG, JPEG or WebP) or, when the host is on the
`--image-url-hosts` allow-list (empty by default: URLs refused), an http(s) URL fetched with a
size cap and a timeout. Every image is decoded with Pillow (off the event loop) and checked: a
format the bytes do not match, a truncated file, more pixels than `--max-image-pixels`, more
than `--max-images-per-request` images, a URL that cannot be fetched are each a 400 naming the
part (`messages[i].content[j]`). A good image becomes a content hash (sha256 of its decoded
pixels, mode and size) and a number of placeholder tokens in the prompt, whose ids derive from
the hash (`common/image_keys.py`), so the KV block hashes carry the image.

Owns parsing, fetching, limits and prompt assembly; not tokenization (`tokenizer`), the
encoder (encode workers) or the wire format (`common/messages.py`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import io
import math
import os
import urllib.parse
from typing import Any, Final

import httpx
from PIL import Image, UnidentifiedImageError

from common.image_keys import placeholder_ids
from common.messages import ImageInput
from common.vision_layout import VisionLayout
from services.frontend import protocol
from services.frontend.errors import ApiError
from services.frontend.tokenizer import Tokenizer

# MIME type → the format Pillow must find in the bytes.
FORMATS: Final = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG",
                  "image/webp": "WEBP"}
# One placeholder token per PATCHxPATCH pixels (a 2x2-merged 14-pixel ViT patch, as in
# Qwen2-VL); an image with more patches than MAX_TOKENS_PER_IMAGE is scaled down to fit.
PATCH: Final = 28
MAX_TOKENS_PER_IMAGE: Final = 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ImageLimits:
    """The frontend's image flags (`args.py`)."""

    max_images: int = 8
    max_pixels: int = 16_777_216
    url_hosts: frozenset[str] = frozenset()  # empty: URLs refused; "*": any host
    fetch_timeout_s: float = 5.0
    fetch_max_bytes: int = 20 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedImage:
    hash: str
    width: int
    height: int
    mime: str
    data: bytes


def bad_image(param: str, message: str, code: str = "invalid_image") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code, reason="bad_image")


def tokens_for(width: int, height: int) -> int:
    """Placeholder tokens of a `width`x`height` image."""
    n = math.ceil(width / PATCH) * math.ceil(height / PATCH)
    if n <= MAX_TOKENS_PER_IMAGE:
        return max(1, n)
    scale = math.sqrt(MAX_TOKENS_PER_IMAGE / n)
    return max(1, min(MAX_TOKENS_PER_IMAGE,
                      math.ceil(width * scale / PATCH) * math.ceil(height * scale / PATCH)))


def decode_image(data: bytes, mime: str, max_pixels: int, param: str) -> DecodedImage:
    """Check and hash one image file (CPU-bound: run it off the loop). ApiError when bad."""
    expected = FORMATS.get(mime)
    if expected is None:
        raise bad_image(param, f"unsupported image type {mime!r}; send image/png, image/jpeg "
                               "or image/webp", "unsupported_image_type")
    try:
        with Image.open(io.BytesIO(data), formats=[expected]) as img:
            width, height = img.size
            if width * height > max_pixels:  # before decoding: no pixel bomb is ever expanded
                raise bad_image(param, f"image is {width}x{height} = {width * height} pixels, "
                                       f"more than the limit {max_pixels} "
                                       "(--max-image-pixels)", "image_too_large")
            img.load()
            digest = hashlib.sha256(f"{img.mode}:{width}x{height}:".encode())
            digest.update(img.tobytes())
    except UnidentifiedImageError:
        raise bad_image(param, f"the data is not a {expected} image (declared {mime!r})",
                        "image_type_mismatch") from None
    except Image.DecompressionBombError as exc:  # so large that Pillow refuses to open it
        raise bad_image(param, f"image is too large to decode ({exc})",
                        "image_too_large") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise bad_image(param, f"the image cannot be decoded ({exc})") from None
    return DecodedImage(digest.hexdigest(), width, height, mime, data)


def parse_data_uri(url: str, param: str) -> tuple[str, bytes]:
    """(mime, bytes) of a base64 `data:` URI."""
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise bad_image(param, "a data URI must be 'data:<image type>;base64,<data>'",
                        "invalid_data_uri")
    mime = head[len("data:"):-len(";base64")].strip().lower()
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_image(param, "the data URI's base64 does not decode",
                        "invalid_data_uri") from None
    return mime, data


class ImageFetcher:
    """http(s) image URLs, from allow-listed hosts only, within a size cap and a timeout."""

    def __init__(self, limits: ImageLimits, transport: httpx.AsyncBaseTransport | None = None,
                 ) -> None:
        self.limits = limits
        self._client = httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=False,
                                         transport=transport)

    async def fetch(self, url: str, param: str) -> tuple[str, bytes]:
        limits = self.limits
        host = urllib.parse.urlsplit(url).hostname or ""
        if not limits.url_hosts:
            raise bad_image(param, "image URLs are not accepted by this server (send a data: "
                                   "URI, or start the frontend with --image-url-hosts)",
                            "image_url_disabled")
        if "*" not in limits.url_hosts and host not in limits.url_hosts:
            raise bad_image(param, f"host {host!r} is not in --image-url-hosts",
                            "image_host_not_allowed")
        try:
            async with asyncio.timeout(limits.fetch_timeout_s), \
                    self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise bad_image(param, f"fetching the image URL returned HTTP "
                                           f"{response.status_code}", "image_fetch_failed")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.fetch_max_bytes:
                    raise self._too_big(param)
                parts: list[bytes] = []
                size = 0
                async for part in response.aiter_bytes():
                    size += len(part)
                    if size > limits.fetch_max_bytes:
                        raise self._too_big(param)
                    parts.append(part)
                mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
        except TimeoutError:
            raise bad_image(param, f"fetching the image URL took longer than "
                                   f"{limits.fetch_timeout_s:g} s", "image_fetch_failed") from None
        except httpx.HTTPError as exc:
            raise bad_image(param, f"the image URL cannot be fetched ({type(exc).__name__})",
                            "image_fetch_failed") from None
        return mime, b"".join(parts)

    def _too_big(self, param: str) -> ApiError:
        return bad_image(param, f"the image at the URL is larger than "
                                f"{self.limits.fetch_max_bytes} bytes", "image_too_large")

    async def close(self) -> None:
        await self._client.aclose()


def image_parts(body: protocol.ChatCompletionRequest) -> list[tuple[str, Any]]:
    """(param, image_url object) of every image part, in prompt order."""
    out = []
    for i, message in enumerate(body.messages):
        content = getattr(message, "content", None)
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, protocol.ImageUrlPart):
                    out.append((f"messages[{i}].content[{j}]", part.image_url))
    return out


class ChatImages:
    """Turns a chat request with image parts into prompt token ids and `ImageInput`s."""

    def __init__(self, limits: ImageLimits, fetcher: ImageFetcher | None = None,
                 layout: VisionLayout | None = None) -> None:
        self.limits = limits
        self.fetcher = fetcher if fetcher is not None else ImageFetcher(limits)
        # A real vision-language model's positions per image (its processor's); without one
        # (the mocker) the patch-count estimate.
        self.tokens_for = layout.tokens_for if layout is not None else tokens_for

    async def load(self, param: str, image_url: Any) -> DecodedImage:
        if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
            raise bad_image(param, "image_url must be an object with a string 'url'",
                            "invalid_value")
        if image_url.get("detail", "auto") not in ("auto", "low", "high"):
            raise bad_image(param, "image_url.detail must be 'auto', 'low' or 'high'",
                            "invalid_value")
        url: str = image_url["url"]
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            mime, data = parse_data_uri(url, param)
        elif scheme in ("http", "https"):
            mime, data = await self.fetcher.fetch(url, param)
        else:
            raise bad_image(param, "image_url.url must be a data: URI or an http(s) URL",
                            "invalid_image_url")
        if not data:
            raise bad_image(param, "the image is empty")
        return await asyncio.get_running_loop().run_in_executor(
            None, decode_image, data, mime, self.limits.max_pixels, param)

    async def prompt(self, body: protocol.ChatCompletionRequest, tokenizer: Tokenizer,
                     ) -> tuple[list[int], list[ImageInput]]:
        """Prompt token ids (text through the chat template, each image's placeholders where
        its part was) and the images, in order."""
        parts = image_parts(body)
        if len(parts) > self.limits.max_images:
            raise bad_image(parts[self.limits.max_images][0],
                            f"{len(parts)} images in one request; at most "
                            f"{self.limits.max_images} (--max-images-per-request)",
                            "too_many_images")
        decoded = [await self.load(param, url) for param, url in parts]
        marker = f"<turnout-image-{os.urandom(8).hex()}>"
        pieces = tokenizer.render_chat_split(protocol.chat_messages(body, marker), marker,
                                             protocol.render_options(body))
        if len(pieces) != len(decoded) + 1:  # the template dropped or repeated a message
            raise bad_image("messages", "the chat template does not place every image exactly "
                                        "once", "invalid_chat_template")
        ids = list(pieces[0])
        images = []
        for image, piece in zip(decoded, pieces[1:], strict=True):
            n = self.tokens_for(image.width, image.height)
            images.append(ImageInput(image.hash, len(ids), n, image.mime, image.data))
            ids.extend(placeholder_ids(image.hash, n, tokenizer.vocab_size))
            ids.extend(piece)
        return ids, images
