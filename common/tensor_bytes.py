"""A tensor as bytes on the request plane: an image embedding from an encode worker to the LLM
worker that splices it into a prompt (`ImageInput.embedding`, `ImageEmbedding.embedding`).

Layout: the magic `b"TNSR"`, a version byte, the dtype's name (one length byte, then ASCII, a
NumPy/PyTorch name such as "float32"), the number of dimensions (one byte), each dimension as
a little-endian uint32, then the elements in C order, little-endian. No torch or numpy is needed
to read or write the header; an engine turns the payload into its own tensor type.

Owns the layout and its checks; not what the tensors mean (the vision encoder and the engines).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Final

MAGIC: Final = b"TNSR"
VERSION: Final = 1
# Element sizes of the dtypes an embedding may have.
ITEM_SIZE: Final = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class TensorBytesError(ValueError):
    """The bytes are not a tensor in this layout."""


@dataclasses.dataclass(frozen=True, slots=True)
class PackedTensor:
    shape: tuple[int, ...]
    dtype: str
    data: memoryview  # the elements, C order, little-endian


def pack(shape: tuple[int, ...], dtype: str, data: bytes | memoryview) -> bytes:
    """`data` (the elements of a `shape` tensor of `dtype`) with the header in front."""
    if dtype not in ITEM_SIZE:
        raise TensorBytesError(f"dtype {dtype!r} is not one of {sorted(ITEM_SIZE)}")
    if len(shape) > 255 or any(d < 0 or d >= 1 << 32 for d in shape):
        raise TensorBytesError(f"shape {shape} cannot be packed")
    count = 1
    for d in shape:
        count *= d
    if len(data) != count * ITEM_SIZE[dtype]:
        raise TensorBytesError(f"{len(data)} bytes are not a {dtype} tensor of shape {shape}")
    name = dtype.encode("ascii")
    header = MAGIC + struct.pack("<BB", VERSION, len(name)) + name + struct.pack(
        f"<B{len(shape)}I", len(shape), *shape)
    return header + bytes(data)


def unpack(payload: bytes) -> PackedTensor:
    """The tensor `pack` wrote. TensorBytesError when `payload` is anything else."""
    view = memoryview(payload)
    if len(view) < 6 or bytes(view[:4]) != MAGIC:
        raise TensorBytesError("not a packed tensor (no TNSR header): was it made by an encode "
                               "worker of this model? (the mocker's stand-ins are not tensors)")
    version, name_len = struct.unpack_from("<BB", view, 4)
    if version != VERSION:
        raise TensorBytesError(f"packed tensor version {version}; this build reads {VERSION}")
    at = 6 + name_len
    if len(view) < at + 1:
        raise TensorBytesError("packed tensor header is truncated")
    dtype = bytes(view[6:at]).decode("ascii", errors="replace")
    if dtype not in ITEM_SIZE:
        raise TensorBytesError(f"packed tensor dtype {dtype!r} is not one of {sorted(ITEM_SIZE)}")
    (ndim,) = struct.unpack_from("<B", view, at)
    at += 1
    if len(view) < at + 4 * ndim:
        raise TensorBytesError("packed tensor header is truncated")
    shape = struct.unpack_from(f"<{ndim}I", view, at)
    at += 4 * ndim
    count = 1
    for d in shape:
        count *= d
    want = count * ITEM_SIZE[dtype]
    if len(view) - at != want:
        raise TensorBytesError(f"packed tensor of shape {tuple(shape)} {dtype} carries "
                               f"{len(view) - at} bytes of elements, not {want}")
    return PackedTensor(tuple(shape), dtype, view[at:])
