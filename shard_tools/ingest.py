"""``m3leo-shards ingest-raster``: cut any GeoTIFF/COG (or a mosaic of them) onto a region's chip grid.

Each chip is produced by a GDAL warped VRT whose output grid *is* the chip (lon/lat, EPSG:4326, the modality's pixel
size), so only the source blocks under the chip are read — a 36000×36000 COG is never loaded whole — and any source
CRS works (UTM, geographic, compound ones such as EPSG:9707). Nodata is carried through (source nodata, or an alpha
mask where the source has none) and written as the modality's nodata; categorical layers are resampled with
nearest or mode, continuous ones with bilinear or average. Two shortcuts give the same result faster: nearest cuts
of lon/lat rasters select the source pixel under each chip pixel centre from one window (no warper), and chips with
no nodata under them are warped without validity masks. Chips outside every raster's footprint, or entirely nodata,
are left out and counted.

Everything is checked before the first chip is cut (readable rasters, a CRS, the band count and dtype against the
declared modality, overlap with the grid). Chips are written to a staging folder and published (one atomic rename or
upload per file) only when all of them succeeded, so an error leaves nothing half-written. Chip files are encoded
from a GDAL-written template (:class:`shard_tools.rasters.GeoTiffEncoder`, byte-identical to GDAL's encoding) rather
than through GDAL per chip.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from m3leo_stream.modalities import REGISTRY, Modality, Registry, load_user_modalities, nodata_mask, nodata_value
from m3leo_stream.storage import get_fs, is_local, join
from shard_tools import grid, hub
from shard_tools.inflight import bounded_map
from shard_tools.publish import fsync_path, put_atomic
from shard_tools.rasters import GeoTiffEncoder

log = logging.getLogger(__name__)
RESAMPLINGS = ("auto", "bilinear", "nearest", "average", "mode")
DST_CRS = "EPSG:4326"
GDAL_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_NUM_THREADS": "1"}
DOWNSAMPLE_AGGREGATE = 2.0  # auto picks average/mode when a chip pixel spans at least this many source pixels
NATIVE_URL = ("http://", "https://", "/vsi")


class IngestError(ValueError):
    """Ingestion refused or stopped; nothing was published."""


@dataclass
class IngestConfig:
    chips: str  # folder (or fsspec URL) holding the region's split csv, chip geojson and data folder
    rasters: list[str]
    modality: str
    modalities_file: str | None = None
    bands: list[str] | None = None
    resampling: str = "auto"
    workers: int = 1
    region: str | None = None
    folder: str | None = None
    year: int | None = None
    src_nodata: float | None = None
    compress: str | None = None  # upstream chip files are uncompressed GeoTIFFs
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


@dataclass
class RasterSource:
    """One input raster as checked before ingestion."""

    path: str
    crs: str
    bounds_lonlat: tuple[float, float, float, float]
    indexes: list[int]  # 1-based bands read, in modality order
    descriptions: list[str | None]
    dtype: str
    nodata: float | None
    pixel_m: float
    resampling: str = "nearest"
    lonlat: bool = False  # horizontal CRS is WGS 84 lon/lat (EPSG:4326, or compound with it, e.g. EPSG:9707)


# ------------------------------------------------------------------ modality and folder


def resolve_modality(name: str, modalities_file: str | None) -> Modality:
    """The modality ``name`` from the registry (extended by the YAML file), stored as GeoTIFF."""
    registry: Registry = load_user_modalities(modalities_file) if modalities_file else REGISTRY
    if name not in registry:
        raise IngestError(f"unknown modality {name!r}; known: {', '.join(registry)}. Declare it in a YAML file "
                          f"(--modalities-file), e.g.\nmodalities:\n  - name: {name}\n    bands: [b1]\n"
                          f"    dtype: float32\n    kind: continuous\n    resolution_m: 10\n    nodata: nan")
    m = registry[name]
    if m.file_ext != "tif":
        raise IngestError(f"modality {name!r} is stored as NetCDF upstream; ingest writes GeoTIFF chips: declare a "
                          f"GeoTIFF modality of your own in --modalities-file instead")
    return m


def example_folder(m: Modality, year: int | None) -> str | None:
    """A data folder name that ``m.folder_pattern`` accepts (year-bearing patterns need ``year``)."""
    pat = m.folder_pattern
    if "(?P<year>" in pat:
        if year is None:
            return None
        pat = re.sub(r"\(\?P<year>[^)]*\)", str(year), pat)
    pat = re.sub(r"\(\?:([^|)]*)(?:\|[^)]*)?\)", r"\1", pat)  # (?:a|b) → a
    pat = re.sub(r"\\(.)", r"\1", pat)
    return pat if m.match_folder(pat) else None


def choose_folder(m: Modality, folder: str | None, year: int | None) -> str:
    if folder:
        if not m.match_folder(folder):
            raise IngestError(f"--folder {folder!r} does not match modality {m.name}'s folder pattern "
                              f"{m.folder_pattern!r}; build would not find it")
        return folder
    name = example_folder(m, year)
    if name is None:
        raise IngestError(f"modality {m.name}: give --folder (pattern {m.folder_pattern!r})"
                          + (" or --year" if "(?P<year>" in m.folder_pattern else ""))
    return name


# ------------------------------------------------------------------ rasters


def _open(path: str, storage_options: dict[str, Any] | None):
    import rasterio

    if "://" not in path or path.startswith(NATIVE_URL) or path.startswith("file://"):
        return rasterio.open(path[len("file://"):] if path.startswith("file://") else path)
    fs, p = get_fs(path, storage_options)
    return rasterio.open(p, opener=fs)


def _pixel_m(src) -> float:
    """Side of a source pixel in metres (the smaller of x and y)."""
    rx, ry = abs(src.transform.a), abs(src.transform.e)
    if src.crs.is_geographic:
        lat = (src.bounds.bottom + src.bounds.top) / 2
        return min(rx * grid.M_PER_DEG_LAT * max(math.cos(math.radians(lat)), 0.01), ry * grid.M_PER_DEG_LAT)
    return min(rx, ry) * (src.crs.linear_units_factor[1] if src.crs.linear_units_factor else 1.0)


def _norm(s: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (s or "").lower())


def _select_bands(path: str, descriptions: list[str | None], count: int, bands: Sequence[str] | None) -> list[int]:
    if not bands:
        return list(range(1, count + 1))
    out = []
    normed = [_norm(d) for d in descriptions]
    for b in bands:
        if re.fullmatch(r"\d+", b):
            i = int(b)
            if not 1 <= i <= count:
                raise IngestError(f"{path}: band {i} requested, the file has bands 1..{count}")
            out.append(i)
        elif _norm(b) in normed:
            out.append(normed.index(_norm(b)) + 1)
        else:
            raise IngestError(f"{path}: no band named {b!r} (descriptions: {descriptions}); "
                              "use names from the descriptions or 1-based numbers")
    return out


def _castable(src_dtype: str, dst: np.dtype) -> bool:
    s = np.dtype(src_dtype)
    if np.can_cast(s, dst, "safe"):
        return True
    return s.kind == "f" and dst.kind == "f"  # float64 exports stored as float32


def inspect_raster(path: str, m: Modality, cfg: IngestConfig) -> RasterSource:
    """Open and check one raster against the modality; raises :class:`IngestError` naming the file."""
    import rasterio
    from rasterio.warp import transform_bounds

    try:
        with rasterio.Env(**GDAL_OPTIONS), _open(path, cfg.storage_options) as src:
            if src.crs is None:
                raise IngestError(f"{path}: has no CRS (georeferencing); cannot place it on the chip grid")
            if src.transform.b or src.transform.d:
                log.debug("%s: rotated geotransform, warped as such", path)
            descriptions = list(src.descriptions)
            indexes = _select_bands(path, descriptions, src.count, cfg.bands)
            dtypes = {src.dtypes[i - 1] for i in indexes}
            nodata = cfg.src_nodata if cfg.src_nodata is not None else src.nodata
            bounds = transform_bounds(src.crs, DST_CRS, *src.bounds, densify_pts=21)
            pixel_m = _pixel_m(src)
            crs = src.crs.to_string()
            lonlat = _is_wgs84_lonlat(src.crs) and not (src.transform.b or src.transform.d)
            # a corrupt file often opens but fails on its first block: read one small window now
            src.read(indexes[0], window=rasterio.windows.Window(0, 0, min(src.width, 16), min(src.height, 16)))
    except IngestError:
        raise
    except Exception as e:  # noqa: BLE001 - GDAL/fsspec errors of every kind mean "cannot read this raster"
        raise IngestError(f"{path}: cannot be read as a GeoTIFF: {e}") from e
    if len(indexes) != len(m.bands):
        raise IngestError(f"{path}: {len(indexes)} band(s) selected ({[descriptions[i - 1] for i in indexes]}), but "
                          f"modality {m.name} declares {len(m.bands)} ({', '.join(m.bands)}); "
                          "use --bands or fix the declaration")
    if len(dtypes) != 1:
        raise IngestError(f"{path}: selected bands have different dtypes {sorted(dtypes)}")
    dtype = dtypes.pop()
    if not _castable(dtype, m.np_dtype):
        raise IngestError(f"{path}: dtype {dtype} cannot be stored as {m.dtype} (modality {m.name}) without loss")
    sel_desc = [descriptions[i - 1] for i in indexes]
    if m.file_band_names and all(sel_desc) and [_norm(d) for d in sel_desc] != [_norm(b) for b in m.file_band_names]:
        raise IngestError(f"{path}: band descriptions {sel_desc} differ from modality {m.name}'s "
                          f"{list(m.file_band_names)}; select bands with --bands")
    west, south, east, north = (float(x) for x in bounds)
    return RasterSource(path, crs, (west, south, east, north), indexes, sel_desc, dtype, nodata, pixel_m,
                        lonlat=lonlat)


def _is_wgs84_lonlat(crs) -> bool:
    """True when the raster's horizontal CRS is WGS 84 geographic (a vertical part, as in EPSG:9707, is ignored)."""
    import pyproj

    c = pyproj.CRS.from_wkt(crs.to_wkt())
    if c.is_compound:
        c = c.sub_crs_list[0]
    return c.equals(pyproj.CRS.from_epsg(4326), ignore_axis_order=True)


