"""The index as the planner and reader hold it: a few fixed-width columns, built once per node, mapped by every rank.

``index.parquet`` holds strings and Python-sized integers; what a loader needs of it per sample is a key, region,
split and shard code, lon/lat, and per requested modality its byte range and digests. :func:`load_index` converts
those columns row group by row group into ``.npy`` files in a node-local directory (``cache_dir``: ``$SLURM_TMPDIR``
by default), published atomically under a name that fingerprints the shard root and the columns, and memory-maps
them; the other ranks of the node (and a requeued job) find the files and only map them, so a node holds the index
once, in its page cache. Offsets and sizes are 32-bit when every shard is smaller than 2 GiB (a value that does not
fit, which only a corrupt index has, is kept as the largest one, past the end of any shard, so the reader refuses it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import shard_format as sf

log = logging.getLogger(__name__)

LAYOUT = 1  # of the files below: part of their fingerprint
META = "meta.json"
CODED = ["region", "split", "shard"]  # string columns of few distinct values, held as codes


@dataclass(frozen=True)
class IndexArrays:
    """The index columns the planner and reader need, as fixed-width numpy arrays (memory-mapped when ``source``
    names their directory: then a worker process that unpickles them maps the same files)."""

    key: np.ndarray  # bytes, fixed width
    region: np.ndarray  # int8 codes into the manifest's regions
    lon: np.ndarray
    lat: np.ndarray
    shard: np.ndarray  # int32 codes into shard_names
    shard_names: tuple[str, ...]
    offsets: Mapping[str, np.ndarray]  # per modality, int32 or int64 (-1 where absent)
    nbytes: Mapping[str, np.ndarray]
    checksums: Mapping[str, np.ndarray] = field(default_factory=dict)  # per modality, uint64 member digests
    chunk_checksums: Mapping[str, np.ndarray] = field(default_factory=dict)  # ... of the chunk digests (partial reads)
    shard_bytes: np.ndarray | None = None  # int64 size of each shard (by code), from the manifest
    split: np.ndarray | None = None  # int8 codes into split_names (-1: another split)
    split_names: tuple[str, ...] = sf.SPLITS
    source: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        if self.source is not None:
            return open_index, (self.source,)
        return _rebuild, (type(self), {f.name: getattr(self, f.name) for f in fields(self)})

    def __len__(self) -> int:
        return len(self.key)

    @property
    def nbytes_held(self) -> int:
        """Bytes of all arrays (mapped or not)."""
        arrays = [self.key, self.region, self.lon, self.lat, self.shard, *self.offsets.values(), *self.nbytes.values(),
                  *self.checksums.values(), *self.chunk_checksums.values()]
        return sum(a.nbytes for a in arrays if a is not None) + (self.split.nbytes if self.split is not None else 0)

    @classmethod
    def from_table(cls, table: Any, modalities: Sequence[str], region_names: Sequence[str], *,
                   shard_bytes: Mapping[str, int] | None = None,
                   split_names: Sequence[str] = sf.SPLITS) -> IndexArrays:
        """From a pyarrow table of ``index.parquet`` holding at least the needed columns, in memory; the digests are
        taken where the table has them (the chunk digests are needed for the modalities read in part only)."""
        import pyarrow.compute as pc

        shard_names = list(shard_bytes) if shard_bytes is not None else \
            pc.unique(table.column("shard")).to_pylist()
        spec = _Spec.of(table, modalities, region_names, shard_names, split_names,
                        max(shard_bytes.values(), default=0) if shard_bytes is not None else 2**62)
        arrays = _convert(table, spec)
        return _assemble(arrays, spec, shard_bytes)


def _rebuild(cls: type, kw: dict[str, Any]) -> IndexArrays:
    return cls(**kw)


@dataclass(frozen=True)
class _Spec:
    """What the converted columns are: their sources, code spaces and widths."""

    modalities: tuple[str, ...]
    region_names: tuple[str, ...]
    split_names: tuple[str, ...]
    shard_names: tuple[str, ...]
    columns: tuple[str, ...]  # digest columns taken from the table
    key_width: int
    int_dtype: str  # of offsets and sizes

    @classmethod
    def of(cls, table_or_schema: Any, modalities: Sequence[str], region_names: Sequence[str],
           shard_names: Sequence[str], split_names: Sequence[str], max_shard_bytes: int,
           key_width: int | None = None, columns: Collection[str] | None = None) -> _Spec:
        import pyarrow.compute as pc

        names = table_or_schema.schema.names if hasattr(table_or_schema, "schema") else table_or_schema.names
        names = [c for c in names if columns is None or c in columns]
        digests = tuple(c for m in modalities for c in (sf.checksum_column(m), sf.chunks_checksum_column(m))
                        if c in names)
        if key_width is None:
            key_width = int(pc.max(pc.binary_length(table_or_schema.column("key"))).as_py() or 1)
        return cls(tuple(modalities), tuple(region_names), tuple(split_names), tuple(shard_names), digests,
                   int(key_width), "int32" if max_shard_bytes < 2**31 else "int64")

    def lookup(self, names: str) -> dict[str, int]:
        """Name → code of the code space ``names`` (``shard_names``, …), built once per spec."""
        cache = self.__dict__.setdefault("_lookups", {})  # not a field: neither compared nor published
        if names not in cache:
            cache[names] = {v: i for i, v in enumerate(getattr(self, names))}
        return cache[names]

    def dtypes(self) -> dict[str, str]:
        """Name → dtype of every converted array."""
        out = {"key": f"S{self.key_width}", "region": "int8", "split": "int8", "shard": "int32", "lon": "float64",
               "lat": "float64"}
        for m in self.modalities:
            out[sf.offset_column(m)] = out[sf.nbytes_column(m)] = self.int_dtype
        out.update({c: "uint64" for c in self.columns})
        return out


def _codes(column: Any, names: Mapping[str, int], what: str, unknown_ok: bool = False) -> np.ndarray:
    """Positions of a string column's values in ``names`` (name → code; -1 for others when ``unknown_ok``, else an
    error). Parquet's dictionary-coded columns (as :data:`CODED` are read) look their few distinct values up once."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        parts = [_codes(c, names, what, unknown_ok) for c in column.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    values = column.dictionary.to_pylist()
    lut = np.array([names.get(v, -1) for v in values] + [-1], np.int32)  # null: -1, the last entry
    codes = lut[column.indices.fill_null(-1).to_numpy(zero_copy_only=False)]
    if not unknown_ok and (codes < 0).any():
        bad = [v for v in values if v not in names][:3] or [None]
        raise ValueError(f"index rows name {what} {bad} that the manifest does not list")
    return codes


