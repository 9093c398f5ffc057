"""Atomic publication of files to a local directory or an object store.

Local files are written under a temporary name in the same directory and renamed into place; object stores make
an object visible only once its upload completes. Either way a reader never sees a partial file. An output that is
written piece by piece (a shard, an index, a plan table) goes into a local staging file first (:func:`staged`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import fsspec

from m3leo_stream.storage import is_local


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def fsync_path(path: str) -> None:
    """Flush a finished file to disk before it is renamed into place, so a crash cannot publish it empty; or a
    directory's entries, after renames into it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2
_libc: Callable[..., int] | Literal[False] | None = None  # sync_file_range; False where there is none


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


PARTIAL = ".partial-"  # marks a file being written beside its destination (a build's cleanup looks for it)


def _makedirs_for(fs: fsspec.AbstractFileSystem, path: str) -> None:
    parent = _parent(path)
    if is_local(fs) and parent:
        os.makedirs(parent, exist_ok=True)


def _partial_name(path: str) -> str:
    return f"{path}{PARTIAL}{uuid.uuid4().hex[:8]}"


def _replace_local(path: str, fill: Callable[[str], object]) -> None:
    """Create local ``path`` whole: ``fill`` writes a temporary file beside it, which is flushed to disk and
    renamed into place; the temporary file never outlives the call."""
    tmp = _partial_name(path)
    try:
        fill(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pipe_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it appears whole or not at all."""
    if is_local(fs):
        _makedirs_for(fs, path)
        _replace_local(path, lambda tmp: _write_bytes(tmp, data))
    else:
        fs.pipe_file(path, data)


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def put_atomic(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Publish a finished local file at ``path`` (moved when both are local, uploaded otherwise)."""
    if is_local(fs):
        _makedirs_for(fs, path)
        _replace_local(path, lambda tmp: shutil.move(local_path, tmp))
    else:
        fs.put_file(local_path, path)


def staging_path(fs: fsspec.AbstractFileSystem, path: str, folder: str | None = None) -> str:
    """A local file to write an output into before :func:`put_atomic` publishes it at ``path``: on a local file
    system beside ``path`` (or in ``folder``), so that publishing is a rename on the same disk; in the system's
    temporary directory otherwise, for the upload."""
    name = path.rsplit("/", 1)[-1]
    if is_local(fs):
        where = _parent(path) if folder is None else folder
        if where:
            os.makedirs(where, exist_ok=True)
        return _partial_name(os.path.join(where, name))
    fd, tmp = tempfile.mkstemp(prefix=f"m3leo-{name}-")
    os.close(fd)
    return tmp


@contextmanager
def staged(fs: fsspec.AbstractFileSystem, path: str, folder: str | None = None) -> Iterator[str]:
    """A :func:`staging_path` to write into; published at ``path`` when the block ends without an error, and
    removed in every case, so that a failed write leaves neither a partial output nor a temporary file."""
    tmp = staging_path(fs, path, folder)
    try:
        yield tmp
        put_atomic(fs, tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Plain (non-atomic) write that creates local parent directories; for generated source data."""
    _makedirs_for(fs, path)
    fs.pipe_file(path, data)
