"""Reading the upstream hub layout: which regions a source holds, their splits, chips and per-modality files.

A source is a local directory or fsspec URL holding one or more regions, either directly
(``SRC/<aoi>_partitions_aschips_<hash>_splits_*.csv`` next to its data folder) or one folder per region repository
(``SRC/<aoi>/...``, as after downloading several hub repositories side by side). Each data folder holds either one
``<identifier>.tif|.nc`` per chip or the parquet-packed release (``<parquet_identifier>.zstd.parquet``), detected
per folder.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec

from m3leo_stream.modalities import Modality, Registry
from m3leo_stream.storage import is_local, join
from shard_tools import grid

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)
SPLIT_VALUES = ("train", "val", "test")
EXAMPLES = 5
SKIPPED_EXT = "skipped"
"""``<identifier>.skipped``: a text file sartiles leaves where it could not make a chip (the reason inside)."""


@dataclass(frozen=True)
class FileRef:
    """Where one chip's file for one modality lives: a plain file, or a row of a parquet file."""

    path: str  # file path, or the parquet file path
    folder: str
    row_group: int = -1
    row: int = -1
    size: int = 0

    @property
    def in_parquet(self) -> bool:
        return self.row_group >= 0


@dataclass
class Discrepancies:
    """Non-fatal differences between split files and data folders, with counts and a few examples."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < EXAMPLES:
            ex.append(example)

    def merge(self, other: Discrepancies) -> None:
        for k, n in other.counts.items():
            self.counts[k] += n
            ex = self.examples.setdefault(k, [])
            ex += other.examples.get(k, [])[: max(0, EXAMPLES - len(ex))]

    def to_json(self) -> dict[str, Any]:
        return {k: {"count": n, "examples": self.examples.get(k, [])} for k, n in sorted(self.counts.items())}


@dataclass
class RegionSource:
    """One region of a source: its split csv, data folder and (optional) chip geojson."""

    aoi: str
    grid_hash: str
    repo: str  # folder holding the csv, geojson and data folder
    split_csv: str
    parquet_csv: str | None
    geojson: str | None

    @property
    def stem(self) -> str:
        return grid.region_stem(self.aoi, self.grid_hash)

    @property
    def data_dir(self) -> str:
        return join(self.repo, self.stem)


@dataclass
class RegionCatalog:
    """Chips of one region with their split, centre, bounds and files per modality."""

    source: RegionSource
    splits: dict[str, str]
    chips: dict[str, grid.Chip]
    files: dict[str, dict[str, FileRef]]  # modality → identifier → file
    folders: dict[str, str]  # modality → chosen folder
    discrepancies: Discrepancies
    invalid: dict[str, str]  # identifier → reason (e.g. duplicate split rows)


def discover_regions(fs: fsspec.AbstractFileSystem, root: str,
                     regions: Sequence[str] | None = None) -> list[RegionSource]:
    """Find every region under ``root`` (directly or one folder down), optionally restricted to ``regions``."""
    candidates = fs.glob(join(root, "*_splits_*.csv")) + fs.glob(join(root, "*", "*_splits_*.csv"))
    found: dict[str, RegionSource] = {}
    parquet_csvs: dict[str, str] = {}
    for path in sorted(candidates):
        name = path.rsplit("/", 1)[-1]
        m = grid.SPLIT_CSV_RE.fullmatch(name)
        if not m:
            continue
        aoi = m.group("aoi")
        repo = path.rsplit("/", 1)[0]
        if m.group("suffix") == "_parquet":
            parquet_csvs[aoi] = path
            if aoi in found:
                continue
        if aoi in found and m.group("suffix") is None and found[aoi].split_csv.endswith("_parquet.csv"):
            found[aoi].split_csv = path
            continue
        if aoi in found:
            if found[aoi].repo != repo:
                raise ValueError(f"region {aoi} appears twice in {root}: {found[aoi].repo} and {repo}")
            continue
        geo = join(repo, f"{m.group('stem')}.geojson")
        mini = join(repo, f"{m.group('stem')}_miniset.geojson")
        geojson = geo if fs.exists(geo) else (mini if fs.exists(mini) else None)
        found[aoi] = RegionSource(aoi, m.group("hash"), repo, path, None, geojson)
    for aoi, path in parquet_csvs.items():
        found[aoi].parquet_csv = path
    if regions:
        missing = [r for r in regions if r not in found]
        if missing:
            raise FileNotFoundError(f"regions {missing} not found under {root} (found: {sorted(found) or 'none'})")
        return [found[r] for r in regions]
    if not found:
        raise FileNotFoundError(f"no M3LEO region (a '*_partitions_aschips_*_splits_*.csv' file) under {root}")
    return [found[k] for k in sorted(found)]


def read_splits(fs: fsspec.AbstractFileSystem, path: str, disc: Discrepancies) -> tuple[dict[str, str], dict[str, str]]:
    """identifier → split, and identifier → reason for invalid rows (duplicates, unknown split values)."""
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "identifier" not in reader.fieldnames or "split" not in reader.fieldnames:
        raise ValueError(f"{path}: split csv needs 'identifier' and 'split' columns (has {reader.fieldnames})")
    splits: dict[str, str] = {}
    invalid: dict[str, str] = {}
    for lineno, row in enumerate(reader, start=2):
        ident = (row["identifier"] or "").strip()
        split = (row["split"] or "").strip()
        if not ident:
            invalid[f"<line {lineno}>"] = f"{path} line {lineno}: empty identifier"
            continue
        if split not in SPLIT_VALUES:
            invalid[ident] = f"{path} line {lineno}: split {split!r} is not one of {SPLIT_VALUES}"
            continue
        if ident in splits or ident in invalid:
            invalid[ident] = f"{path} line {lineno}: duplicate identifier {ident}"
            splits.pop(ident, None)
            continue
        splits[ident] = split
    return splits, invalid


def choose_folders(
    folders: Sequence[str], registry: Registry, wanted: Sequence[Modality], year: int | None,
    overrides: Mapping[str, str], disc: Discrepancies, where: str,
) -> dict[str, str]:
    """modality → the data folder to read it from (year-bearing folders pick ``year``, else the latest)."""
    by_mod: dict[str, list[tuple[str, re.Match[str]]]] = {}
    for f in folders:
        m = registry.for_folder(f)
        if m is None:
            disc.add("unknown_dataset_folders", f"{where}/{f}")
            continue
        by_mod.setdefault(m.name, []).append((f, m.match_folder(f)))  # type: ignore[arg-type]
    chosen: dict[str, str] = {}
    for m in wanted:
        if m.name in overrides:
            if overrides[m.name] not in folders:
                raise FileNotFoundError(f"{where}: folder {overrides[m.name]!r} for {m.name} does not exist")
            chosen[m.name] = overrides[m.name]
            continue
        cands = sorted(by_mod.get(m.name, []), key=lambda x: x[0])
        if not cands:
            disc.add("modality_folder_missing", f"{where}: {m.name}")
            continue
        if "year" in m.folder_pattern:
            same = [c for c in cands if year is not None and c[1].group("year") == str(year)]
            pick = same[0] if same else max(cands, key=lambda c: c[1].group("year"))
        else:
            pick = cands[0]
        chosen[m.name] = pick[0]
    return chosen


def catalog_region(
    fs: fsspec.AbstractFileSystem,
    src: RegionSource,
    registry: Registry,
    wanted: Sequence[Modality],
    year: int | None = 2020,
    folder_overrides: Mapping[str, str] | None = None,
) -> RegionCatalog:
    """List a region: splits, chip geometry, and which file holds each chip's modality."""
    disc = Discrepancies()
    splits, invalid = read_splits(fs, src.split_csv, disc)
    for ident, reason in invalid.items():
        disc.add("invalid_split_rows", reason)
    chips: dict[str, grid.Chip] = {}
    if src.geojson:
        with fs.open(src.geojson, "rb") as f:
            chips = grid.read_geojson_chips(f.read())
    else:
        disc.add("no_chip_geojson", src.repo)
    data_dir = src.data_dir
    if not fs.exists(data_dir):
        raise FileNotFoundError(f"region {src.aoi}: data folder {data_dir} does not exist")
    folders = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(data_dir, detail=False) if fs.isdir(p))
    chosen = choose_folders(folders, registry, wanted, year, folder_overrides or {}, disc, src.aoi)
    files: dict[str, dict[str, FileRef]] = {}
    for name, folder in chosen.items():
        m = registry[name]
        files[name] = _list_folder(fs, join(data_dir, folder), folder, m, disc, src.aoi)
    # split rows without any file, files without split rows
    have_any = set().union(*(set(v) for v in files.values())) if files else set()
    for ident in sorted(set(splits) - have_any):
        disc.add("split_rows_without_files", f"{src.aoi}/{ident}")
    for ident in sorted(have_any - set(splits) - set(invalid)):
        disc.add("files_without_split_rows", f"{src.aoi}/{ident}")
    for name, fmap in files.items():
        lacking = [i for i in splits if i in have_any and i not in fmap]
        for ident in lacking:
            disc.add(f"chips_lacking_{name}", f"{src.aoi}/{ident}")
    return RegionCatalog(src, splits, chips, files, chosen, disc, invalid)