class _KeyTooLong(ValueError):
    """A key longer than the width the arrays were laid out for."""


def _fixed_keys(column: Any, width: int) -> np.ndarray:
    """A string column as fixed-width bytes (NUL-padded, as numpy's ``S`` dtype pads), straight from Arrow's
    buffers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if col.null_count:
        raise ValueError("index rows without a key")
    lengths = pc.binary_length(col)
    if len(col) and pc.max(lengths).as_py() > width:
        raise _KeyTooLong(pc.max(lengths).as_py())
    if len(col) and pc.min(lengths).as_py() != width:
        col = pc.utf8_rpad(col, width, padding="\x00")
    _, offsets, data = col.buffers()
    start = np.frombuffer(offsets, dtype=np.int64 if pa.types.is_large_string(col.type) else np.int32)[col.offset]
    return np.frombuffer(data, dtype=f"S{width}", count=len(col), offset=int(start)).copy() if len(col) else \
        np.zeros(0, f"S{width}")


def _convert(batch: Any, spec: _Spec) -> dict[str, np.ndarray]:
    """A table or record batch of ``index.parquet`` as the fixed-width arrays of ``spec``."""
    out = {
        "key": _fixed_keys(batch.column("key"), spec.key_width),
        "region": _codes(batch.column("region"), spec.lookup("region_names"), "regions").astype(np.int8),
        "split": _codes(batch.column("split"), spec.lookup("split_names"), "splits", unknown_ok=True).astype(np.int8),
        "shard": _codes(batch.column("shard"), spec.lookup("shard_names"), "shards"),
        "lon": batch.column("lon").to_numpy(zero_copy_only=False).astype(np.float64),
        "lat": batch.column("lat").to_numpy(zero_copy_only=False).astype(np.float64),
    }
    dtypes = spec.dtypes()
    top = np.iinfo(spec.int_dtype).max
    for m in spec.modalities:
        for col in (sf.offset_column(m), sf.nbytes_column(m)):
            a = batch.column(col).fill_null(-1).to_numpy(zero_copy_only=False)
            out[col] = np.clip(a, -1, top).astype(dtypes[col])  # saturated: past any shard, refused as corrupt
    for col in spec.columns:
        out[col] = batch.column(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64)
    return out


def _assemble(arrays: Mapping[str, np.ndarray], spec: _Spec, shard_bytes: Mapping[str, int] | None,
              source: str | None = None) -> IndexArrays:
    def per(col: Any) -> dict[str, np.ndarray]:
        return {m: arrays[col(m)] for m in spec.modalities if col(m) in arrays}

    sizes = None if shard_bytes is None else np.array([int(shard_bytes[n]) for n in spec.shard_names], np.int64)
    return IndexArrays(key=arrays["key"], region=arrays["region"], lon=arrays["lon"], lat=arrays["lat"],
                       shard=arrays["shard"], shard_names=spec.shard_names, offsets=per(sf.offset_column),
                       nbytes=per(sf.nbytes_column), checksums=per(sf.checksum_column),
                       chunk_checksums=per(sf.chunks_checksum_column), shard_bytes=sizes, split=arrays["split"],
                       split_names=spec.split_names, source=source)


def index_columns(modalities: Sequence[str], checksums: bool, chunks: Collection[str]) -> list[str]:
    """The ``index.parquet`` columns a loader of ``modalities`` reads: ranges, member digests when verifying, and the
    chunk digests of the modalities in ``chunks`` (read in part)."""
    cols = ["key", "region", "split", "shard", "lon", "lat"]
    for m in modalities:
        cols += [sf.offset_column(m), sf.nbytes_column(m)]
        if checksums:
            cols.append(sf.checksum_column(m))
            if m in chunks:
                cols.append(sf.chunks_checksum_column(m))
    return cols


def default_cache_dir() -> str:
    """``$SLURM_TMPDIR`` (node-local on most clusters), else the system's temporary directory, per user."""
    base = os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir()
    return os.path.join(base, f"m3leo-stream-{os.getuid()}")


