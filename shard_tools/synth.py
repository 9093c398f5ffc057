"""``m3leo-shards synth``: M3LEO-shaped data in the exact upstream hub layout, for tests, the demo and benchmarks.

Files are encoded as the release's exporters wrote them (see each modality's ``encodings`` in the registry):
Sentinel-1 dB cast to uint16 (negative values wrapped, no acquisition = 0, whole seasons/orbits missing),
Sentinel-2 uint8 with zero months and masked pixels, 2-band uint16 SRTM (elevation, slope) on the 10 m grid under
both folder spellings, GSSIC coherence as DN (0-100) with NaN and seasons in the file's order, and the
``<identifier>.skipped`` files sartiles leaves for chips it could not make.

Per region it writes ``<out>/<aoi>/`` as a hub repository would look once downloaded::

    <aoi>_partitions_aschips_<hash>.geojson
    <aoi>_partitions_aschips_<hash>_splits_60bands_angleNN_60-20-20.csv
    <aoi>_partitions_aschips_<hash>/<dataset>/<identifier>.tif|.nc

or, with ``parquet=True``, the parquet-packed release (``<dataset>/<parquet_identifier>.zstd.parquet`` with rows
``path``, ``ds``, ``content``, plus the ``_parquet.csv`` split file). Values have plausible ranges and spatial
structure tied to a per-chip land-cover map; some chips lack some modalities as upstream.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from tqdm.auto import tqdm

from m3leo_stream.modalities import REGISTRY, SEASONS, Modality, is_nan
from m3leo_stream.storage import get_fs, join
from shard_tools import grid
from shard_tools.publish import write_file
from shard_tools.rasters import geotiff_bytes, netcdf_bytes

log = logging.getLogger(__name__)

YEAR = 2020
GUNW_WINDOW = ("2020-01-01", "2020-03-31")
FOLDERS = {
    "s1grd": f"s1grd-{YEAR}",
    "s2rgbm": f"s2rgbm-{YEAR}",
    "gssic": "gssic",
    "gunw": f"gunw_{GUNW_WINDOW[0]}_{GUNW_WINDOW[1]}",
    "esawc": f"esaworldcover-{YEAR}",
    "biomass": f"biomass-{YEAR}",
    "ghsbuilts": f"ghsbuilts-{YEAR}",
    "modisveg": "modis44b006veg",
    "srtmdem": "srtmdem",
}
# Share of chips lacking each modality (upstream minisets lack GUNW for ~20 % of chips, GSSIC for a few).
MISSING = {"gunw": 0.2, "gssic": 0.04, "biomass": 0.02, "srtmdem": 0.02}
SKIPPED = ("gssic", "gunw")  # missing chips of these leave a sartiles ``.skipped`` file instead
STRM_REGIONS = ("europe", "middleeast", "china")  # regions whose SRTM folder has the other spelling
GSSIC_SEASONS = ("summer", "fall", "winter", "spring")  # sartiles GSSICTile.season_names: the file's order


def folder_for(name: str, region: str) -> str:
    """The dataset folder of a modality in a region (the SRTM folder is spelled both ways in the release)."""
    if name == "srtmdem" and region in STRM_REGIONS:
        return "strmdem"
    return FOLDERS[name]


def geetiles_cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """What geetiles' ``out_image.astype(dtype)`` does to float values on x86: truncate toward zero, wrap modulo
    2**bits, NaN to 0 (done explicitly here, so the bytes do not depend on the platform)."""
    bits = np.dtype(dtype).itemsize * 8
    t = np.where(np.isnan(values), 0, np.trunc(np.nan_to_num(values))).astype(np.int64)
    return (t & ((1 << bits) - 1)).astype(dtype)

# WorldCover classes used by the generator, with typical S1 VV dB, S2 RGB and biomass.
CLASS_TABLE = {
    10: (-8.0, (40, 70, 35), 180.0),   # tree cover
    20: (-11.0, (95, 100, 60), 40.0),  # shrubland
    30: (-12.0, (120, 140, 80), 8.0),  # grassland
    40: (-10.0, (150, 150, 90), 5.0),  # cropland
    50: (-2.0, (160, 150, 150), 2.0),  # built-up
    60: (-15.0, (190, 170, 140), 0.5),  # bare
    80: (-22.0, (25, 45, 80), 0.0),    # water
    90: (-13.0, (70, 100, 80), 20.0),  # wetland
}


@dataclass(frozen=True)
class SynthConfig:
    out: str
    regions: tuple[str, ...]
    chips_per_region: int
    seed: int = 0
    modalities: tuple[str, ...] = tuple(FOLDERS)
    parquet: bool = False
    chips_per_parquet: int = 16
    rows_per_group: int = 4
    storage_options: dict[str, Any] | None = None
    absent: dict[str, tuple[str, ...]] | None = None  # region -> modalities it has no file of (Europe has no GUNW)
    s2_offset: dict[str, float] | None = None  # region -> digital numbers added to its S2 bands: a known domain shift


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int = 6) -> np.ndarray:
    """A smooth random field in roughly [-1, 1]: bilinear interpolation of coarse Gaussian noise."""
    coarse = rng.standard_normal((cells + 1, cells + 1))
    h, w = shape
    y = np.linspace(0, cells, h)
    x = np.linspace(0, cells, w)
    y0 = np.minimum(y.astype(int), cells - 1)
    x0 = np.minimum(x.astype(int), cells - 1)
    fy = (y - y0)[:, None]
    fx = (x - x0)[None, :]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    f = a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx
    return f / 1.5


def native_shape(m: Modality, lat: float) -> tuple[int, int]:
    """Shape of a product at its native resolution over one chip in lon/lat (coarse products are wider than tall)."""
    if m.canonical_px >= 448:
        return (m.canonical_px, m.canonical_px)
    return (m.canonical_px, int(round(m.canonical_px / math.cos(math.radians(lat)))))


def _landcover(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    wet = smooth_field(rng, shape, 5)
    urban = smooth_field(rng, shape, 7)
    veg = smooth_field(rng, shape, 4)
    lc = np.full(shape, 40, dtype=np.uint8)
    lc[veg > 0.2] = 10
    lc[(veg > -0.2) & (veg <= 0.2)] = 30
    lc[(veg > 0.05) & (veg <= 0.2) & (urban < -0.3)] = 20
    lc[veg < -0.7] = 60
    lc[(wet > 0.55) & (veg <= 0.2)] = 90
    lc[wet > 0.75] = 80
    lc[urban > 0.6] = 50
    return lc


def _downsample_codes(lc: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    ys = (np.arange(shape[0]) * lc.shape[0] / shape[0]).astype(int)
    xs = (np.arange(shape[1]) * lc.shape[1] / shape[1]).astype(int)
    return lc[ys][:, xs]


def _lookup(lc: np.ndarray, column: int) -> np.ndarray:
    table = np.zeros(256, dtype=np.float32)
    for code, row in CLASS_TABLE.items():
        v = row[column]
        table[code] = v if not isinstance(v, tuple) else 0.0
    return table[lc]


class ChipSynth:
    """Generates every modality of one chip from a shared land-cover map."""

    def __init__(self, seed: int, region: str, chip: grid.Chip, s2_offset: float = 0.0):
        self.seed, self.region, self.chip = seed, region, chip
        self.s2_offset = float(s2_offset)
        self.lc = _landcover(_rng(seed, region, chip.identifier, "lc"), (448, 448))

    def rng(self, name: str) -> np.random.Generator:
        return _rng(self.seed, self.region, self.chip.identifier, name)

    def present(self, modality: str) -> bool:
        p = MISSING.get(modality, 0.0)
        return p == 0.0 or self.rng("missing-" + modality).random() >= p

    def file_bytes(self, m: Modality) -> bytes:
        return getattr(self, "_" + m.name)(m)

    def _tif(self, m: Modality, array: np.ndarray, descriptions: Sequence[str] | None = None) -> bytes:
        nodata = m.nodata
        if is_nan(nodata) and array.dtype.kind != "f":
            nodata = None
        if m.encoding_for(array.dtype) in m.encodings:
            nodata = None  # an exporter encoding: geetiles writes no nodata tag (nodata is a value of the encoding)
        return geotiff_bytes(array, self.chip.bounds, nodata=nodata, descriptions=descriptions or m.file_band_names)

    def s1_db(self) -> np.ndarray:
        """The float dB seasonal means geetiles casts (NaN where a season/orbit has no acquisition)."""
        rng = self.rng("s1grd")
        vv = _lookup(self.lc, 0)
        out = np.empty((16, 448, 448), dtype=np.float32)
        i = 0
        for season in SEASONS:
            wet = 1.5 if season in ("winter", "spring") else -0.5
            for pol_offset in (0.0, -6.5):  # vv, vh
                for orbit in (0.0, 0.8):  # asc, des
                    out[i] = vv + pol_offset + wet + orbit
                    i += 1
        out += rng.normal(0, 1.8, out.shape).astype(np.float32)
        np.clip(out, -50, 30, out=out)
        if rng.random() < 0.15:  # a no-coverage strip at the chip edge, as at swath borders
            out[:, :, : rng.integers(8, 40)] = np.nan
        if rng.random() < 0.3:  # a season/orbit without acquisitions: its VV and VH bands
            si, oi = int(rng.integers(4)), int(rng.integers(2))
            out[[4 * si + oi, 4 * si + 2 + oi]] = np.nan
        return out

    def _s1grd(self, m: Modality) -> bytes:
        return self._tif(m, geetiles_cast(self.s1_db(), "uint16"))

    def _s2rgbm(self, m: Modality) -> bytes:
        rng = self.rng(m.name)
        table = np.zeros((256, 3), dtype=np.float32)
        for code, row in CLASS_TABLE.items():
            table[code] = row[1]
        base = table[self.lc]  # (H, W, 3)
        out = np.empty((36, 448, 448), dtype=np.float32)
        for month in range(12):
            green = 1.0 + 0.15 * math.sin((month - 3) / 12 * 2 * math.pi)
            for c in range(3):
                out[3 * month + c] = base[..., c] * (green if c == 1 else 1.0)
        out += rng.normal(0, 6.0, out.shape).astype(np.float32) + np.float32(self.s2_offset)
        dn = np.clip(np.rint(out), 1, 255).astype(np.uint8)
        for month in range(12):
            if rng.random() < 0.1:  # no clear scene this month
                dn[3 * month: 3 * month + 3] = 0
            elif rng.random() < 0.3:  # a masked cloud
                cloud = smooth_field(rng, (448, 448), 3) > 0.6
                dn[3 * month: 3 * month + 3, cloud] = 0
        return self._tif(m, dn)

    def _esawc(self, m: Modality) -> bytes:
        rng = self.rng(m.name)
        lc = self.lc.copy()
        if rng.random() < 0.3:
            lc[: rng.integers(5, 30)] = 0  # nodata rows
        return self._tif(m, lc[None])

    def _coarse(self, m: Modality) -> tuple[np.ndarray, tuple[int, int]]:
        shape = native_shape(m, self.chip.lat)
        return _downsample_codes(self.lc, shape), shape

    def _ghsbuilts(self, m: Modality) -> bytes:
        lc, shape = self._coarse(m)
        rng = self.rng(m.name)
        built = np.where(lc == 50, 6000.0, 150.0) * (1 + 0.3 * smooth_field(rng, shape))
        return self._tif(m, np.clip(built, 0, 10000).astype(np.float32)[None])

    def _modisveg(self, m: Modality) -> bytes:
        lc, shape = self._coarse(m)
        rng = self.rng(m.name)
        bands, names = [], []
        for year in range(2016, 2021):
            tc = np.where(lc == 10, 70.0, np.where(lc == 20, 20.0, 3.0)) + 5 * smooth_field(rng, shape)
            tc = np.clip(np.rint(tc), 0, 100).astype(np.uint8)
            tc[lc == 80] = 200
            bands.append(tc)
            names.append(f"Percent_Tree_Cover_{year}")
        return self._tif(m, np.stack(bands), names)

    def srtm_values(self) -> np.ndarray:
        """Float elevation (m) and slope (deg) before geetiles' uint16 cast; some chips lie below sea level."""
        rng = self.rng("srtmdem")
        low = rng.random() < 0.2
        base = (-30.0 if low else 300 + 800 * (0.5 + 0.5 * math.sin(self.chip.lon))) \
            + (20 if low else 150) * smooth_field(rng, (448, 448), 3)
        gy, gx = np.gradient(base, 10.0)
        slope = np.degrees(np.arctan(np.hypot(gx, gy)))
        return np.stack([base, slope]).astype(np.float32)

    def _srtmdem(self, m: Modality) -> bytes:
        return self._tif(m, geetiles_cast(self.srtm_values(), "uint16"))

    def _nc_coords(self, ds, shape: tuple[int, int]) -> None:
        w, s, e, n = self.chip.bounds
        ds.createDimension("y", shape[0])
        ds.createDimension("x", shape[1])
        y = ds.createVariable("y", "f8", ("y",))
        x = ds.createVariable("x", "f8", ("x",))
        y[:] = n - (np.arange(shape[0]) + 0.5) * (n - s) / shape[0]
        x[:] = w + (np.arange(shape[1]) + 0.5) * (e - w) / shape[1]

    @staticmethod
    def _string_coord(ds, name: str, values: Sequence[object]) -> None:
        ds.createDimension(name, len(values))
        v = ds.createVariable(name, str, (name,))
        for i, x in enumerate(values):
            v[i] = str(x)

    def _gssic(self, m: Modality) -> bytes:
        lc, shape = self._coarse(m)
        rng = self.rng(m.name)
        water = lc == 80
        vv = _lookup(lc, 0)

        def build(ds):
            self._nc_coords(ds, shape)
            self._string_coord(ds, "season", GSSIC_SEASONS)
            self._string_coord(ds, "polarimetry", ("vv", "vh"))
            self._string_coord(ds, "deltadays", (12, 24, 36, 48))
            self._string_coord(ds, "param", ("rho", "tau", "rmse"))
            self._string_coord(ds, "feature", ("inc", "lsmap"))
            amp = ds.createVariable("amplitude", "f4", ("season", "polarimetry", "y", "x"), fill_value=np.nan)
            coh = ds.createVariable("coherence", "f4", ("season", "deltadays", "y", "x"), fill_value=np.nan)
            dec = ds.createVariable("decaymodel", "f4", ("season", "param", "y", "x"), fill_value=np.nan)
            geo = ds.createVariable("geometry", "f4", ("feature", "y", "x"), fill_value=np.nan)
            db = {"summer": -0.5, "fall": 0.0, "winter": 1.0, "spring": 0.5}
            a = np.stack([np.stack([vv + db[s], vv - 6.5 + db[s]]) for s in GSSIC_SEASONS])
            a = 10 ** ((a + rng.normal(0, 0.7, a.shape)) / 20) * 10000  # amplitude DN in the thousands
            amp[:] = np.rint(a).astype(np.float32)
            rho = np.clip(0.25 + 0.5 * (lc == 50) + 0.2 * (lc == 60) + 0.05 * smooth_field(rng, shape), 0, 1)
            c = np.stack([np.stack([rho * math.exp(-d / 40) for d in (12, 24, 36, 48)]) for _ in GSSIC_SEASONS])
            c = np.rint(np.clip(c + rng.normal(0, 0.03, c.shape), 0, 1) * 100)  # DN = gamma x 100
            c[:, :, water] = np.nan
            coh[:] = c.astype(np.float32)
            tau = 10 + 30 * (lc == 50) + 5 * smooth_field(rng, shape)
            dec[:] = np.stack([np.stack([rho, tau, np.full(shape, 0.05)]) for _ in GSSIC_SEASONS]).astype(np.float32)
            inc = 30 + 15 * np.linspace(0, 1, shape[1])[None, :].repeat(shape[0], 0)
            lsmap = np.where(smooth_field(rng, shape, 3) > 0.8, 2.0, 1.0)  # layover/shadow flag codes
            geo[:] = np.stack([inc, lsmap]).astype(np.float32)

        return netcdf_bytes(build)

    def _gunw(self, m: Modality) -> bytes:
        lc, shape = self._coarse(m)
        rng = self.rng(m.name)
        start = np.datetime64(GUNW_WINDOW[0])
        n_pairs = int(rng.integers(1, 5))
        pairs = []
        for _ in range(n_pairs):
            first = start + np.timedelta64(int(rng.integers(0, 30)), "D")
            end = first + np.timedelta64(12 * int(rng.integers(1, 6)), "D")
            pairs.append(f"{str(end).replace('-', '')}_{str(first).replace('-', '')}")
        pairs = sorted(set(pairs))

        def build(ds):
            grp = ds.createGroup("science").createGroup("grids").createGroup("data")
            self._nc_coords(grp, shape)
            self._string_coord(grp, "datepair", pairs)
            amp = grp.createVariable("amplitude", "f4", ("datepair", "y", "x"), fill_value=np.nan)
            coh = grp.createVariable("coherence", "f4", ("datepair", "y", "x"), fill_value=np.nan)
            unw = grp.createVariable("unwrappedPhase", "f4", ("datepair", "y", "x"), fill_value=np.nan)
            cc = grp.createVariable("connectedComponents", "i2", ("datepair", "y", "x"))
            yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
            water = lc == 80
            for k in range(len(pairs)):
                a = 2000 + 800 * smooth_field(rng, shape) + rng.normal(0, 50, shape)
                c = np.clip(0.3 + 0.5 * (lc == 50) + 0.1 * smooth_field(rng, shape), 0, 1)
                ramp = rng.normal(0, 0.05) * xx + rng.normal(0, 0.05) * yy + rng.normal(0, 20)
                p = ramp + 3 * smooth_field(rng, shape)
                for arr in (a, c, p):
                    arr[water] = np.nan
                amp[k] = a.astype(np.float32)
                coh[k] = c.astype(np.float32)
                unw[k] = p.astype(np.float32)
                cc[k] = np.where(water, 0, 1).astype(np.int16)

        return netcdf_bytes(build)

    def _biomass(self, m: Modality) -> bytes:
        lc, shape = self._coarse(m)
        rng = self.rng(m.name)

        def build(ds):
            self._nc_coords(ds, shape)
            agb = ds.createVariable("agb", "f4", ("y", "x"), fill_value=np.nan)
            se = ds.createVariable("agb_se", "f4", ("y", "x"), fill_value=np.nan)
            a = _lookup(lc, 2) * (1 + 0.25 * smooth_field(rng, shape)) + np.abs(rng.normal(0, 2, shape))
            a[lc == 80] = np.nan
            agb[:] = a.astype(np.float32)
            se[:] = (0.2 * a + 3).astype(np.float32)
            agb.units = se.units = "Mg/ha"

        return netcdf_bytes(build)