def _list_folder(fs, path: str, folder: str, m: Modality, disc: Discrepancies, aoi: str) -> dict[str, FileRef]:
    entries = fs.ls(path, detail=True)
    out: dict[str, FileRef] = {}
    parquet = [e for e in entries if e["name"].endswith(".parquet")]
    if parquet:
        for e in sorted(parquet, key=lambda e: e["name"]):
            out.update(_index_parquet(fs, e["name"], folder, m, disc, aoi))
        return out
    return chip_files(entries, folder, m, disc, aoi)


def chip_files(entries: Sequence[Mapping[str, Any]], folder: str, m: Modality, disc: Discrepancies,
               aoi: str) -> dict[str, FileRef]:
    """identifier → file of a plain data folder's listing (``fs.ls(detail=True)`` entries), others counted."""
    out: dict[str, FileRef] = {}
    for e in sorted(entries, key=lambda e: e["name"]):
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        stem = chip_stem(name, m, disc, f"{aoi}/{folder}/{name}")
        if stem is not None:
            out[stem] = FileRef(e["name"], folder, size=int(e.get("size") or 0))
    return out


def chip_stem(name: str, m: Modality, disc: Discrepancies, where: str) -> str | None:
    """The identifier of a chip file's name, or None (counted) for sartiles' ``.skipped`` markers and other files."""
    stem, _, ext = name.rpartition(".")
    if ext == SKIPPED_EXT and stem:
        disc.add("exporter_skipped_chips", where)
        return None
    if ext != m.file_ext or not stem:
        disc.add("unexpected_files", where)
        return None
    return stem


