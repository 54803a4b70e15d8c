"""Small test images: a solid-colour PNG and its data URL."""

from __future__ import annotations

import base64
import io

from PIL import Image


def png(color: tuple[int, int, int], size: tuple[int, int] = (112, 112)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
