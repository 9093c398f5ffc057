"""Opening a shard root: its manifest, index, statistics and modality entries, and plain member reads."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import fsspec

from m3leo_stream import shard_format as sf
from m3leo_stream.modalities import Modality, Registry
from m3leo_stream.storage import get_fs, join


class ShardRoot:
    """A published shard root (local directory or fsspec URL)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 fs: fsspec.AbstractFileSystem | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        if fs is None:
            fs, path = get_fs(url, self.storage_options)
        else:
            path = url.split("://", 1)[-1].rstrip("/")
        self.fs = fs
        self.path = path

    def __repr__(self) -> str:
        return f"ShardRoot({self.url!r})"

    def file(self, rel: str) -> str:
        return join(self.path, rel)

    def _where(self, rel: str) -> str:
        return f"{self.url.rstrip('/')}/{rel}"

    def _read(self, rel: str) -> bytes:
        try:
            with self.fs.open(self.file(rel), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            if rel == sf.MANIFEST and not self.fs.exists(self.path):
                raise FileNotFoundError(f"{self.url}: no such shard root (it does not exist)") from None
            if rel == sf.MANIFEST and not self.fs.isdir(self.path):
                raise NotADirectoryError(f"{self.url}: not a shard root (a file, not a directory)") from None
            raise FileNotFoundError(f"{self.url}: no {rel} (is this a finalized shard root?)") from None

    @cached_property
    def manifest(self) -> sf.Manifest:
        return sf.Manifest.loads(self._read(sf.MANIFEST), where=self._where(sf.MANIFEST))

    @cached_property
    def stats(self) -> sf.Stats:
        return sf.Stats.loads(self._read(sf.STATS), where=self._where(sf.STATS))

    @cached_property
    def modalities(self) -> Registry:
        """The registry entries the shards were built with (user-declared ones included)."""
        return Registry.from_json(self.manifest.modalities)

    @property
    def regions(self) -> list[str]:
        return list(self.manifest.regions)

    @property
    def compressed(self) -> bool:
        return self.manifest.compressed

    def modality(self, name: str) -> Modality:
        return self.modalities[name]

    def read_index(self, columns: list[str] | None = None, filters: Any = None):
        """``index.parquet`` as a pyarrow Table (only ``columns`` when given).

        The file is copied into an Arrow-allocated buffer and parsed from there, never from the Python file object:
        ``pq.read_table`` returns before its scan has been torn down, and that teardown runs on an Arrow thread-pool
        worker. Reading a Python file object leaves Python-owned buffers (``arrow::py::PyBuffer``) in the scan's
        read cache, whose destructor takes the GIL; when the worker gets there after the main thread has started
        interpreter finalization, Python ends the worker with ``pthread_exit``, its forced unwind meets a
        ``noexcept`` destructor and the process aborts (``terminate called without an active exception``, exit
        134) -- in a short command such as ``m3leo-shards inspect``, about one run in ten. With only Arrow-owned
        memory the teardown never touches Python (apache/arrow#39862, #36389, #49942).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.file(sf.INDEX)
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: no {sf.INDEX} (is this a finalized shard root?)") from None
        buf = pa.allocate_buffer(len(data))
        memoryview(buf).cast("B")[:] = data
        del data
        return pq.read_table(pa.BufferReader(buf), columns=columns, filters=filters)

    def read_range(self, shard: str, offset: int, nbytes: int) -> bytes:
        return self.fs.cat_file(self.file(shard), start=offset, end=offset + nbytes)

    def read_member(self, row: Mapping[str, Any], modality: str):
        """Decode one modality of one index row (a dict with ``shard`` and ``<modality>_offset/_nbytes``, and
        ``<modality>_xxh3`` when the row has digests: the bytes are then checked against it)."""
        off, n = row.get(sf.offset_column(modality)), row.get(sf.nbytes_column(modality))
        if off is None or n is None:
            raise KeyError(f"sample {row.get('key')} has no {modality} member")
        data = self.read_range(row["shard"], int(off), int(n))
        where = f"{row['shard']} key {row.get('key')} member {modality}"
        want = row.get(sf.checksum_column(modality))
        have = sf.digest(data) if want is not None else None
        if have != want:
            raise sf.FormatError(f"{where}: checksum mismatch: its bytes hash to {have:016x}, the index says "
                                 f"{want:016x}")
        if modality == sf.JSON_MEMBER:
            return json.loads(data)
        return sf.decode_array(data, compressed=self.compressed, where=where)

    def read_sample(self, key: str, modalities: Sequence[str] | None = None) -> dict[str, Any]:
        """The chip ``key``: its index fields (``key``, ``region``, ``split``, ``shard``, ``lon``, ``lat``), its
        metadata member as ``json`` and each of ``modalities`` it holds (default: all) as a stored-unit array."""
        names = [m.name for m in self.modalities.select(modalities)]
        rows = self.read_index(filters=[("key", "=", key)]).to_pylist()
        if not rows:
            raise KeyError(f"no sample with key {key!r} in {self.url}")
        row = rows[0]
        sample: dict[str, Any] = {k: row[k] for k in sf.BASE_INDEX_COLUMNS}
        sample[sf.JSON_MEMBER] = self.read_member(row, sf.JSON_MEMBER)
        for name in names:
            if row.get(sf.offset_column(name)) is not None:
                sample[name] = self.read_member(row, name)
        return sample