def pick_resampling(choice: str, m: Modality, src_pixel_m: float) -> str:
    """auto: nearest/mode for categorical layers (mode when a chip pixel spans ≥2 source pixels), bilinear/average
    for continuous ones (average when aggregating). Refuses methods that would invent class codes."""
    categorical = m.is_categorical or bool(m.special_values)
    if choice not in RESAMPLINGS:
        raise IngestError(f"--resampling {choice!r}: use one of {', '.join(RESAMPLINGS)}")
    if choice == "auto":
        aggregate = m.resolution_m / max(src_pixel_m, 1e-9) >= DOWNSAMPLE_AGGREGATE
        if categorical:
            return "mode" if aggregate else "nearest"
        return "average" if aggregate else "bilinear"
    if categorical and choice in ("bilinear", "average"):
        raise IngestError(f"--resampling {choice} would invent values in categorical modality {m.name} "
                          "(class codes or special values); use nearest or mode")
    return choice


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------ cutting one chip


class _Readers:
    """Per-thread open datasets (GDAL handles must not be shared between threads)."""

    def __init__(self, storage_options: dict[str, Any]):
        self.local = threading.local()
        self.lock = threading.Lock()
        self.all: list[Any] = []
        self.storage_options = storage_options

    def get(self, path: str):
        d = getattr(self.local, "open", None)
        if d is None:
            d = self.local.open = {}
        if path not in d:
            ds = _open(path, self.storage_options)
            d[path] = ds
            with self.lock:
                self.all.append(ds)
        return d[path]

    def close(self) -> None:
        for ds in self.all:
            ds.close()
        self.all.clear()