def _index_parquet(fs, path: str, folder: str, m: Modality, disc: Discrepancies, aoi: str) -> dict[str, FileRef]:
    """Read only the ``path`` column of a packed parquet file, row group by row group."""
    stats = ReadStats()
    out: dict[str, FileRef] = {}
    with _CountingFile(open_source(fs, path), stats) as f:
        pf = parquet_file(f)
        if "path" not in pf.schema_arrow.names or "content" not in pf.schema_arrow.names:
            raise ValueError(f"{path}: parquet release files need 'path' and 'content' columns "
                             f"(has {pf.schema_arrow.names})")
        for rg in range(pf.num_row_groups):
            paths = pf.read_row_group(rg, columns=["path"], use_threads=False).column("path").to_pylist()
            for row, p in enumerate(paths):
                name = str(p).rsplit("/", 1)[-1]
                stem = chip_stem(name, m, disc, f"{aoi}/{folder}/{name} in {path}")
                if stem is None:
                    continue
                if stem in out:
                    disc.add("duplicate_parquet_rows", f"{aoi}/{folder}/{name}")
                    continue
                out[stem] = FileRef(path, folder, rg, row)
    stats.index_bytes, stats.index_requests = stats.parquet_bytes, stats.parquet_requests
    stats.parquet_bytes = stats.parquet_requests = 0
    READ_TOTALS.merge(stats)
    return out


# ------------------------------------------------------------------ reading source files

PENDING_LIMIT = 256 * 2**20
"""Bytes of parquet rows a :class:`SourceReader` keeps for later chips of its shard before it drops the oldest
row group's (they are read again when asked for)."""