def load_index(root: Any, modalities: Sequence[str], *, checksums: bool, chunks: Collection[str] = (),
               split_names: Sequence[str] = sf.SPLITS, cache_dir: str | None = None) -> IndexArrays:
    """The index arrays of ``root`` (a :class:`~m3leo_stream.shard_root.ShardRoot`) for ``modalities``, mapped from
    ``<cache_dir>/index/<fingerprint>/``: built there by the first process of the node that asks (the others wait
    for it and map the same files), reused while the shard root's index is unchanged. Falls back to arrays in memory
    when the directory cannot be written."""
    columns = index_columns(modalities, checksums, chunks)
    manifest = root.manifest
    info = root.fs.info(root.file(sf.INDEX))
    fingerprint = hashlib.sha256(json.dumps({
        "layout": LAYOUT, "url": root.url, "index_size": info.get("size"),
        "index_version": str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""),
        "created": manifest.get("created"), "samples": manifest.get("num_samples"), "columns": columns,
        "splits": list(split_names),
    }, sort_keys=True, default=str).encode()).hexdigest()[:24]
    base = Path(cache_dir or default_cache_dir()) / "index"
    final = base / fingerprint
    shard_bytes = {s["path"]: int(s["bytes"]) for s in manifest["shards"]}
    try:
        if _publish_once(final, lambda tmp: _build(root, columns, modalities, split_names, shard_bytes, tmp)):
            give_back_memory()  # once the reader and its batches are gone
            _forget_unused(base, keep=final)
    except OSError as e:
        log.warning("%s: cannot keep the index in %s (%s); holding it in memory", root.url, base, e)
        table = root.read_index(columns=columns)
        return IndexArrays.from_table(table, modalities, root.regions, shard_bytes=shard_bytes,
                                      split_names=split_names)
    return open_index(str(final))


_BUILDING = threading.Lock()