def region_chips(region: str, n: int) -> list[tuple[grid.Chip, str]]:
    """``n`` chips of a compact block of the region's grid, each with its stripe split.

    The block has up to 60 columns and stripes follow columns, so even a handful of chips gets train, val and test
    in the 60-20-20 pattern.
    """
    facts = grid.HUB_REGIONS.get(region, {"origin": (0.0, 0.0)})
    origin = cast(tuple[float, float], facts["origin"])
    lon0, lat0 = origin
    cols = max(1, min(n, 60))
    rows = math.ceil(n / cols)
    lats = grid.grid_rows(lat0, lat0 + rows * grid.CHIP_SIZE_M / grid.M_PER_DEG_LAT)[:rows]
    cycle = grid.split_cycle((60, 20, 20))
    out: list[tuple[grid.Chip, str]] = []
    for lat in lats:
        lons = grid.grid_cols(lon0, lon0 + 61 * 0.06, float(lat))[:cols]
        for c, lon in enumerate(lons):
            if len(out) == n:
                break
            out.append((grid.make_chip(region, float(lon), float(lat)), cycle[c % len(cycle)]))
    return out


def _region_layout(region: str) -> tuple[str, int]:
    facts = grid.HUB_REGIONS.get(region)
    if facts is None:
        return grid.get_hash("synthetic-grid:" + region), 9
    return str(facts["grid_hash"]), int(facts["angle"])  # type: ignore[call-overload]