@dataclass
class ReadStats:
    """What reading the source cost: bytes and requests taken from its files, and the parquet reader's cache."""

    parquet_bytes: int = 0  # read from parquet files for their content (footers and ``content`` column chunks)
    parquet_requests: int = 0
    index_bytes: int = 0  # read from parquet files while listing them (footers and ``path`` column chunks)
    index_requests: int = 0
    file_bytes: int = 0  # plain files read into memory (remote sources; a local file is handed over as its path)
    parquet_files_opened: int = 0
    row_groups_read: int = 0
    row_group_rereads: int = 0  # row groups read again for the same reader (its kept rows were dropped)
    peak_pending_bytes: int = 0  # the most bytes of rows kept for later chips at once
    peak_row_groups_per_file: int = 0  # the most row groups of one parquet file with rows kept at once
    _PEAKS = ("peak_pending_bytes", "peak_row_groups_per_file")

    def merge(self, other: ReadStats) -> None:
        with _TOTALS_LOCK:
            for k, v in other.to_json().items():
                setattr(self, k, max(getattr(self, k), v) if k in self._PEAKS else getattr(self, k) + v)

    def reset(self) -> None:
        with _TOTALS_LOCK:
            for k in self.to_json():
                setattr(self, k, 0)

    def to_json(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}


_TOTALS_LOCK = threading.Lock()
READ_TOTALS = ReadStats()
"""This process's sum over every closed :class:`SourceReader` and every parquet file listed (``build`` with one
worker reads in this process; with more, each worker process keeps its own)."""


def open_source(fs: fsspec.AbstractFileSystem, path: str):
    """A source file opened for exact range reads: no fsspec read-ahead (its default fetches a block of up to
    50 MB past every read from an object store, i.e. up to a whole parquet file for one column chunk)."""
    if is_local(fs):
        return fs.open(path, "rb")
    return fs.open(path, "rb", cache_type="none")


def parquet_file(f):
    import pyarrow.parquet as pq

    # no pre-buffering: each column chunk is one read of exactly its bytes
    return pq.ParquetFile(f, pre_buffer=False, buffer_size=0)


class _CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes taken from the source: at the store for fsspec's buffered (remote)
    files, whatever their cache fetches, else the bytes its reads return."""

    def __init__(self, f, stats: ReadStats):
        super().__init__()
        self._f = f
        self._stats = stats
        cache: Any = getattr(f, "cache", None)  # fsspec's read-ahead cache of the file, if it has one
        self._at_store = cache is not None and callable(getattr(cache, "fetcher", None))
        if self._at_store:
            fetch = cache.fetcher

            def counted(start: int, end: int) -> bytes:
                data = fetch(start, end)
                self._count(len(data))
                return data

            cache.fetcher = counted

    def _count(self, n: int) -> None:
        self._stats.parquet_bytes += n
        self._stats.parquet_requests += 1

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        if not self._at_store:
            self._count(len(data))
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class _OpenParquet:
    """One parquet file of the source: its open file, its footer, and the rows kept per row group."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, stats: ReadStats):
        self.file = _CountingFile(open_source(fs, path), stats)
        try:
            self.pf = parquet_file(self.file)
            self.content = self.pf.schema_arrow.get_field_index("content")
            if self.content < 0:
                raise ValueError(f"{path}: no 'content' column (has {self.pf.schema_arrow.names})")
        except BaseException:
            self.file.close()
            raise
        self.kept: dict[int, dict[int, bytes | None]] = {}  # row group → row → content, in the order read

    def read_content(self, rg: int) -> Any:
        """The ``content`` column of one row group (only its column chunk is read)."""
        return self.pf.read_row_group(rg, columns=["content"], use_threads=False).column(0)

    def close(self) -> None:
        self.kept.clear()
        self.file.close()