def _publish_once(final: Path, build: Callable[[Path], None]) -> bool:
    """Make the directory ``final`` exist once per node: under a lock beside it, the first process to ask builds it
    into an empty temporary sibling (``build`` writes :data:`META` last) and renames that into place; the others wait
    and find it. Whether this process built it; ``OSError`` where the directory cannot be written."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # a POSIX record lock, not flock: a DataLoader worker forked while it is held must not inherit it (flock locks
    # belong to the open file, which the worker would keep open); it excludes processes, the thread lock threads
    with _BUILDING, open(final.parent / f"{final.name}.lock", "a+") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # held while one process builds; the others then find it built
        if (final / META).exists():
            return False
        for old in final.parent.glob(f"{final.name}.tmp-*"):  # a process killed while building
            shutil.rmtree(old, ignore_errors=True)
        tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        build(tmp)
        if final.exists():  # an unfinished directory without META: replaced
            shutil.rmtree(final)
        os.rename(tmp, final)
        return True


def _build(root: Any, columns: list[str], modalities: Sequence[str], split_names: Sequence[str],
           shard_bytes: Mapping[str, int], tmp: Path) -> None:
    """Convert ``index.parquet`` into ``.npy`` files in ``tmp``, its row groups on :func:`conversion_threads`
    threads."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = time.perf_counter()
    with root.fs.open(root.file(sf.INDEX), "rb") as f:
        pf = pq.ParquetFile(f, read_dictionary=CODED)  # decoded as codes, not as 17M strings each
        n = pf.metadata.num_rows
        # keys are laid out as wide as the first row group's; a longer one later means one pass to find the width
        width = int(pc.max(pc.binary_length(pf.read_row_group(0, columns=["key"]).column(0))).as_py() or 1) \
            if pf.metadata.num_row_groups else 1
        threads = conversion_threads()
        for _ in range(2):
            spec = _Spec.of(pf.schema_arrow, modalities, root.regions, list(shard_bytes), split_names,
                            max(shard_bytes.values(), default=0), key_width=width, columns=columns)
            try:
                _write_arrays(lambda: root.fs.open(root.file(sf.INDEX), "rb"), pf.metadata, columns, spec, tmp,
                              threads)
                break
            except _KeyTooLong:
                width = max(int(pc.max(pc.binary_length(b.column(0))).as_py() or 1)
                            for b in pf.iter_batches(batch_size=1 << 20, columns=["key"]))
    np.save(tmp / "shard_bytes.npy", np.array([shard_bytes[s] for s in spec.shard_names], dtype=np.int64))
    meta = {"spec": {f.name: getattr(spec, f.name) for f in fields(spec)}, "rows": n, "url": root.url}
    (tmp / META).write_text(json.dumps(meta))
    log.info("%s: index of %d samples converted in %.1f s on %d threads", root.url, n, time.perf_counter() - t,
             threads)


