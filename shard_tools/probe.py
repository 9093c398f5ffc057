"""``m3leo-shards probe``: check a source before a long build.

Samples a few files of every dataset folder of every region, decodes them exactly as ``build`` does, and reports per
folder what the build would do with it: ``stored as is``, ``converted`` (by which source encoding of the registry),
``will fail`` (and why), ``unknown folder`` or, for sartiles' ``.skipped`` files, ``ignored``. Only the sampled files
are read (for the parquet release: the ``path`` column and the ``content`` of the row groups holding them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from m3leo_stream.modalities import REGISTRY, Modality, Registry, is_nan, load_user_modalities
from m3leo_stream.storage import get_fs, join
from shard_tools import hub
from shard_tools.build import OnError
from shard_tools.encoding import EmptyMember, to_stored
from shard_tools.rasters import ChipDataError, decode_chip_file

Verdict = Literal["stored as is", "converted", "will fail", "unknown folder", "no files", "empty"]


@dataclass
class FileReport:
    """What one sampled file holds and what the build does with it."""

    file: str
    verdict: str
    detail: str
    dtype: str | None = None
    bands: int | None = None
    descriptions: list[str | None] = field(default_factory=list)
    shape: list[int] | None = None
    nodata: float | int | str | None = None
    mask: bool = False
    min: float | None = None
    max: float | None = None
    zero_fraction: float | None = None
    nan_fraction: float | None = None
    missing_bands: list[str] = field(default_factory=list)
    encoding: str | None = None
    resampling: str | None = None


@dataclass
class FolderReport:
    region: str
    folder: str
    modality: str | None
    chosen: bool  # the folder a build with the same arguments reads
    files: int
    skipped_markers: int
    verdict: str
    detail: str
    samples: list[FileReport]

    def to_json(self) -> dict[str, Any]:
        return {k: ([s.__dict__ for s in v] if k == "samples" else v) for k, v in self.__dict__.items()}


@dataclass
class ProbeConfig:
    src: str
    per_folder: int = 5
    regions: list[str] | None = None
    modalities_yaml: str | None = None
    year: int | None = 2020
    folders: dict[str, str] = field(default_factory=dict)
    gunw_pair_rule: str = "longest"
    on_error: OnError = "fail"
    storage_options: dict[str, Any] | None = None


def _spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over a sorted sequence (first and last included): deterministic and varied."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else [items[0]]


def _describe(m: Modality, data: bytes | str) -> dict[str, Any]:
    """The file's own metadata, as a user would read it with rasterio or netCDF4."""
    if m.file_ext == "tif":
        from shard_tools.rasters import _open_tif, has_mask_band

        stack, src = _open_tif(data)
        with stack:
            masked = has_mask_band(src, range(src.count))
            return {"dtype": src.dtypes[0], "bands": src.count, "descriptions": list(src.descriptions),
                    "shape": [src.count, src.height, src.width], "nodata": src.nodata, "mask": masked}
    import netCDF4

    with (netCDF4.Dataset(data) if isinstance(data, str) else netCDF4.Dataset("probe.nc", memory=data)) as ds:
        grp = ds[m.nc_group] if m.nc_group else ds
        names = [v.name for v in m.nc_variables if v.name in grp.variables]
        vs = [grp.variables[n] for n in names]
        return {"dtype": ",".join(sorted({str(v.dtype) for v in vs})) or None,
                "bands": len(names), "descriptions": [f"{v.name}{tuple(v.dimensions)}" for v in vs],
                "shape": list(vs[0].shape) if vs else None,
                "nodata": (_num(getattr(vs[0], "_FillValue", None)) if vs else None), "mask": False}


def _num(x: Any) -> float | int | str | None:
    if x is None:
        return None
    v = np.asarray(x).item()
    return "nan" if is_nan(v) else v


