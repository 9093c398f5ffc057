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
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from m3leo_stream.modalities import Modality, Registry
from m3leo_stream.storage import is_local, join
from shard_tools import grid

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


def discover_regions(fs: fsspec.AbstractFileSystem, root: str, regions: Sequence[str] | None = None) -> list[RegionSource]:
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
    for e in sorted(entries, key=lambda e: e["name"]):
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        stem, _, ext = name.rpartition(".")
        if ext == SKIPPED_EXT and stem:
            disc.add("exporter_skipped_chips", f"{aoi}/{folder}/{name}")
            continue
        if ext != m.file_ext or not stem:
            disc.add("unexpected_files", f"{aoi}/{folder}/{name}")
            continue
        out[stem] = FileRef(e["name"], folder, size=int(e.get("size") or 0))
    return out


def _index_parquet(fs, path: str, folder: str, m: Modality, disc: Discrepancies, aoi: str) -> dict[str, FileRef]:
    """Read only the ``path`` column of a packed parquet file, row group by row group."""
    import pyarrow.parquet as pq

    out: dict[str, FileRef] = {}
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if "path" not in pf.schema_arrow.names or "content" not in pf.schema_arrow.names:
            raise ValueError(f"{path}: parquet release files need 'path' and 'content' columns "
                             f"(has {pf.schema_arrow.names})")
        for rg in range(pf.num_row_groups):
            paths = pf.read_row_group(rg, columns=["path"]).column("path").to_pylist()
            for row, p in enumerate(paths):
                name = str(p).rsplit("/", 1)[-1]
                stem, _, ext = name.rpartition(".")
                if ext == SKIPPED_EXT and stem:
                    disc.add("exporter_skipped_chips", f"{aoi}/{folder}/{name} in {path}")
                    continue
                if ext != m.file_ext or not stem:
                    disc.add("unexpected_files", f"{aoi}/{folder}/{name} in {path}")
                    continue
                if stem in out:
                    disc.add("duplicate_parquet_rows", f"{aoi}/{folder}/{name}")
                    continue
                out[stem] = FileRef(path, folder, rg, row)
    return out


class SourceReader:
    """Reads chip files' bytes; keeps the last parquet row group so rows of one group are read once."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs
        self._rg_key: tuple[str, int] | None = None
        self._rg_content: list[bytes] = []

    def read(self, ref: FileRef) -> bytes | str:
        """The file's bytes; a plain local file is returned as its path so decoders read it directly."""
        if not ref.in_parquet and is_local(self.fs):
            if not os.path.isfile(ref.path):
                raise FileNotFoundError(ref.path)
            return ref.path
        if not ref.in_parquet:
            with self.fs.open(ref.path, "rb") as f:
                return f.read()
        key = (ref.path, ref.row_group)
        if key != self._rg_key:
            import pyarrow.parquet as pq

            with self.fs.open(ref.path, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(ref.row_group, columns=["content"])
            self._rg_content = table.column("content").to_pylist()
            self._rg_key = key
        content = self._rg_content[ref.row]
        if content is None:
            raise ValueError(f"{ref.path} row group {ref.row_group} row {ref.row}: empty content")
        return content
