"""Writing one tar shard: plain ustar headers, contiguous members per sample, byte ranges for the index.

Headers carry fixed metadata (mtime 0, uid/gid 0, mode 0644) so that the same samples give byte-identical shards.
The sha256 is computed while writing.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from m3leo_stream import shard_format as sf

BLOCK = 512
RECORD = 20 * BLOCK


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def npy_parts(array: np.ndarray) -> tuple[bytes, memoryview]:
    """The ``.npy`` header and the raw C-order bytes of ``array``, without copying the data."""
    array = np.ascontiguousarray(array)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(array))
    return buf.getvalue(), memoryview(array).cast("B")


class ShardWriter:
    """Streams samples into a tar file; :meth:`add_sample` returns each member's data offset and size."""

    def __init__(self, fileobj: BinaryIO, compress: str = "none", zstd_level: int = 3, writeback: int = 0):
        """``writeback``: with a real file, start the kernel's write-back every this many bytes (0: never)."""
        if compress not in ("none", "zstd"):
            raise ValueError(f"compress must be 'none' or 'zstd', not {compress!r}")
        self.f = fileobj
        self.compress = compress == "zstd"
        self.sha = hashlib.sha256()
        self.pos = 0
        self.samples = 0
        self.writeback = writeback if writeback > 0 and _has_fd(fileobj) else 0
        self._flushed = 0
        if self.compress:
            import zstandard

            # single-threaded with a fixed level: the same input gives the same frame
            self._zstd = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, threads=0)

    def _write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.pos += len(data)

    def _member(self, name: str, parts: list[bytes | memoryview]) -> tuple[int, int]:
        size = sum(len(p) for p in parts)
        self._write(_header(name, size))
        offset = self.pos
        for p in parts:
            self._write(p)
        pad = (-size) % BLOCK
        if pad:
            self._write(b"\0" * pad)
        return offset, size

    def add_sample(self, key: str, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Write ``<key>.json`` then one ``.npy`` member per modality; return ``{<mod>_offset, <mod>_nbytes}``
        (``json_offset``/``json_nbytes`` for the metadata member)."""
        sf.check_key(key)
        off, size = self._member(sf.member_name(key, None), [sf.dumps_json(meta)])
        ranges: dict[str, int] = {sf.offset_column(sf.JSON_MEMBER): off, sf.nbytes_column(sf.JSON_MEMBER): size}
        for name, array in arrays.items():
            header, body = npy_parts(array)
            if self.compress:
                parts: list[bytes | memoryview] = [self._zstd.compress(header + bytes(body))]
            else:
                parts = [header, body]
            off, size = self._member(sf.member_name(key, name, self.compress), parts)
            ranges[sf.offset_column(name)] = off
            ranges[sf.nbytes_column(name)] = size
        self.samples += 1
        if self.writeback and self.pos - self._flushed >= self.writeback:
            from shard_tools.publish import start_writeback

            self.f.flush()
            start_writeback(self.f.fileno(), self._flushed, self.pos - self._flushed)
            self._flushed = self.pos
        return ranges

    def close(self) -> tuple[int, str]:
        """Write the end-of-archive blocks (padded to a full record, as tar does); return (bytes, sha256)."""
        end = 2 * BLOCK
        end += (-(self.pos + end)) % RECORD
        self._write(b"\0" * end)
        self.f.flush()
        return self.pos, self.sha.hexdigest()


def _has_fd(f: BinaryIO) -> bool:
    try:
        f.fileno()
        return True
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation for in-memory buffers
        return False


def predicted_member_size(payload: int) -> int:
    """Bytes a member of ``payload`` bytes takes in the tar (header + padded data)."""
    return BLOCK + payload + ((-payload) % BLOCK)
