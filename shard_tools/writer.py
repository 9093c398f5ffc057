"""Writing one tar shard: plain ustar headers, contiguous members per sample, byte ranges for the index.

Headers carry fixed metadata (mtime 0, uid/gid 0, mode 0644) so that the same samples give byte-identical shards.
The sha256 is computed while writing. With ``background=True`` the writing and hashing run on a thread of their own
(both release the GIL), so that they overlap with the decoding of the next samples and with its waits for the disk.
"""

from __future__ import annotations

import hashlib
import queue
import tarfile
import threading
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from m3leo_stream import shard_format as sf

BLOCK = 512
RECORD = 20 * BLOCK
BACKGROUND_DEPTH = 2  # samples queued for the background writer before add_sample waits (bounds the memory held)


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class ShardWriter:
    """Streams samples into a tar file; :meth:`add_sample` returns each member's data offset and size.

    Use it as a context manager (or call :meth:`abort` on failure) so that a background writer is always stopped.
    The arrays given to :meth:`add_sample` must not be modified afterwards: in the background they are written
    later."""

    def __init__(self, fileobj: BinaryIO, compress: sf.Compression = "none", zstd_level: int = 3, writeback: int = 0,
                 background: bool = False):
        """``writeback``: with a real file, start the kernel's write-back every this many bytes (0: never).
        ``background``: write and hash on a thread (see the module docstring)."""
        if compress not in ("none", "zstd"):
            raise ValueError(f"compress must be 'none' or 'zstd', not {compress!r}")
        self.f = fileobj
        self.compress = compress == "zstd"
        self.sha = hashlib.sha256()
        self.pos = 0  # bytes laid out (written, or queued for the background writer)
        self.samples = 0
        self.writeback = writeback if writeback > 0 and _has_fd(fileobj) else 0
        self._written = 0
        self._flushed = 0
        self._parts: list[bytes | memoryview] = []
        self._error: BaseException | None = None
        self._stop = False
        self._queue: queue.Queue[list[bytes | memoryview] | None] = queue.Queue(maxsize=BACKGROUND_DEPTH)
        self._background = background  # else parts are written on the caller's thread
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="m3leo-shard-writer", daemon=True)
            self._thread.start()
        if self.compress:
            import zstandard

            # single-threaded with a fixed level: the same input gives the same frame
            self._zstd = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, threads=0)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    # -- the byte stream: laid out by the caller's thread, written and hashed by _emit (maybe on the thread) --

    def _write(self, data: bytes | memoryview) -> None:
        self._parts.append(data)
        self.pos += len(data)

    def _send(self) -> None:
        parts, self._parts = self._parts, []
        if not self._background:
            self._emit(parts)
            return
        self._raise_error()
        self._queue.put(parts)

    def _emit(self, parts: list[bytes | memoryview]) -> None:
        for p in parts:
            self.f.write(p)
            self.sha.update(p)
            self._written += len(p)
        if self.writeback and self._written - self._flushed >= self.writeback:
            from shard_tools.publish import start_writeback

            self.f.flush()
            start_writeback(self.f.fileno(), self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def _run(self) -> None:
        while True:
            parts = self._queue.get()
            if parts is None:
                return
            if self._error is None and not self._stop:
                try:
                    self._emit(parts)
                except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                    self._error = e

    def _raise_error(self) -> None:
        if self._error is not None:
            raise OSError(f"writing the shard failed: {self._error}") from self._error

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

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

    def add_sample(self, key: str, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Write ``<key>.json`` then one ``.npy`` member per modality (bands first; uncompressed, each preceded by
        its chunk digests); return each member's index columns: ``<mod>_offset``, ``<mod>_nbytes``, ``<mod>_xxh3``
        and, uncompressed, ``<mod>_chunks_xxh3`` (``json_*`` for the metadata member)."""
        sf.check_key(key)
        meta_bytes = sf.dumps_json(meta)
        off, size = self._member(sf.member_name(key, None), [meta_bytes])
        ranges: dict[str, Any] = {sf.offset_column(sf.JSON_MEMBER): off, sf.nbytes_column(sf.JSON_MEMBER): size,
                                  sf.checksum_column(sf.JSON_MEMBER): sf.digest(meta_bytes)}
        for name, array in arrays.items():
            header, body = sf.npy_parts(array)
            if self.compress:
                parts: list[bytes | memoryview] = [self._zstd.compress(header + bytes(body))]
            else:
                parts = [header, body]
                chunks = sf.chunk_digests(header, body, array.shape[0])
                self._member(sf.chunk_digests_name(key, name), [chunks])
                ranges[sf.chunks_checksum_column(name)] = sf.digest(chunks)
            off, size = self._member(sf.member_name(key, name, self.compress), parts)
            ranges[sf.offset_column(name)] = off
            ranges[sf.nbytes_column(name)] = size
            ranges[sf.checksum_column(name)] = sf.digest(*parts)
        self.samples += 1
        self._send()
        return ranges

    def close(self) -> tuple[int, str]:
        """Write the end-of-archive blocks (padded to a full record, as tar does), wait for the background writer;
        return (bytes, sha256)."""
        end = 2 * BLOCK
        end += (-(self.pos + end)) % RECORD
        self._write(b"\0" * end)
        self._send()
        self._join()
        self._raise_error()
        self.f.flush()
        return self.pos, self.sha.hexdigest()

    def abort(self) -> None:
        """Stop the background writer without writing what is still queued (the file is being discarded)."""
        self._stop = True
        self._join()


def _has_fd(f: BinaryIO) -> bool:
    try:
        f.fileno()
        return True
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation for in-memory buffers
        return False


def predicted_member_size(payload: int) -> int:
    """Bytes a member of ``payload`` bytes takes in the tar (header + padded data)."""
    return BLOCK + payload + ((-payload) % BLOCK)
