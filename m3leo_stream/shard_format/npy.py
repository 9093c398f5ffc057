"""The one ``.npy`` codec of array members: format 1.0, C order, never pickled; optionally one zstd frame."""

from __future__ import annotations

import ast
import functools
import io
import threading
from typing import Any

import numpy as np

from m3leo_stream.shard_format.errors import FormatError


def _header_bytes(header: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def npy_parts(array: np.ndarray) -> tuple[bytes, memoryview]:
    """The ``.npy`` header and the raw C-order bytes of ``array``, without copying the data (a member is the two
    joined)."""
    array = np.asarray(array, order="C")
    return _header_bytes(np.lib.format.header_data_from_array_1_0(array)), array.data.cast("B")


def encode_array(array: np.ndarray) -> bytes:
    """``.npy`` bytes of ``array``: :func:`npy_parts` joined."""
    header, body = npy_parts(array)
    return header + bytes(body)


def npy_header_size(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Size of the ``.npy`` header :func:`npy_parts` writes for an array of this shape and dtype."""
    header = np.lib.format.header_data_from_array_1_0(np.empty((0,), dtype=dtype))
    header["shape"] = tuple(shape)
    return len(_header_bytes(header))


_AST_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1024)
def _parse_header_text(text: bytes) -> tuple[Any, tuple[int, ...], bool]:
    """The header dict's fields. Readers parse headers from several threads, and CPython 3.11's
    ``ast.literal_eval`` is not safe under concurrent use ("AST constructor recursion depth mismatch"), so parsing
    is serialised; headers repeat for every sample of a modality, so the cache makes that free."""
    with _AST_LOCK:
        header = ast.literal_eval(text.decode("latin1"))
    return header["descr"], tuple(int(x) for x in header["shape"]), bool(header["fortran_order"])


def npy_header(data: bytes | bytearray | memoryview) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """``(dtype, shape, fortran_order, data_offset)`` of an ``.npy`` header, parsed without pickle."""
    mv = memoryview(data)
    if bytes(mv[:6]) != b"\x93NUMPY":
        raise FormatError("not an .npy member (bad magic)")
    major = mv[6]
    hlen_size = 2 if major == 1 else 4
    hlen = int.from_bytes(mv[8 : 8 + hlen_size], "little")
    start = 8 + hlen_size + hlen
    try:
        descr, shape, fortran = _parse_header_text(bytes(mv[8 + hlen_size : start]))
        dtype = np.dtype(descr)
    except Exception as e:  # noqa: BLE001 - any malformed header
        raise FormatError(f"bad .npy header: {e}") from None
    if dtype.hasobject:
        raise FormatError("object arrays are not allowed")
    return dtype, shape, fortran, start


def decode_array(data: bytes | memoryview, compressed: bool = False, where: str = "") -> np.ndarray:
    """Parse ``.npy`` (optionally zstd-framed) bytes without pickle, zero-copy where possible."""
    try:
        if compressed:
            import zstandard

            data = zstandard.ZstdDecompressor().decompress(data)
        mv = memoryview(data)
        dtype, shape, fortran, start = npy_header(mv)
        count = int(np.prod(shape)) if shape else 1
        if len(mv) - start != count * dtype.itemsize:
            raise FormatError(f"truncated array: {len(mv) - start} bytes for shape {shape} {dtype}")
        arr = np.frombuffer(mv, dtype=dtype, count=count, offset=start)
        return arr.reshape(shape, order="F" if fortran else "C")
    except FormatError as e:
        raise FormatError(f"{where}: {e}" if where else str(e)) from None
    except Exception as e:  # zstd
        raise FormatError(f"{where}: cannot decode member: {e}" if where else f"cannot decode member: {e}") from e