def probe_file(m: Modality, data: bytes | str, where: str, chip: str, options: Mapping[str, Any]) -> FileReport:
    """Decode one file as the build does and say what becomes of it."""
    try:
        meta = _describe(m, data)
    except Exception as e:  # noqa: BLE001 - reported as the file's verdict
        return FileReport(where, "will fail", f"unreadable {m.file_ext} file: {e}")
    rep = FileReport(where, "", "", **{**meta, "nodata": _num(meta["nodata"])})
    try:
        dec = decode_chip_file(m, data, where, chip, options)
    except ChipDataError as e:
        rep.verdict, rep.detail = "will fail", e.what
        return rep
    a = dec.array
    finite = a[~np.isnan(a)] if a.dtype.kind == "f" else a
    if finite.size:
        rep.min, rep.max = float(finite.min()), float(finite.max())
    rep.zero_fraction = float((a == 0).mean())
    rep.nan_fraction = float(np.isnan(a).mean()) if a.dtype.kind == "f" else 0.0
    try:
        stored = to_stored(m, dec, where, chip)
    except EmptyMember:
        rep.verdict, rep.detail = "empty", "every pixel is nodata: the chip is kept without this member"
        return rep
    except ChipDataError as e:
        rep.verdict, rep.detail = "will fail", e.what
        return rep
    rep.missing_bands = stored.missing_bands
    enc = stored.encoding
    rep.encoding = enc.name
    same = enc.is_identity and np.dtype(enc.dtype) == m.np_dtype
    rep.verdict = "stored as is" if same else "converted"
    rep.detail = f"{enc.name}: {enc.description}" if enc.description else enc.name
    if stored.resampling:
        rep.resampling = f"resampled {'x'.join(map(str, a.shape[-2:]))} -> {m.canonical_px}^2 ({stored.resampling})"
    return rep


def _sample_refs(fs, data_dir: str, folder: str, m: Modality, n: int) -> tuple[list[hub.FileRef], int, int]:
    """Up to ``n`` files of a folder, the number of chip files and of ``.skipped`` markers (named as ``build`` names
    them). Parquet folders: the ``path`` column of one row group per sampled parquet file only."""
    entries = fs.ls(join(data_dir, folder), detail=True)
    parquet = sorted(e["name"] for e in entries if e["name"].endswith(".parquet"))
    disc = hub.Discrepancies()
    if not parquet:
        files = hub.chip_files(entries, folder, m, disc, "")
        return _spread(list(files.values()), n), len(files), disc.counts["exporter_skipped_chips"]
    refs: list[hub.FileRef] = []
    rows = 0
    per_file = _spread(parquet, n)
    for i, path in enumerate(per_file):
        with hub.open_source(fs, path) as f:
            pf = hub.parquet_file(f)
            rows += pf.metadata.num_rows
            rg = (i * 7919) % pf.num_row_groups
            paths = [str(p) for p in pf.read_row_group(rg, columns=["path"]).column("path").to_pylist()]
        want = max(1, n // len(per_file)) + (1 if i < n % len(per_file) else 0)
        chips = [r for r, p in enumerate(paths) if hub.chip_stem(p.rsplit("/", 1)[-1], m, disc, p) is not None]
        refs += [hub.FileRef(path, folder, rg, r) for r in _spread(chips, want)]
    return refs[:n], rows, disc.counts["exporter_skipped_chips"]


def _folder_verdict(samples: list[FileReport]) -> tuple[str, str]:
    if not samples:
        return "no files", "no chip file to sample"
    verdicts = Counter(s.verdict for s in samples)
    if verdicts["will fail"]:
        bad = next(s for s in samples if s.verdict == "will fail")
        return "will fail", f"{verdicts['will fail']} of {len(samples)} sampled: {bad.file}: {bad.detail}"
    kinds = sorted({s.detail for s in samples if s.verdict in ("converted", "stored as is")})
    main = "converted" if verdicts["converted"] else ("stored as is" if verdicts["stored as is"] else "empty")
    detail = " | ".join(kinds) if kinds else samples[0].detail
    resampled = sorted({s.resampling for s in samples if s.resampling})
    if resampled:
        detail += "; " + ", ".join(resampled)
    if verdicts["empty"]:
        detail += f" ({verdicts['empty']} sampled file(s) all nodata)"
    return main, detail


def probe(cfg: ProbeConfig) -> list[FolderReport]:
    """Reports for every dataset folder of every region of ``cfg.src``."""
    registry: Registry = load_user_modalities(cfg.modalities_yaml) if cfg.modalities_yaml else REGISTRY
    fs, root = get_fs(cfg.src, cfg.storage_options or {})
    reader = hub.SourceReader(fs)
    options = {"year": cfg.year, "pair_rule": cfg.gunw_pair_rule}
    out: list[FolderReport] = []
    for rsrc in hub.discover_regions(fs, root, cfg.regions):
        data_dir = rsrc.data_dir
        if not fs.exists(data_dir):
            raise FileNotFoundError(f"region {rsrc.aoi}: data folder {data_dir} does not exist")
        folders = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(data_dir, detail=False) if fs.isdir(p))
        chosen = hub.choose_folders(folders, registry, list(registry.values()), cfg.year, cfg.folders,
                                    hub.Discrepancies(), rsrc.aoi)
        for folder in folders:
            m = registry.for_folder(folder)
            if m is None:
                out.append(FolderReport(rsrc.aoi, folder, None, False, 0, 0, "unknown folder",
                                        "no registry modality matches this folder; build ignores it", []))
                continue
            refs, n_files, n_skipped = _sample_refs(fs, data_dir, folder, m, cfg.per_folder)
            samples = []
            for ref in refs:
                where = ref.path if not ref.in_parquet else f"{ref.path}#rowgroup={ref.row_group},row={ref.row}"
                chip = ref.path.rsplit("/", 1)[-1].split(".")[0] if not ref.in_parquet else f"row {ref.row}"
                try:
                    data = reader.read(ref)
                except Exception as e:  # noqa: BLE001 - reported as the file's verdict
                    samples.append(FileReport(where, "will fail", f"unreadable: {e}"))
                    continue
                samples.append(probe_file(m, data, where, chip, options))
            verdict, detail = _folder_verdict(samples)
            if n_skipped:
                detail += f"; {n_skipped} '.skipped' file(s) ignored (chips the exporter could not make)"
            out.append(FolderReport(rsrc.aoi, folder, m.name, chosen.get(m.name) == folder, n_files, n_skipped,
                                    verdict, detail, samples))
    close = getattr(reader, "close", None)
    if close is not None:
        close()
    return out


