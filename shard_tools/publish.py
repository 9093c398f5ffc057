"""Atomic publication of files to a local directory or an object store.

Local files are written under a temporary name in the same directory and renamed into place; object stores make
an object visible only once its upload completes. Either way a reader never sees a partial file.
"""

from __future__ import annotations

import os
import shutil
import uuid

import fsspec

from m3leo_stream.storage import is_local


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _fsync(path: str) -> None:
    """Flush a finished file to disk before it is renamed into place, so a crash cannot publish it empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2
_libc = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` of ``fd`` to disk now, without waiting (Linux
    ``sync_file_range``). The fsync before publication still makes the file durable; it just finds less left to
    write, so the disk works while the builder decodes the next chips. A no-op where the call is missing."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            lib = ctypes.CDLL(None, use_errno=True)
            fn = lib.sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _libc = fn
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def pipe_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it appears whole or not at all."""
    if is_local(fs):
        parent = _parent(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def put_atomic(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Publish a finished local file at ``path`` (moved when both are local, uploaded otherwise)."""
    if is_local(fs):
        parent = _parent(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        try:
            shutil.move(local_path, tmp)
            _fsync(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.put_file(local_path, path)


def write_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Plain (non-atomic) write that creates local parent directories; for generated source data."""
    if is_local(fs):
        parent = _parent(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