def chip_pixels(chip: grid.Chip, m: Modality) -> int:
    """Side in pixels of the chip at the modality's resolution (the canonical size for 4480 m chips)."""
    size_m = (chip.bounds[3] - chip.bounds[1]) * grid.M_PER_DEG_LAT
    return max(1, int(round(size_m / m.resolution_m)))


def _tag_value(nodata: float | None, dtype: np.dtype) -> np.ndarray | None:
    """A raster's nodata tag as a value of the raster's dtype, which is how GDAL compares it; None when the raster
    has none or it is NaN."""
    return None if nodata_value(nodata) is None else np.asarray(nodata).astype(dtype)


def _is_nodata(a: np.ndarray, nodata: float | None) -> np.ndarray:
    return nodata_mask(a, _tag_value(nodata, a.dtype))


def _is_valid(a: np.ndarray, nodata: float | None) -> np.ndarray:
    """``~_is_nodata(a, nodata)`` in one pass for integer arrays."""
    nd = _tag_value(nodata, a.dtype)
    if a.dtype.kind != "f" and nd is not None:
        return a != nd
    return ~nodata_mask(a, nd)


def _has_nodata(a: np.ndarray, nodata: float | None) -> bool:
    """``_is_nodata(a, nodata).any()`` from one or two reductions (min, max) in the common case, without a mask."""
    if a.size == 0:
        return False
    lo = a.min()
    if a.dtype.kind == "f" and np.isnan(lo):
        return True
    nd = _tag_value(nodata, a.dtype)
    if nd is None:
        return False
    if nd < lo or nd > a.max():
        return False
    return bool((a == nd).any())