class SourceReader:
    """Reads chip files' bytes. Parquet files stay open (one file and footer each) and each row group's ``content``
    column chunk is read once: of the rows it holds, those still wanted (``refs``, the files its shard will ask
    for) are kept until they are asked for; the rest are dropped at once. A file is closed when all its wanted rows
    were served. Read in an order that follows the parquet files' rows (each file's row groups one after another),
    at most one row group per file has rows kept; in another order the rows kept stay within ``pending_limit``
    bytes (beyond it the oldest row group's are dropped, to be read again). Without ``refs``, each file keeps the
    rows of the row group last read. Not thread-safe: one reader serves one shard, sequentially."""

    def __init__(self, fs: fsspec.AbstractFileSystem, refs: Sequence[FileRef] | None = None,
                 pending_limit: int = PENDING_LIMIT):
        self.fs = fs
        self.stats = ReadStats()
        self.pending_limit = pending_limit
        self._planned = refs is not None
        self._wanted: dict[tuple[str, int], set[int]] = {}  # (path, row group) → rows not served yet
        self._wanted_in: Counter = Counter()  # path → rows not served yet
        for ref in refs or ():
            rows = self._wanted.setdefault((ref.path, ref.row_group), set()) if ref.in_parquet else None
            if rows is not None and ref.row not in rows:
                rows.add(ref.row)
                self._wanted_in[ref.path] += 1
        self._files: dict[str, _OpenParquet] = {}
        self._kept_order: dict[tuple[str, int], None] = {}  # (path, row group) with rows kept, oldest first
        self._read: set[tuple[str, int]] = set()
        self._pending_bytes = 0
        self._closed = False

    def read(self, ref: FileRef) -> bytes | str:
        """The file's bytes; a plain local file is returned as its path so decoders read it directly."""
        if not ref.in_parquet and is_local(self.fs):
            if not os.path.isfile(ref.path):
                raise FileNotFoundError(ref.path)
            return ref.path
        if not ref.in_parquet:
            with self.fs.open(ref.path, "rb") as f:
                data = f.read()
            self.stats.file_bytes += len(data)
            return data
        content = self._row(ref)
        if content is None:
            raise ValueError(f"{ref.path} row group {ref.row_group} row {ref.row}: empty content")
        return content

    def _row(self, ref: FileRef) -> bytes | None:
        if self._closed:
            raise ValueError("SourceReader is closed")
        key = (ref.path, ref.row_group)
        pq_file = self._files.get(ref.path)
        if pq_file is None:
            pq_file = self._files[ref.path] = _OpenParquet(self.fs, ref.path, self.stats)
            self.stats.parquet_files_opened += 1
        kept = pq_file.kept.get(ref.row_group)
        if kept is None or ref.row not in kept:
            kept = self._load(pq_file, key, ref.row)
        content = kept.pop(ref.row)
        self._pending_bytes -= len(content or b"")
        if not kept:
            self._drop(pq_file, key)
        wanted = self._wanted.get(key)
        if wanted is not None and ref.row in wanted:
            wanted.discard(ref.row)
            self._wanted_in[ref.path] -= 1
            if not wanted:
                del self._wanted[key]
        if self._planned and self._wanted_in[ref.path] <= 0 and not pq_file.kept:
            del self._files[ref.path]
            pq_file.close()
        return content

    def _load(self, pq_file: _OpenParquet, key: tuple[str, int], row: int) -> dict[int, bytes | None]:
        path, rg = key
        col = pq_file.read_content(rg)
        self.stats.row_groups_read += 1
        if key in self._read:
            self.stats.row_group_rereads += 1
        self._read.add(key)
        if row >= len(col):
            raise IndexError(f"{path} row group {rg} has {len(col)} rows, not row {row}")
        if not self._planned:  # keep this row group's rows only
            for other in list(pq_file.kept):
                self._drop(pq_file, (path, other))
            rows: Sequence[int] = range(len(col))
        else:
            self._drop(pq_file, key)  # rows kept from an earlier read of it are read again here
            rows = sorted({r for r in self._wanted.get(key, ()) if r < len(col)} | {row})
        kept = {r: col[r].as_py() for r in rows}
        del col
        pq_file.kept[rg] = kept
        self._kept_order[key] = None
        self._pending_bytes += sum(len(v or b"") for v in kept.values())
        self.stats.peak_pending_bytes = max(self.stats.peak_pending_bytes, self._pending_bytes)
        self.stats.peak_row_groups_per_file = max(self.stats.peak_row_groups_per_file, len(pq_file.kept))
        self._shed(key)
        return kept

    def _shed(self, keep: tuple[str, int]) -> None:
        """Drop the oldest kept row groups' rows (but ``keep``'s) while more than ``pending_limit`` bytes are kept."""
        while self._pending_bytes > self.pending_limit:
            oldest = next((k for k in self._kept_order if k != keep), None)
            if oldest is None:
                return
            self._drop(self._files[oldest[0]], oldest)

    def _drop(self, pq_file: _OpenParquet, key: tuple[str, int]) -> None:
        self._kept_order.pop(key, None)
        dropped = pq_file.kept.pop(key[1], None)
        if dropped:
            self._pending_bytes -= sum(len(v or b"") for v in dropped.values())

    def close(self) -> None:
        """Close the open parquet files, drop the rows kept, and add this reader's figures to ``READ_TOTALS``."""
        if self._closed:
            return
        self._closed = True
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._kept_order.clear()
        self._pending_bytes = 0
        READ_TOTALS.merge(self.stats)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