def build_would_fail(reports: Sequence[FolderReport], on_error: OnError) -> bool:
    """Whether ``build`` with the same arguments stops: a folder it reads has a file it cannot store."""
    return on_error == "fail" and any(r.chosen and r.verdict == "will fail" for r in reports)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def format_table(reports: Sequence[FolderReport]) -> str:
    """One line per folder and one per sampled file, grouped by region."""
    lines: list[str] = []
    for region in dict.fromkeys(r.region for r in reports):
        lines.append(f"region {region}")
        head = ("folder", "modality", "files", "dtype", "bands", "shape", "nodata", "range", "zero", "NaN", "verdict")
        rows = [head]
        for r in (x for x in reports if x.region == region):
            s0 = r.samples[0] if r.samples else None
            lo = min((s.min for s in r.samples if s.min is not None), default=None)
            hi = max((s.max for s in r.samples if s.max is not None), default=None)
            zero = [s.zero_fraction for s in r.samples if s.zero_fraction is not None]
            nan = [s.nan_fraction for s in r.samples if s.nan_fraction is not None]
            rows.append((
                r.folder + ("" if r.chosen or r.modality is None else " (not read)"), r.modality or "-",
                f"{r.files}" + (f"+{r.skipped_markers} skipped" if r.skipped_markers else ""),
                s0.dtype or "" if s0 else "", str(s0.bands) if s0 and s0.bands is not None else "",
                "x".join(map(str, s0.shape)) if s0 and s0.shape else "",
                "mask" if s0 and s0.mask else (str(s0.nodata) if s0 and s0.nodata is not None else ""),
                f"{_fmt(lo)}..{_fmt(hi)}" if lo is not None else "",
                f"{max(zero):.0%}" if zero else "", f"{max(nan):.0%}" if nan else "", r.verdict,
            ))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        for row in rows:
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        for r in (x for x in reports if x.region == region):
            lines.append(f"  {r.folder}: {r.verdict}: {r.detail}")
            if r.samples and any(r.samples[0].descriptions):
                d = [str(x) for x in r.samples[0].descriptions]
                lines.append(f"    bands: {', '.join(d[:6])}{', ...' if len(d) > 6 else ''}")
            for s in r.samples:
                if s.verdict == "will fail":
                    lines.append(f"    {s.file}: {s.detail}")
                elif s.missing_bands:
                    lines.append(f"    {s.file}: missing bands {', '.join(s.missing_bands)}")
    return "\n".join(lines)