_TRANSFORMERS = threading.local()


def _to_src_bounds(src, r: RasterSource, bounds: tuple[float, float, float, float]
                   ) -> tuple[float, float, float, float]:
    """The chip's lon/lat bounds in the raster's CRS, edges densified (21 points), as ``transform_bounds`` gives them;
    with one PROJ transformer per thread and raster CRS instead of one per call (~0.1 ms a chip)."""
    import pyproj
    from rasterio.warp import transform_bounds

    cache = getattr(_TRANSFORMERS, "by_crs", None)
    if cache is None:
        cache = _TRANSFORMERS.by_crs = {}
    tr = cache.get(r.crs)
    if tr is None:
        crs = pyproj.CRS.from_wkt(src.crs.to_wkt())
        if crs.is_compound:
            crs = crs.sub_crs_list[0]  # the window needs the horizontal part only
        tr = cache[r.crs] = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    try:
        b = tr.transform_bounds(*bounds, densify_pts=21)
    except pyproj.exceptions.ProjError:
        b = None
    if b is None or not all(math.isfinite(v) for v in b):
        return transform_bounds(DST_CRS, src.crs, *bounds, densify_pts=21)
    return b


def _window_is_clean(src, r: RasterSource, bounds: tuple[float, float, float, float], px: int) -> bool:
    """True when the chip lies inside the raster and the source pixels under it (plus a resampling margin) hold no
    nodata and no masked pixel: then warping needs no validity masks, which makes GDAL's warper several times faster
    (it takes its unmasked code paths). Reads the window, which the warp then finds in GDAL's block cache."""
    import rasterio
    from rasterio.enums import MaskFlags
    from rasterio.windows import from_bounds

    t = src.transform
    if t.b or t.d or t.a <= 0 or t.e >= 0:
        return False
    if r.nodata is None and any(MaskFlags.all_valid not in src.mask_flag_enums[i - 1] for i in r.indexes):
        return False  # an internal mask or alpha band marks invalid pixels
    b = _to_src_bounds(src, r, bounds)
    win = from_bounds(*b, transform=t)
    chip_px_src = max((b[2] - b[0]) / px / t.a, 1.0)
    margin = int(math.ceil(chip_px_src)) + 2
    c0, r0 = int(math.floor(win.col_off)) - margin, int(math.floor(win.row_off)) - margin
    c1 = int(math.ceil(win.col_off + win.width)) + margin
    r1 = int(math.ceil(win.row_off + win.height)) + margin
    if c0 < 0 or r0 < 0 or c1 > src.width or r1 > src.height:
        return False
    if r.nodata is None:
        return True
    data = src.read(r.indexes, window=rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0))
    return not _has_nodata(data, r.nodata)