def _chip_files(args: tuple[int, str, grid.Chip, tuple[str, ...], float]) -> list[tuple[str, bytes]]:
    """The files of one chip: each of ``modalities`` unless it is missing for this chip."""
    seed, region, chip, modalities, s2_offset = args
    synth = ChipSynth(seed, region, chip, s2_offset)
    out = []
    for name in modalities:
        folder = folder_for(name, region)
        if synth.present(name):
            m = REGISTRY[name]
            out.append((f"{folder}/{chip.identifier}.{m.file_ext}", synth.file_bytes(m)))
        elif name in SKIPPED:
            out.append((f"{folder}/{chip.identifier}.skipped", b"COULD_NOT_GET_CHIP no granule covers the chip\n"))
    return out


def synth(cfg: SynthConfig, workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Write the dataset; returns counts of chips and files per region."""
    for name in cfg.modalities:
        if name not in FOLDERS:
            raise ValueError(f"synth cannot generate modality {name!r}; it generates {', '.join(FOLDERS)}")
    for region, names in (cfg.absent or {}).items():
        if region not in cfg.regions or set(names) - set(cfg.modalities):
            raise ValueError(f"synth absent={{{region!r}: {list(names)}}}: name generated regions {list(cfg.regions)} "
                             f"and modalities {list(cfg.modalities)}")
    fs, root = get_fs(cfg.out, cfg.storage_options)
    summary: dict[str, int] = {}
    jobs = []
    for region in cfg.regions:
        if not grid.REGION_RE.fullmatch(f"{region}_partitions_aschips_0") or not region.isalnum():
            raise ValueError(f"region name {region!r}: use lowercase letters and digits")
        chips = region_chips(region, cfg.chips_per_region)
        grid_hash, angle = _region_layout(region)
        stem = grid.region_stem(region, grid_hash)
        repo = join(root, region)
        fs.makedirs(repo, exist_ok=True)
        write_file(fs, join(repo, f"{stem}.geojson"), grid.geojson_bytes(c for c, _ in chips))
        csv_name = grid.split_csv_name(region, grid_hash, angle)
        rows = [(c.identifier, s) for c, s in chips]
        write_file(fs, join(repo, csv_name), grid.split_csv_bytes(rows))
        jobs.append((region, repo, stem, chips, rows, grid_hash, angle))
    total = sum(len(j[3]) for j in jobs)
    bar = tqdm(total=total, unit="chip", desc="synth", disable=not progress)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for region, repo, stem, chips, rows, grid_hash, angle in jobs:
            absent = set((cfg.absent or {}).get(region, ()))
            mods = tuple(m for m in cfg.modalities if m not in absent)
            args = [(cfg.seed, region, c, mods, (cfg.s2_offset or {}).get(region, 0.0)) for c, _ in chips]
            results = pool.map(_chip_files, args, chunksize=2) if pool else map(_chip_files, args)
            files = 0
            if cfg.parquet:
                files = _write_parquet_release(fs, repo, stem, region, chips, rows, results, cfg, bar,
                                               grid.split_csv_name(region, grid_hash, angle, suffix="_parquet"))
            else:
                for chip_files in results:
                    for rel, data in chip_files:
                        write_file(fs, join(repo, stem, rel), data)
                        files += 1
                    bar.update(1)
            summary[region] = files
            log.info("synth %s: %d chips, %d files", region, len(chips), files)
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    return summary


def _write_parquet_release(fs, repo, stem, region, chips, rows, results, cfg: SynthConfig, bar, csv_name) -> int:
    """Pack files as the upstream release does: per dataset folder, ``<parquet_identifier>.zstd.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pid_of = {}
    for i, (chip, _) in enumerate(chips):
        pid_of[chip.identifier] = grid.get_hash(f"{region}:parquet:{i // cfg.chips_per_parquet}")
    buckets: dict[tuple[str, str], list[tuple[str, str, bytes]]] = {}
    for (chip, _), chip_files in zip(chips, results):
        for rel, data in chip_files:
            folder = rel.split("/", 1)[0]
            path = f"{region}/{stem}/{rel}"
            buckets.setdefault((folder, pid_of[chip.identifier]), []).append((path, folder, data))
        bar.update(1)
    files = 0
    for (folder, pid), rows_ in sorted(buckets.items()):
        table = pa.table({
            "path": [r[0] for r in rows_],
            "modificationTime": pa.array([0] * len(rows_), pa.timestamp("us")),
            "length": [len(r[2]) for r in rows_],
            "content": pa.array([r[2] for r in rows_], pa.binary()),
            "ds": [r[1] for r in rows_],
        })
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=cfg.rows_per_group)
        write_file(fs, join(repo, stem, folder, f"{pid}.zstd.parquet"), sink.getvalue().to_pybytes())
        files += len(rows_)
    extra = {ident: {"parquet_identifier": pid_of[ident]} for ident, _ in rows}
    write_file(fs, join(repo, csv_name), grid.split_csv_bytes(rows, extra))
    return files