def conversion_threads() -> int:
    """Threads converting the index: the CPUs this process may run on, at most 8 (the other ranks of the node wait
    for the conversion, so their cores are idle meanwhile)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def give_back_memory(collect: bool = True) -> None:
    """Return the heap a conversion freed to the system: what pyarrow's allocator keeps from reading, and the free
    pages glibc's malloc keeps for reuse (numpy's temporaries of a few MB come from its heap, not from mmap). With
    ``collect``, cycles are collected first: a parquet reader's batches stay referenced from one until then (≈ 1 GB
    at 17M rows); numpy-only work frees its arrays without (a collection costs ≈ 0.2 s beside torch's objects)."""
    import ctypes
    import gc

    import pyarrow as pa

    if collect:
        gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


UNUSED_S = 30 * 86400  # index directories not opened for this long are removed when another is built


def _forget_unused(base: Path, keep: Path) -> None:
    now = time.time()
    for d in base.iterdir():
        meta = d / META
        if d != keep and d.is_dir() and meta.exists() and now - meta.stat().st_mtime > UNUSED_S:
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed %s: not used for %.0f days", d, UNUSED_S / 86400)


def _write_arrays(open_file: Callable[[], Any], metadata: Any, columns: list[str], spec: _Spec, tmp: Path,
                  threads: int) -> None:
    """The arrays of ``spec`` as ``.npy`` files in ``tmp``: laid out at their full length first, then each row group
    of the parquet file (``metadata``; ``open_file`` opens it) converted by one of ``threads`` threads, each with its
    own handle, and written at its rows' place."""
    import pyarrow.parquet as pq

    n = metadata.num_rows
    starts = np.concatenate([[0], np.cumsum([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])])
    dtypes = {name: np.dtype(dtype) for name, dtype in spec.dtypes().items()}
    fds: dict[str, tuple[int, int]] = {}  # name -> (fd, bytes before row 0)
    handles: list[Any] = []
    local = threading.local()

    def convert(g: int) -> None:
        if not hasattr(local, "pf"):
            handles.append(open_file())
            local.pf = pq.ParquetFile(handles[-1], metadata=metadata, read_dictionary=CODED)
        row = int(starts[g])
        for batch in local.pf.iter_batches(batch_size=1 << 18, row_groups=[g], columns=columns, use_threads=False):
            for name, a in _convert(batch, spec).items():
                fd, head = fds[name]
                _pwrite_all(fd, np.ascontiguousarray(a).data.cast("B"), head + row * dtypes[name].itemsize)
            row += batch.num_rows

    try:
        for name, dtype in dtypes.items():
            with open(tmp / f"{name}.npy", "wb") as fh:
                np.lib.format.write_array_header_1_0(fh, {"descr": dtype.str, "fortran_order": False, "shape": (n,)})
                head = fh.tell()
            fd = os.open(tmp / f"{name}.npy", os.O_RDWR)
            fds[name] = (fd, head)
            os.ftruncate(fd, head + n * dtype.itemsize)
        with ThreadPoolExecutor(threads, thread_name_prefix="m3leo-index") as pool:
            for done in pool.map(convert, range(metadata.num_row_groups)):
                del done
    finally:
        for fd, _ in fds.values():
            os.close(fd)
        for h in handles:
            h.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def node_arrays(index: IndexArrays, name: str, build: Callable[[], tuple[Mapping[str, np.ndarray], dict[str, Any]]],
                drop: Callable[[str], bool] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays derived from ``index`` (and JSON-able facts about them), computed once per node: the first process to
    ask runs ``build`` and publishes its result as ``.npy`` files in ``<index directory>/derived/<name>/``, and every
    process maps those, so a node holds them once, in its page cache. ``name`` must fingerprint whatever the result
    depends on besides the index. ``drop``: the names of other derived directories the builder removes (e.g. the
    plans of past epochs; a process still mapping one keeps its pages). Built in memory when the index is not
    mapped or the directory cannot be written."""
    if index.source is None:
        arrays, facts = build()
        return dict(arrays), facts
    final = Path(index.source) / "derived" / name

    def write(tmp: Path) -> None:
        arrays, facts = build()
        for k, v in arrays.items():
            np.save(tmp / f"{k}.npy", np.ascontiguousarray(v))
        (tmp / META).write_text(json.dumps({"arrays": list(arrays), "facts": facts}))
        del arrays
        give_back_memory(collect=False)
        if drop is not None:
            for d in final.parent.iterdir():
                if d.is_dir() and d.name != name and "." not in d.name and drop(d.name):
                    shutil.rmtree(d, ignore_errors=True)

    try:
        _publish_once(final, write)
        meta = json.loads((final / META).read_text())
        return {k: np.load(final / f"{k}.npy", mmap_mode="r") for k in meta["arrays"]}, meta["facts"]
    except OSError as e:
        log.warning("cannot keep %s in %s (%s); holding it in memory", name, final.parent, e)
        arrays, facts = build()
        return dict(arrays), facts


def open_index(path: str) -> IndexArrays:
    """Map the index arrays published in ``path`` by :func:`load_index`."""
    p = Path(path)
    meta = json.loads((p / META).read_text())
    m = meta["spec"]
    spec = _Spec(tuple(m["modalities"]), tuple(m["region_names"]), tuple(m["split_names"]), tuple(m["shard_names"]),
                 tuple(m["columns"]), int(m["key_width"]), str(m["int_dtype"]))
    arrays = {name: np.load(p / f"{name}.npy", mmap_mode="r") for name in spec.dtypes()}
    short = [name for name, a in arrays.items() if len(a) != meta["rows"]]
    if short:
        raise ValueError(f"{path}: {short} do not hold {meta['rows']} rows (delete the directory to rebuild it)")
    sizes = np.load(p / "shard_bytes.npy")
    try:
        os.utime(p / META)  # in use (see _forget_unused)
    except OSError:
        pass
    return _assemble(arrays, spec, dict(zip(spec.shard_names, sizes.tolist())), source=str(p))