def index_chip(src, r: RasterSource, bounds: tuple[float, float, float, float], px: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour cut of a lon/lat raster without warping: the source pixel under each chip pixel centre,
    read from one window (what GDAL's warper does for this case, without its per-chip set-up)."""
    import rasterio
    from rasterio.enums import MaskFlags

    t = src.transform
    w, s, e, n = bounds
    xs = w + (np.arange(px) + 0.5) * (e - w) / px
    ys = n - (np.arange(px) + 0.5) * (n - s) / px
    cols = np.floor((xs - t.c) / t.a).astype(np.int64)
    rows = np.floor((ys - t.f) / t.e).astype(np.int64)
    ok_c = (cols >= 0) & (cols < src.width)
    ok_r = (rows >= 0) & (rows < src.height)
    shape = (len(r.indexes), px, px)
    if not ok_c.any() or not ok_r.any():
        return np.zeros(shape, np.dtype(r.dtype)), np.zeros(shape, bool)
    c0, c1 = int(cols[ok_c].min()), int(cols[ok_c].max()) + 1
    r0, r1 = int(rows[ok_r].min()), int(rows[ok_r].max()) + 1
    win = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
    data = src.read(r.indexes, window=win)
    ri, ci = np.clip(rows - r0, 0, r1 - r0 - 1), np.clip(cols - c0, 0, c1 - c0 - 1)
    arr = data[:, ri][:, :, ci]  # two 1-D gathers: several times faster than one 2-D fancy index
    if r.nodata is not None:
        valid = _is_valid(arr, r.nodata)
    elif any(MaskFlags.all_valid not in src.mask_flag_enums[i - 1] for i in r.indexes):
        valid = src.read_masks(r.indexes, window=win)[:, ri][:, :, ci] > 0
    else:
        valid = np.ones(shape, bool)
    valid[:, ~ok_r] = False  # chip rows / columns beyond the raster's edge
    valid[:, :, ~ok_c] = False
    return arr, valid


def warp_chip(src, r: RasterSource, bounds: tuple[float, float, float, float], px: int,
              fast: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(array (C,px,px) in the source dtype, valid mask (C,px,px)) of ``src`` on the chip's lon/lat grid.

    ``fast`` (default: decided by :func:`_window_is_clean`) warps without nodata masks; the result is the same
    because no source pixel under the chip is nodata."""
    from rasterio.enums import Resampling
    from rasterio.transform import from_bounds
    from rasterio.vrt import WarpedVRT

    if fast is None:
        fast = _window_is_clean(src, r, bounds, px)
    transform = from_bounds(*bounds, px, px)
    kw: dict[str, Any] = {"crs": DST_CRS, "transform": transform, "width": px, "height": px,
                          "resampling": Resampling[r.resampling]}
    if fast:
        kw["src_nodata"] = None
        kw["nodata"] = None
    elif r.nodata is not None:
        kw["src_nodata"] = r.nodata
        kw["nodata"] = r.nodata
    else:
        kw["add_alpha"] = True
    with WarpedVRT(src, **kw) as vrt:
        arr = vrt.read(r.indexes)
        if fast:
            valid = np.ones(arr.shape, bool) if r.nodata is None else ~_is_nodata(arr, r.nodata)
        elif r.nodata is not None:
            valid = ~_is_nodata(arr, r.nodata)
        else:
            alpha = vrt.read(vrt.count)
            valid = np.broadcast_to(alpha > 0, arr.shape).copy()
    return arr, valid


@dataclass
class _Job:
    chip: grid.Chip
    sources: list[RasterSource]


def cut_chip(job: _Job, m: Modality, readers: _Readers) -> tuple[str, np.ndarray | None]:
    """Status ('written', 'all_nodata', 'partial_without_nodata') and the chip array in the modality dtype."""
    import rasterio

    px = chip_pixels(job.chip, m)
    out: np.ndarray | None = None
    valid = np.zeros((len(m.bands), px, px), bool)
    with rasterio.Env(**GDAL_OPTIONS):
        for r in job.sources:
            try:
                src = readers.get(r.path)
                if r.lonlat and r.resampling == "nearest":
                    arr, ok = index_chip(src, r, job.chip.bounds, px)
                else:
                    arr, ok = warp_chip(src, r, job.chip.bounds, px)
            except Exception as e:  # noqa: BLE001
                cause = f" ({e.__cause__})" if e.__cause__ else ""
                raise IngestError(f"{r.path}: reading the window of chip {job.chip.identifier} failed: "
                                  f"{e}{cause}") from e
            fill = m.nodata if m.nodata is not None else 0
            if len(job.sources) == 1:  # no mosaic: the array itself, nodata where nothing is valid
                out = arr.astype(m.np_dtype, copy=False)
                valid = ok
                if not valid.all():
                    out[~valid] = fill
                break
            if out is None:
                out = np.full(arr.shape, fill, dtype=m.np_dtype)
            take = ok & ~valid
            out[take] = arr[take].astype(m.np_dtype)
            valid |= ok
            if valid.all():
                break
    if out is None or not valid.any():
        return "all_nodata", None
    if not valid.all() and m.nodata is None:
        return "partial_without_nodata", None
    return "written", out


# ------------------------------------------------------------------ driver


def expand_rasters(paths: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand glob patterns (``tiles/*.tif``, ``gs://bucket/export-*.tif``) in order; a pattern matching nothing is
    an error."""
    import glob as _glob

    out: list[str] = []
    for p in paths:
        if not any(ch in p for ch in "*?[") or p.startswith(NATIVE_URL):
            out.append(p)
            continue
        if "://" in p and not p.startswith("file://"):
            fs, fp = get_fs(p, storage_options)
            proto = p.split("://", 1)[0]
            found = [f"{proto}://{m}" for m in sorted(fs.glob(fp))]
        else:
            found = sorted(_glob.glob(p[len("file://"):] if p.startswith("file://") else p))
        if not found:
            raise IngestError(f"--raster {p}: the pattern matches no file")
        out += found
    return out


def _find_region(cfg: IngestConfig):
    fs, root = get_fs(cfg.chips, cfg.storage_options)
    try:
        regions = hub.discover_regions(fs, root, [cfg.region] if cfg.region else None)
    except FileNotFoundError as e:
        raise IngestError(f"--chips {cfg.chips}: {e}; create one with 'm3leo-shards grid'") from e
    if len(regions) > 1:
        raise IngestError(f"--chips {cfg.chips} holds regions {[r.aoi for r in regions]}; choose one with --region")
    rsrc = regions[0]
    if not rsrc.geojson:
        raise IngestError(f"region {rsrc.aoi} in {cfg.chips} has no chip geojson ({rsrc.stem}.geojson): "
                          "ingest needs the chip polygons")
    with fs.open(rsrc.geojson, "rb") as f:
        chips = grid.read_geojson_chips(f.read())
    if not chips:
        raise IngestError(f"{rsrc.geojson}: no chips")
    return fs, rsrc, chips


def ingest(cfg: IngestConfig) -> dict[str, Any]:
    """Cut every chip of the region from ``cfg.rasters`` into ``<data folder>/<folder>/<identifier>.tif``.

    Returns a summary (counts of chips written and left out, per-raster resampling, band names, chips/s).
    """
    t0 = time.perf_counter()
    if not cfg.rasters:
        raise IngestError("give at least one --raster")
    if cfg.workers < 1:
        raise IngestError("--workers must be at least 1")
    if cfg.compress not in (None, "none", "deflate", "zstd", "lzw"):
        raise IngestError(f"--compress {cfg.compress!r}: none, deflate, zstd or lzw")
    m = resolve_modality(cfg.modality, cfg.modalities_file)
    folder = choose_folder(m, cfg.folder, cfg.year)
    fs, rsrc, chips = _find_region(cfg)
    sources = [inspect_raster(p, m, cfg) for p in expand_rasters(cfg.rasters, cfg.storage_options)]
    for r in sources:
        r.resampling = pick_resampling(cfg.resampling, m, r.pixel_m)
    counts = {len(r.indexes) for r in sources}
    if len(counts) > 1:
        raise IngestError(f"the rasters of a mosaic must have the same bands; got {[len(r.indexes) for r in sources]}")
    jobs: list[_Job] = []
    outside = 0
    used: Counter = Counter()
    for ident in sorted(chips, key=lambda i: (-chips[i].lat, chips[i].lon)):  # row by row: neighbours share blocks
        c = chips[ident]
        hits = [r for r in sources if _overlaps(c.bounds, r.bounds_lonlat)]
        if not hits:
            outside += 1
            continue
        used.update(r.path for r in hits)
        jobs.append(_Job(c, hits))
    grid_bounds = (min(c.bounds[0] for c in chips.values()), min(c.bounds[1] for c in chips.values()),
                   max(c.bounds[2] for c in chips.values()), max(c.bounds[3] for c in chips.values()))
    for r in sources:
        if not used[r.path]:
            raise IngestError(f"{r.path}: does not overlap the chip grid of region {rsrc.aoi} (raster lon/lat "
                              f"bounds {_fmt(r.bounds_lonlat)}, grid bounds {_fmt(grid_bounds)}); nothing was written")
    names = _band_names(m, sources)
    dest_dir = join(rsrc.data_dir, folder)
    t_checked = time.perf_counter()
    staging = tempfile.mkdtemp(prefix=".m3leo-ingest-", dir=rsrc.repo if is_local(fs) else None)
    readers = _Readers(cfg.storage_options)
    status: Counter = Counter()
    written: list[str] = []
    compress = None if cfg.compress in (None, "none") else cfg.compress
    bar = tqdm(total=len(jobs), unit="chip", desc=f"ingest {m.name}", disable=not cfg.progress)

    encoders: dict[tuple[int, int, int], GeoTiffEncoder] = {}
    enc_lock = threading.Lock()

    def encoder(shape: tuple[int, int, int]) -> GeoTiffEncoder:
        """One per chip shape: GDAL lays out the header once, chips copy it (byte-identical files)."""
        with enc_lock:
            if shape not in encoders:
                encoders[shape] = GeoTiffEncoder(shape, m.np_dtype, DST_CRS, m.nodata, names, compress)
            return encoders[shape]

    def work(job: _Job) -> tuple[str, str]:
        st, arr = cut_chip(job, m, readers)
        if arr is not None:
            early_sync.staged(_write_staged(os.path.join(staging, f"{job.chip.identifier}.tif"),
                                            encoder(arr.shape).parts(arr, job.chip.bounds)))
        return job.chip.identifier, st

    early_sync = _EarlySync(staging)
    try:
        results = _map(work, jobs, cfg.workers)
        for ident, st in results:
            status[st] += 1
            if st == "written":
                written.append(ident)
            bar.update(1)
        bar.close()
        if not written:
            raise IngestError(f"no chip of region {rsrc.aoi} got any valid pixel from {cfg.rasters} "
                              f"({len(jobs)} chips overlap their bounds, all nodata); nothing was written")
        early_sync.stop()
        t_cut = time.perf_counter()
        fs.makedirs(dest_dir, exist_ok=True)
        _sync_tree(staging, [os.path.join(staging, f"{i}.tif") for i in written])
        for ident in tqdm(written, unit="file", desc="publish", disable=not cfg.progress, leave=False):
            staged, dest = os.path.join(staging, f"{ident}.tif"), join(dest_dir, f"{ident}.tif")
            if is_local(fs):
                os.replace(staged, dest)  # same file system, content already synced: atomic and durable
            else:
                put_atomic(fs, staged, dest)  # an object appears only once its upload completes
        if is_local(fs):
            fsync_path(dest_dir)  # the renames themselves
    finally:
        early_sync.stop()
        bar.close()
        readers.close()
        shutil.rmtree(staging, ignore_errors=True)
    dt = time.perf_counter() - t0
    summary = {
        "region": rsrc.aoi, "modality": m.name, "folder": dest_dir, "chips_in_grid": len(chips),
        "chips_written": status["written"], "chips_outside_footprint": outside,
        "chips_all_nodata": status["all_nodata"], "chips_partial_without_nodata": status["partial_without_nodata"],
        "bands": names, "dtype": m.dtype, "pixels": sorted({chip_pixels(j.chip, m) for j in jobs}),
        "rasters": [{"path": r.path, "crs": r.crs, "dtype": r.dtype, "nodata": r.nodata, "pixel_m": round(r.pixel_m, 3),
                     "resampling": r.resampling, "bands": r.indexes} for r in sources],
        "seconds": round(dt, 3),
        "seconds_by_step": {"checks": round(t_checked - t0, 3), "cut_and_stage": round(t_cut - t_checked, 3),
                            "sync_and_publish": round(t0 + dt - t_cut, 3)},
        "chips_per_s": round(len(jobs) / dt, 2) if dt > 0 else None,
    }
    log.info("ingested %d chips of %s into %s (%d outside the footprint, %d all nodata, %d partial without a "
             "nodata value)", status["written"], rsrc.aoi, dest_dir, outside, status["all_nodata"],
             status["partial_without_nodata"])
    return summary


def _write_staged(path: str, parts: list[Any]) -> int:
    """Write a chip file's buffers (header, pixels, trailer) to the staging folder; returns its size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    n = 0
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            n += len(view)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return n


class _EarlySync:
    """Flushes the staging folder's file system in the background while chips are still being cut (one ``syncfs``
    each time another ``every_bytes`` were staged; 8 MB: a WorldCover run of 99 chips stages 20 MB), so that the sync
    before publishing finds little left to write. Only an optimisation: the final :func:`_sync_tree` still runs after
    the last chip."""

    def __init__(self, folder: str, every_bytes: int = 8 << 20):
        self.folder, self.every = folder, every_bytes
        self.pending = 0
        self.cond = threading.Condition()
        self.done = False
        self.thread = threading.Thread(target=self._run, name="ingest-early-sync", daemon=True)
        self.thread.start()

    def staged(self, nbytes: int) -> None:
        with self.cond:
            self.pending += nbytes
            if self.pending >= self.every:
                self.cond.notify()

    def _run(self) -> None:
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            syncfs = libc.syncfs
        except (OSError, AttributeError):
            return
        while True:
            with self.cond:
                while not self.done and self.pending < self.every:
                    self.cond.wait()
                if self.done:
                    return
                self.pending = 0
            try:
                fd = os.open(self.folder, os.O_RDONLY)
            except OSError:
                return
            try:
                syncfs(fd)  # ctypes releases the GIL: the workers keep cutting
            finally:
                os.close(fd)

    def stop(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify()
        self.thread.join()


def _sync_tree(folder: str, files: list[str]) -> None:
    """Make the staged chips durable before they are renamed into place: one ``syncfs`` of their file system
    (Linux) instead of an ``fsync`` per file, which costs a disk flush each; ``fsync`` per file elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    for p in files:
        fsync_path(p)


def _band_names(m: Modality, sources: list[RasterSource]) -> list[str]:
    """Band descriptions written into each chip: the source GeoTIFF's, else the modality's file or band names."""
    desc = sources[0].descriptions
    if m.file_band_names:
        return list(m.file_band_names)
    if all(desc):
        return [str(d) for d in desc]
    return list(m.bands)


def _fmt(b: tuple[float, float, float, float]) -> str:
    return "(" + ", ".join(f"{x:.5f}" for x in b) + ")"


def _map(fn, jobs: list[_Job], workers: int):
    """Results in job order; threads (GDAL releases the GIL while warping, reading and encoding)."""
    if workers <= 1:
        for j in jobs:
            yield fn(j)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _, result in bounded_map(pool, fn, jobs, workers * 4):
            yield result
