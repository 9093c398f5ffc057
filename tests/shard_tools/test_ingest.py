"""``grid`` and ``ingest-raster``: AOI chip grids, windowed warping of real and generated rasters onto them, and the
path on through ``build`` into shards. Real-raster tests skip with a reason where ``../shared/data/real`` is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_bounds
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from shard_tools import grid, hub
from shard_tools.aoi import load_aoi, make_grid, read_aoi
from shard_tools.cli import main as cli
from shard_tools.ingest import IngestConfig, IngestError, ingest

REPO = Path(__file__).resolve().parents[2]
WORLDCOVER = "esa_worldcover/DERIVED_SaoTome_WorldCover_v200_2021_crop.tif"
S1 = "sen1floods11/Spain_7370579_S1Hand.tif"
S2 = "sen1floods11/Spain_7370579_S2Hand.tif"
DEM = "srtm_dem/Rome-30m-DEM.tif"
AGB = "biomass/GlobBiomass_25km.tif"

USER_YAML = textwrap.dedent("""\
    modalities:
      - name: s1floods
        bands: [vv, vh]
        dtype: float32
        kind: sar_db
        units: [dB, dB]
        nodata: nan
        resolution_m: 10
      - name: s2l1c
        bands: [b1, b2, b3, b4, b5, b6, b7, b8, b8a, b9, b10, b11, b12]
        file_band_names: [B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B10, B11, B12]
        dtype: int16
        kind: optical
        nodata: 0
        resolution_m: 10
      - name: s2rgbn
        bands: [blue, green, red, nir]
        dtype: int16
        kind: optical
        nodata: 0
        resolution_m: 10
      - name: water
        bands: [water]
        dtype: int16
        kind: categorical
        class_codes: [0, 1]
        nodata: -32768
        resolution_m: 10
      - name: agb
        bands: [agb]
        units: [Mg/ha]
        dtype: float32
        kind: continuous
        nodata: nan
        resolution_m: 100
      - name: landuse
        bands: [code]
        dtype: uint8
        kind: categorical
        class_codes: [1, 2, 3, 4, 5]
        nodata: 0
        resolution_m: 10
      - name: ramp
        bands: [value]
        dtype: float32
        kind: continuous
        nodata: nan
        resolution_m: 40
      - name: dem
        bands: [elevation]
        units: [m]
        dtype: int16
        kind: continuous
        nodata: -32768
        resolution_m: 89.6
    """)


@pytest.fixture()
def user_yaml(tmp_path) -> str:
    p = tmp_path / "user.yaml"
    p.write_text(USER_YAML)
    return str(p)


def bounds_wkt(b) -> str:
    w, s, e, n = b
    return f"POLYGON(({w} {s}, {e} {s}, {e} {n}, {w} {n}, {w} {s}))"


def raster_grid(path: Path, out: Path, region: str):
    with rasterio.open(path) as src:
        b = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    return make_grid(read_aoi(bounds_wkt(b)), str(out), region)


def chip_files(result, folder: str) -> dict[str, Path]:
    d = Path(result.data_dir) / folder
    return {p.stem: p for p in sorted(d.glob("*.tif"))} if d.is_dir() else {}


def nearest_reference(path: Path, bounds, px: int, indexes=None) -> tuple[np.ndarray, np.ndarray]:
    """Direct windowed read of the chip's area, sampled at the chip's pixel centres: (values, inside footprint)."""
    with rasterio.open(path) as src:
        assert src.crs.is_geographic
        w, s, e, n = bounds
        xs = w + (np.arange(px) + 0.5) * (e - w) / px
        ys = n - (np.arange(px) + 0.5) * (n - s) / px
        cols = np.floor((xs - src.transform.c) / src.transform.a).astype(int)
        rows = np.floor((ys - src.transform.f) / src.transform.e).astype(int)
        ok_c = (cols >= 0) & (cols < src.width)
        ok_r = (rows >= 0) & (rows < src.height)
        c0, c1 = cols[ok_c].min(), cols[ok_c].max() + 1
        r0, r1 = rows[ok_r].min(), rows[ok_r].max() + 1
        data = src.read(indexes, window=Window(c0, r0, c1 - c0, r1 - r0))
    if data.ndim == 2:
        data = data[None]
    out = data[:, np.clip(rows - r0, 0, r1 - r0 - 1)][:, :, np.clip(cols - c0, 0, c1 - c0 - 1)]
    inside = ok_r[:, None] & ok_c[None, :]
    return out, inside


def read_chip(p: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(p) as src:
        return src.read(), {"descriptions": list(src.descriptions), "nodata": src.nodata, "crs": src.crs.to_string(),
                            "bounds": tuple(src.bounds), "dtype": src.dtypes[0]}


# ------------------------------------------------------------------ grid


def test_grid_layout_identifiers_splits_and_coverage(tmp_path):
    aoi = tmp_path / "My-AOI.geojson"
    poly = [[10.0, 45.0], [10.3, 45.0], [10.3, 45.2], [10.1, 45.25], [10.0, 45.0]]
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [poly]}}]}))
    assert cli(["grid", "--aoi", str(aoi), "--out", str(tmp_path / "hub"), "--stripes", "6", "--angle", "15"]) == 0
    fs = __import__("fsspec").filesystem("file")
    [src] = hub.discover_regions(fs, str(tmp_path / "hub"))
    assert src.aoi == "myaoi" and src.geojson and src.split_csv.endswith("_splits_6bands_angle15_60-20-20.csv")
    assert os.path.isdir(src.data_dir)
    chips = grid.read_geojson_chips(Path(src.geojson).read_bytes())
    splits, invalid = hub.read_splits(fs, src.split_csv, hub.Discrepancies())
    assert not invalid and set(splits) == set(chips) and len(chips) > 20
    for ident, c in chips.items():  # identifier as upstream computes it, square 4480 m chips
        assert ident == grid.chip_identifier("myaoi", c.lon, c.lat)
        assert (c.bounds[3] - c.bounds[1]) * grid.M_PER_DEG_LAT == pytest.approx(4480, rel=1e-6)
    ids = sorted(chips)
    lon = np.array([chips[i].lon for i in ids])
    lat = np.array([chips[i].lat for i in ids])
    assert [splits[i] for i in ids] == grid.stripe_splits(lon, lat, 15, 6, (60, 20, 20))
    assert set(splits.values()) == {"train", "val", "test"}
    # the chips cover the AOI, and every chip touches it
    from shapely.geometry import Polygon, box
    from shapely.ops import unary_union

    union = unary_union([box(*c.bounds) for c in chips.values()])
    assert union.buffer(1e-9).contains(Polygon(poly))
    assert all(box(*c.bounds).intersects(Polygon(poly)) for c in chips.values())
    # the same AOI gives the same grid (hash, identifiers); another region name into the same folder is fine,
    # the same name with another grid is refused
    again = make_grid(load_aoi(str(aoi)), str(tmp_path / "hub2"), "myaoi", stripes=6, angle=15)
    assert again.grid_hash == src.grid_hash
    with pytest.raises(ValueError, match="another grid"):
        make_grid(read_aoi(bounds_wkt((10, 45, 10.1, 45.1))), str(tmp_path / "hub"), "myaoi")
    with pytest.raises(ValueError, match="not a GeoJSON or WKT"):
        read_aoi("POLYGON((1 2, 3")
    with pytest.raises(ValueError, match="lon/lat"):
        read_aoi(bounds_wkt((500000, 4000000, 510000, 4010000)))


# ------------------------------------------------------------------ generated data, no real rasters needed


def _write(path: Path, array: np.ndarray, bounds, crs: str, nodata=None, descriptions=(), tiled=False) -> Path:
    c, h, w = array.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": array.dtype.name, "crs": crs,
               "transform": from_bounds(*bounds, w, h), "nodata": nodata}
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
        for i, d in enumerate(descriptions):
            dst.set_band_description(i + 1, d)
    return path


def test_generated_grid_ingest_build_shard_equals_expected(tmp_path, user_yaml, capsys):
    """grid → ingest a categorical raster (EPSG:4326) and a continuous one (UTM) → build → shard arrays as
    expected."""
    from m3leo_stream import shard_format as sf

    aoi = tmp_path / "demo.wkt"
    aoi.write_text(bounds_wkt((9.02, 45.01, 9.2, 45.06)))
    hubdir = tmp_path / "hub"
    assert cli(["grid", "--aoi", str(aoi), "--out", str(hubdir), "--stripes", "3"]) == 0
    # categorical: 7 m pixels of codes 1..5 (0 = nodata in one corner), covering part of the grid
    rng = np.random.default_rng(0)
    cat_bounds = (9.0, 45.0, 9.075, 45.07)
    codes = rng.integers(1, 6, size=(1, 1100, 840)).astype(np.uint8)
    codes = np.repeat(np.repeat(codes[:, ::4, ::4], 4, axis=1), 4, axis=2)[:, :1100, :840]
    codes[:, :50, :50] = 0
    cat = _write(tmp_path / "landuse.tif", codes, cat_bounds, "EPSG:4326", nodata=0, descriptions=["code"])
    # continuous: a plane in UTM 32N metres, so the expected value at any lon/lat is known exactly
    from pyproj import Transformer

    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True)
    x0, y0 = to_utm.transform(8.99, 44.99)
    x1, y1 = to_utm.transform(9.27, 45.08)
    xs = x0 + (np.arange(900) + 0.5) * (x1 - x0) / 900
    ys = y1 - (np.arange(450) + 0.5) * (y1 - y0) / 450
    plane = lambda x, y: ((x - x0) * 1e-3 + (y - y0) * 2e-3).astype(np.float32)  # noqa: E731
    ramp = _write(tmp_path / "ramp.tif", plane(xs[None, :], ys[:, None])[None], (x0, y0, x1, y1), "EPSG:32632",
                  nodata=float("nan"), tiled=True)
    summaries = {}
    for path, mod in ((cat, "landuse"), (ramp, "ramp")):
        capsys.readouterr()
        assert cli(["ingest-raster", "--chips", str(hubdir), "--raster", str(path), "--modality", mod,
                    "--modalities-file", user_yaml, "-q", "--workers", "2"]) == 0
        summaries[mod] = json.loads(capsys.readouterr().out)
    out = tmp_path / "shards"
    assert cli(["build", str(hubdir), str(out), "--modalities-file", user_yaml, "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"]["landuse"]["user_declared"] and manifest["modalities"]["ramp"]["user_declared"]
    import pyarrow.parquet as pq

    index = pq.read_table(out / sf.INDEX).to_pylist()
    [src] = hub.discover_regions(__import__("fsspec").filesystem("file"), str(hubdir))
    chips = grid.read_geojson_chips(Path(src.geojson).read_bytes())
    assert {r["key"] for r in index} == set(chips)
    checked = 0
    for row in index:
        chip = chips[row["key"]]
        data = (out / row["shard"]).read_bytes()
        if row["landuse_offset"] is not None:
            arr = sf.decode_array(data[row["landuse_offset"]: row["landuse_offset"] + row["landuse_nbytes"]])
            expected, inside = nearest_reference(cat, chip.bounds, 448)
            expected = np.where(inside, expected, 0)
            assert arr.shape == (1, 448, 448) and arr.dtype == np.uint8
            assert np.mean(arr == expected) > 0.999  # GDAL and the reference agree except at exact pixel-edge ties
            assert set(np.unique(arr)) <= set(range(6))
            checked += 1
        arr = sf.decode_array(data[row["ramp_offset"]: row["ramp_offset"] + row["ramp_nbytes"]])
        assert arr.shape == (1, 112, 112) and arr.dtype == np.float32
        w, s, e, n = chip.bounds
        lon = w + (np.arange(112) + 0.5) * (e - w) / 112
        lat = n - (np.arange(112) + 0.5) * (n - s) / 112
        ux, uy = to_utm.transform(*np.meshgrid(lon, lat))
        want = plane(ux, uy)
        ok = ~np.isnan(arr[0])
        assert ok.mean() > 0.9
        np.testing.assert_allclose(arr[0][ok], want[ok], rtol=0, atol=0.02)  # bilinear is exact on a plane
    assert checked >= 4
    # chips outside the categorical raster were left out and counted
    cat_chips = {r["key"] for r in index if r["landuse_offset"] is not None}
    assert 0 < len(cat_chips) < len(chips)
    s = summaries["landuse"]
    assert s["chips_written"] == len(cat_chips) and s["chips_outside_footprint"] == len(chips) - len(cat_chips)
    assert summaries["ramp"]["chips_written"] == len(chips) and summaries["ramp"]["rasters"][0]["crs"] == "EPSG:32632"


@pytest.mark.parametrize("resampling", ["bilinear", "average", "nearest"])
def test_unmasked_fast_warp_equals_the_masked_warp(tmp_path, resampling):
    """Where no source pixel under a chip is nodata, ingest warps without masks (faster); the result must be the
    same as the masked warp. Where nodata is under the chip, the masked warp is chosen."""
    from shard_tools.ingest import RasterSource, _window_is_clean, warp_chip

    rng = np.random.default_rng(3)
    data = (1000 + rng.normal(0, 200, (1, 800, 800))).astype(np.int16)
    data[0, 700:, 700:] = -32768  # a nodata corner
    path = _write(tmp_path / "utm.tif", data, (500_000, 5_000_000, 508_000, 5_008_000), "EPSG:32632",
                  nodata=-32768, tiled=True)
    r = RasterSource(str(path), "EPSG:32632", (0, 0, 0, 0), [1], [None], "int16", -32768.0, 10.0, resampling)
    clean = grid.make_chip("t", 9.03, 45.18).bounds  # well inside, away from the corner
    with rasterio.open(path) as src:
        assert _window_is_clean(src, r, clean, 112)
        fast, fast_ok = warp_chip(src, r, clean, 112, fast=True)
        slow, slow_ok = warp_chip(src, r, clean, 112, fast=False)
        np.testing.assert_array_equal(fast, slow)
        assert fast_ok.all() and slow_ok.all()
        from rasterio.warp import transform_bounds as tb

        w, s_, e, n = tb("EPSG:32632", "EPSG:4326", 507_000, 5_000_000, 508_000, 5_001_000)
        corner = grid.chip_bounds((w + e) / 2, (s_ + n) / 2)
        assert not _window_is_clean(src, r, corner, 112)  # nodata and the raster's edge under this chip


def test_large_raster_is_read_by_windows_only(tmp_path, user_yaml):
    """A 36000×36000 uint8 GeoTIFF (1.3 GB decoded, sparse on disk) is cut without loading it: peak memory stays
    far below its decoded size."""
    big = tmp_path / "big.tif"
    bounds = (10.0, 40.0, 13.0, 43.0)
    with rasterio.open(big, "w", driver="GTiff", width=36000, height=36000, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=from_bounds(*bounds, 36000, 36000), nodata=0, tiled=True, blockxsize=512,
                       blockysize=512, compress="deflate", sparse_ok=True) as dst:
        dst.write(np.full((1, 2048, 2048), 3, np.uint8), window=Window(17000, 17000, 2048, 2048))
    assert big.stat().st_size < 5_000_000
    hubdir = tmp_path / "hub"
    make_grid(read_aoi(bounds_wkt((11.43, 41.43, 11.52, 41.52))), str(hubdir), "big")
    code = textwrap.dedent(f"""
        import json, sys
        from shard_tools.ingest import IngestConfig, ingest
        s = ingest(IngestConfig({str(hubdir)!r}, [{str(big)!r}], "landuse", {user_yaml!r}, progress=False))
        # VmHWM is this process image's peak; ru_maxrss would carry over the forking parent's (pytest's) peak
        hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(json.dumps({{"s": s, "rss_kb": hwm}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["s"]["chips_written"] >= 4
    print("peak RSS MiB", out["rss_kb"] / 1024)
    assert out["rss_kb"] * 1024 < 700e6, f"peak RSS {out['rss_kb'] / 1024:.0f} MiB: the raster was loaded whole?"


def test_ingest_from_an_s3_url(tmp_path, s3, user_yaml):
    """A raster at an fsspec URL (s3 on a local moto endpoint) is read through GDAL by windows."""
    import fsspec

    codes = np.random.default_rng(1).integers(1, 6, size=(1, 600, 600)).astype(np.uint8)
    local = _write(tmp_path / "lu.tif", codes, (9.0, 45.0, 9.05, 45.05), "EPSG:4326", nodata=0, tiled=True)
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/rasters/lu.tif"
    fs = fsspec.filesystem("s3", endpoint_url=s3.url)
    fs.put_file(str(local), url)
    hubdir = tmp_path / "hub"
    res = make_grid(read_aoi(bounds_wkt((9.01, 45.01, 9.04, 45.04))), str(hubdir), "remote")
    s = ingest(IngestConfig(str(hubdir), [url], "landuse", user_yaml, progress=False))
    assert s["chips_written"] == len(res.chips)
    # a pattern at a URL is expanded (an Earth Engine export arrives as several tiles)
    fs.put_file(str(local), f"s3://{bucket}/rasters/lu-0001.tif")
    s_glob = ingest(IngestConfig(str(hubdir), [f"s3://{bucket}/rasters/lu*.tif"], "landuse", user_yaml,
                                 progress=False, folder="landuse"))
    assert [r["path"] for r in s_glob["rasters"]] == [f"s3://{bucket}/rasters/lu-0001.tif", url]
    with pytest.raises(IngestError, match="matches no file"):
        ingest(IngestConfig(str(hubdir), [f"s3://{bucket}/none*.tif"], "landuse", user_yaml, progress=False))
    s_local = ingest(IngestConfig(str(hubdir), [str(local)], "landuse", user_yaml, progress=False,
                                  folder="landuse"))
    assert s_local["chips_written"] == s["chips_written"]
    # the chip grid itself in the object store: grid and ingest write there, build reads it
    remote_hub = f"s3://{bucket}/hub"
    make_grid(read_aoi(bounds_wkt((9.01, 45.01, 9.04, 45.04))), remote_hub, "remote")
    s3_sum = ingest(IngestConfig(remote_hub, [str(local)], "landuse", user_yaml, progress=False))
    assert s3_sum["chips_written"] == len(res.chips)
    objs = fs.glob(f"{bucket}/hub/remote_partitions_aschips_*/landuse/*.tif")
    assert sorted(o.rsplit("/", 1)[-1][:-4] for o in objs) == sorted(c.identifier for c in res.chips)
    assert not fs.glob(f"{bucket}/hub/.m3leo-ingest-*")
    out = tmp_path / "shards"
    assert cli(["build", remote_hub, str(out), "--modalities-file", user_yaml, "-q",
                "--src-storage-options", json.dumps({"endpoint_url": s3.url})]) == 0
    assert json.loads((out / "manifest.json").read_text())["members"] == {"landuse": len(res.chips)}


# ------------------------------------------------------------------ real rasters


def test_real_sen1floods11_s1_s2_match_a_direct_windowed_read(real_data, tmp_path, user_yaml):
    res = raster_grid(real_data / S1, tmp_path / "hub", "spain")
    for fname, mod, descs, nodata in ((S1, "s1floods", ["VV", "VH"], float("nan")),
                                      (S2, "s2l1c", [f"B{b}" for b in (1, 2, 3, 4, 5, 6, 7, 8, "8A", 9, 10, 11, 12)],
                                       0)):
        s = ingest(IngestConfig(str(tmp_path / "hub"), [str(real_data / fname)], mod, user_yaml,
                                resampling="nearest", progress=False))
        assert s["chips_written"] == len(res.chips) and s["bands"] == descs
        files = chip_files(res, mod)
        chips = {c.identifier: c for c in res.chips}
        # the chip the raster covers most
        coverage = {}
        for ident, p in files.items():
            arr, meta = read_chip(p)
            assert meta["descriptions"] == descs  # band names from the GeoTIFF descriptions
            assert meta["crs"] == "EPSG:4326" and arr.shape[0] == len(descs) and arr.shape[1:] == (448, 448)
            ref, inside = nearest_reference(real_data / fname, chips[ident].bounds, 448)
            assert str(arr.dtype) == str(ref.dtype)
            got_valid = ~(np.isnan(arr) if arr.dtype.kind == "f" else arr == nodata)
            np.testing.assert_array_equal(arr[:, inside], ref[:, inside], err_msg=f"{fname} chip {ident}")
            assert not got_valid[:, ~inside].any()  # outside the footprint: nodata
            coverage[ident] = inside.mean()
        best = max(coverage, key=coverage.get)
        assert coverage[best] > 0.3
    # auto = bilinear for continuous layers: close to the nearest-neighbour read, never NaN inside the footprint
    s = ingest(IngestConfig(str(tmp_path / "hub"), [str(real_data / S1)], "s1floods", user_yaml, progress=False,
                            folder="s1floods"))
    assert s["rasters"][0]["resampling"] == "bilinear"
    arr, _ = read_chip(chip_files(res, "s1floods")[best])
    ref, inside = nearest_reference(real_data / S1, chips[best].bounds, 448)
    inner = inside.copy()
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    assert not np.isnan(arr[:, inside]).any()
    assert np.median(np.abs(arr - ref)[:, inner]) < 0.5  # dB; speckle differs pixel to pixel
    # build takes the user modalities through to shards
    out = tmp_path / "shards"
    assert cli(["build", str(tmp_path / "hub"), str(out), "--modalities-file", user_yaml, "-q",
                "--modalities", "s1floods,s2l1c"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["members"] == {"s1floods": len(res.chips), "s2l1c": len(res.chips)}


@pytest.mark.parametrize("fname", [WORLDCOVER, S2, DEM])
def test_real_lonlat_nearest_index_path_equals_gdal_warp(real_data, tmp_path, fname):
    """Lon/lat sources cut with nearest skip GDAL's warper (pure index selection); on every chip that gives exactly
    what the warper gives, values and validity (DEM: compound EPSG:9707 counts as lon/lat)."""
    from m3leo_stream.modalities import Modality
    from shard_tools.ingest import index_chip, inspect_raster, warp_chip

    path = real_data / fname
    res = raster_grid(path, tmp_path / "hub", "t")
    with rasterio.open(path) as src:
        m = Modality(name="t", folder_pattern="t", file_ext="tif", bands=tuple(f"b{i}" for i in range(src.count)),
                     dtype=src.dtypes[0], kind="continuous", resolution_m=10, description="", source="")
        r = inspect_raster(str(path), m, IngestConfig("", [], "t"))
        assert r.lonlat
        r.resampling = "nearest"
        for c in res.chips:
            a, a_ok = index_chip(src, r, c.bounds, 448)
            b, b_ok = warp_chip(src, r, c.bounds, 448, fast=False)
            np.testing.assert_array_equal(a_ok, b_ok)
            np.testing.assert_array_equal(a[a_ok], b[b_ok])


def test_real_band_selection_and_untagged_nodata(real_data, tmp_path, user_yaml):
    """--bands picks bands by description or number, in the order given; --src-nodata marks nodata in a file that
    has no nodata tag (the Sen1Floods11 hand label uses -1)."""
    res = raster_grid(real_data / S2, tmp_path / "hub", "spain")
    hubdir = str(tmp_path / "hub")
    ingest(IngestConfig(hubdir, [str(real_data / S2)], "s2l1c", user_yaml, resampling="nearest", progress=False))
    s = ingest(IngestConfig(hubdir, [str(real_data / S2)], "s2rgbn", user_yaml, bands=["B2", "b3", "4", "B8"],
                            resampling="nearest", progress=False))
    assert s["rasters"][0]["bands"] == [2, 3, 4, 8] and s["bands"] == ["B2", "B3", "B4", "B8"]
    full, sel = chip_files(res, "s2l1c"), chip_files(res, "s2rgbn")
    for ident in full:
        np.testing.assert_array_equal(read_chip(full[ident])[0][[1, 2, 3, 7]], read_chip(sel[ident])[0])
    with pytest.raises(IngestError, match="no band named 'B13'"):
        ingest(IngestConfig(hubdir, [str(real_data / S2)], "s2rgbn", user_yaml, bands=["B2", "B3", "B4", "B13"],
                            progress=False))
    label = real_data / "sen1floods11" / "Spain_7370579_LabelHand.tif"
    with rasterio.open(label) as src:
        assert src.nodata is None and (src.read(1) == -1).sum() == 99
    ingest(IngestConfig(hubdir, [str(label)], "water", user_yaml, src_nodata=-1, progress=False))
    codes = set()
    n_inside_nodata = 0
    chips = {c.identifier: c for c in res.chips}
    for ident, p in chip_files(res, "water").items():
        arr, meta = read_chip(p)
        assert meta["nodata"] == -32768
        codes |= set(np.unique(arr).tolist())
        _, inside = nearest_reference(label, chips[ident].bounds, 448)
        n_inside_nodata += int((arr[0][inside] == -32768).sum())
    assert codes <= {-32768, 0, 1} and -1 not in codes
    assert n_inside_nodata > 0  # the label's -1 pixels became nodata


def test_real_worldcover_chips_cover_the_crop_and_keep_class_codes(real_data, tmp_path):
    path = real_data / WORLDCOVER
    res = raster_grid(path, tmp_path / "hub", "saotome")
    s = ingest(IngestConfig(str(tmp_path / "hub"), [str(path)], "esawc", year=2021, workers=2, progress=False))
    assert s["chips_written"] == len(res.chips) == 99 and s["rasters"][0]["resampling"] == "nearest"
    with rasterio.open(path) as src:
        codes_in = set(np.unique(src.read(1)).tolist())
        rb = src.bounds
    files = chip_files(res, "esaworldcover-2021")
    assert len(files) == 99
    codes_out: set[int] = set()
    for p in files.values():
        arr, meta = read_chip(p)
        assert arr.shape == (1, 448, 448) and meta["dtype"] == "uint8" and meta["nodata"] == 0
        codes_out |= set(np.unique(arr).tolist())
    assert codes_out - {0} <= codes_in and len(codes_out - {0}) >= 5  # resampling never invents a code
    chips = [c for c in res.chips if c.identifier in files]
    w = min(c.bounds[0] for c in chips)
    so = min(c.bounds[1] for c in chips)
    e = max(c.bounds[2] for c in chips)
    n = max(c.bounds[3] for c in chips)
    assert w <= rb.left and so <= rb.bottom and e >= rb.right and n >= rb.top  # the chips cover the crop
    # an interior chip equals the direct windowed read
    interior = next(c for c in chips if c.bounds[0] > rb.left and c.bounds[2] < rb.right
                    and c.bounds[1] > rb.bottom and c.bounds[3] < rb.top)
    arr, _ = read_chip(files[interior.identifier])
    ref, inside = nearest_reference(path, interior.bounds, 448)
    assert inside.all() and np.mean(arr == ref) > 0.999
    # mode when aggregating (a coarser user declaration) still only emits codes of the input
    yaml_path = tmp_path / "wc100.yaml"
    yaml_path.write_text("modalities:\n  - name: wc100\n    bands: [landcover]\n    dtype: uint8\n"
                         "    kind: categorical\n    class_codes: [10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100]\n"
                         "    nodata: 0\n    resolution_m: 100\n")
    s = ingest(IngestConfig(str(tmp_path / "hub"), [str(path)], "wc100", str(yaml_path), progress=False))
    assert s["rasters"][0]["resampling"] == "mode"
    out = set()
    for p in chip_files(res, "wc100").values():
        out |= set(np.unique(read_chip(p)[0]).tolist())
    assert out - {0} <= codes_in


def test_real_worldcover_mosaic_of_two_halves_equals_the_whole(real_data, tmp_path):
    """The crop cut into west and east halves (two files) and ingested as a mosaic gives the same chips as the
    whole crop: windows spanning both files are filled from each."""
    path = real_data / WORLDCOVER
    with rasterio.open(path) as src:
        profile = src.profile
        for name, win in (("west", Window(0, 0, 2000, src.height)), ("east", Window(2000, 0, src.width - 2000,
                                                                                      src.height))):
            p = dict(profile, width=win.width, height=win.height, transform=src.window_transform(win))
            with rasterio.open(tmp_path / f"{name}.tif", "w", **p) as dst:
                dst.write(src.read(window=win))
    res = raster_grid(path, tmp_path / "hub", "saotome")
    ingest(IngestConfig(str(tmp_path / "hub"), [str(path)], "esawc", year=2021, progress=False))
    s = ingest(IngestConfig(str(tmp_path / "hub"), [str(tmp_path / "west.tif"), str(tmp_path / "east.tif")], "esawc",
                            year=2020, progress=False))
    assert s["chips_written"] == 99
    whole, halves = chip_files(res, "esaworldcover-2021"), chip_files(res, "esaworldcover-2020")
    assert whole.keys() == halves.keys()
    for ident in whole:
        np.testing.assert_array_equal(read_chip(whole[ident])[0], read_chip(halves[ident])[0])


def test_real_globbiomass_upsampled_onto_chips(real_data, tmp_path, user_yaml):
    res = raster_grid(real_data / WORLDCOVER, tmp_path / "hub", "saotome")
    s = ingest(IngestConfig(str(tmp_path / "hub"), [str(real_data / AGB)], "agb", user_yaml, progress=False))
    assert s["rasters"][0]["resampling"] == "bilinear" and s["pixels"] == [45]
    assert s["chips_written"] + s["chips_all_nodata"] == len(res.chips) and s["chips_written"] > 0
    with rasterio.open(real_data / AGB) as src:
        win = rasterio.windows.from_bounds(6.0, -0.5, 7.25, 1.0, src.transform).round_offsets().round_lengths()
        around = src.read(1, window=win)
    valid_src = around[around > 0]
    for p in chip_files(res, "agb").values():
        arr, meta = read_chip(p)
        assert arr.shape == (1, 45, 45) and arr.dtype == np.float32 and np.isnan(meta["nodata"])
        v = arr[~np.isnan(arr)]
        assert v.size and v.min() >= valid_src.min() - 1e-3 and v.max() <= valid_src.max() + 1e-3
        assert not (v == 0).any()  # source nodata 0 became NaN, never a value


def test_real_rome_dem_in_compound_crs_lands_on_its_chips(real_data, tmp_path, user_yaml):
    path = real_data / DEM
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 9707
    res = raster_grid(path, tmp_path / "hub", "rome")
    # a 1-band DEM at ~90 m (the release's srtmdem is elevation + slope on the 10 m grid)
    s = ingest(IngestConfig(str(tmp_path / "hub"), [str(path)], "dem", modalities_file=user_yaml, progress=False))
    assert s["rasters"][0]["crs"] == "EPSG:9707" and s["rasters"][0]["resampling"] == "average"
    assert s["chips_written"] == len(res.chips) >= 4 and s["pixels"] == [50]
    chips = {c.identifier: c for c in res.chips}
    with rasterio.open(path) as src:
        full = src.read(1).astype(float)
        t = src.transform
    for ident, p in chip_files(res, "dem").items():
        arr, meta = read_chip(p)
        assert arr.dtype == np.int16 and meta["nodata"] == -32768
        valid = arr != -32768
        assert valid.any() and arr[valid].min() >= 5 and arr[valid].max() <= 115
        # the chip's mean height equals the source's over the same covered area
        w, s_, e, n = chips[ident].bounds
        c0, c1 = [int(np.clip(round((x - t.c) / t.a), 0, full.shape[1])) for x in (w, e)]
        r0, r1 = [int(np.clip(round((y - t.f) / t.e), 0, full.shape[0])) for y in (n, s_)]
        if (c1 - c0) * (r1 - r0) > 400:
            assert arr[valid].mean() == pytest.approx(full[r0:r1, c0:c1].mean(), abs=3.0)


# ------------------------------------------------------------------ bad input


def _nothing_written(hubdir: Path) -> None:
    tifs = list(hubdir.rglob("*.tif"))
    assert not tifs, tifs
    assert not list(hubdir.glob(".m3leo-ingest-*"))


def test_bad_inputs_fail_clearly_and_write_nothing(real_data, tmp_path, user_yaml):
    hubdir = tmp_path / "hub"
    raster_grid(real_data / WORLDCOVER, hubdir, "saotome")
    # a raster that does not overlap the grid (Spain onto São Tomé)
    with pytest.raises(IngestError, match=r"Spain_7370579_S1Hand\.tif: does not overlap the chip grid"):
        ingest(IngestConfig(str(hubdir), [str(real_data / S1)], "s1floods", user_yaml, progress=False))
    # a corrupt (truncated) file
    bad = tmp_path / "truncated.tif"
    bad.write_bytes((real_data / WORLDCOVER).read_bytes()[:5000])
    with pytest.raises(IngestError, match=r"truncated\.tif: cannot be read"):
        ingest(IngestConfig(str(hubdir), [str(bad)], "esawc", year=2021, progress=False))
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 100)
    with pytest.raises(IngestError, match=r"junk\.tif: cannot be read"):
        ingest(IngestConfig(str(hubdir), [str(real_data / WORLDCOVER), str(junk)], "esawc", year=2021,
                            progress=False))
    # band count disagreeing with the declared modality (13-band S2 as the 2-band S1 modality)
    with pytest.raises(IngestError, match=r"13 band\(s\) selected .* modality s1floods declares 2"):
        ingest(IngestConfig(str(hubdir), [str(real_data / S2)], "s1floods", user_yaml, progress=False))
    # categorical layers refuse interpolating resamplers; NetCDF modalities and unknown names are explained
    with pytest.raises(IngestError, match="would invent values"):
        ingest(IngestConfig(str(hubdir), [str(real_data / WORLDCOVER)], "esawc", year=2021, resampling="bilinear",
                            progress=False))
    with pytest.raises(IngestError, match="NetCDF"):
        ingest(IngestConfig(str(hubdir), [str(real_data / AGB)], "biomass", progress=False))
    with pytest.raises(IngestError, match="(?s)unknown modality .floods.*modalities:"):
        ingest(IngestConfig(str(hubdir), [str(real_data / AGB)], "floods", progress=False))
    _nothing_written(hubdir)
    # through the CLI: exit 1, the reason in the log
    assert cli(["ingest-raster", "--chips", str(hubdir), "--raster", str(bad), "--modality", "esawc",
                "--year", "2021", "-q"]) == 1
    _nothing_written(hubdir)


def test_a_failure_midway_publishes_nothing(tmp_path, user_yaml, monkeypatch):
    """A file whose header is fine but whose later tiles are cut off fails on a chip after others succeeded: the
    chips already cut are not published."""
    codes = np.random.default_rng(2).integers(1, 6, size=(1, 2048, 2048)).astype(np.uint8)
    good = _write(tmp_path / "lu.tif", codes, (9.0, 45.0, 9.12, 45.1), "EPSG:4326", nodata=0, tiled=True)
    data = good.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    hubdir = tmp_path / "hub"
    make_grid(read_aoi(bounds_wkt((9.0, 45.0, 9.12, 45.1))), str(hubdir), "cut")
    import shard_tools.ingest as ingest_mod

    done = []
    real_cut = ingest_mod.cut_chip
    monkeypatch.setattr(ingest_mod, "cut_chip", lambda *a: done.append(real_cut(*a)) or done[-1])
    with pytest.raises(IngestError, match=r"cut\.tif: reading the window of chip [0-9a-f]{13} failed"):
        ingest(IngestConfig(str(hubdir), [str(cut)], "landuse", user_yaml, progress=False, workers=2))
    assert any(st == "written" for st, _ in done)  # some chips were cut before the failure ...
    _nothing_written(hubdir)  # ... and none of them was published


def test_user_modalities_flow_through_loader_and_device_transforms(tmp_path, user_yaml, capsys):
    """A user-declared categorical and continuous layer, ingested and built, is read by the DataModule and
    handled by the device transforms like M3LEO's own products."""
    import yaml

    from m3leo_stream.datamodule import M3LEODataModule

    test_generated_grid_ingest_build_shard_equals_expected(tmp_path, user_yaml, capsys)
    root = tmp_path / "shards"
    stats = json.loads((root / "stats.json").read_text())
    assert {"landuse", "ramp"} <= set(stats)
    cfg = yaml.safe_load((REPO / "m3leo_stream" / "configs" / "transforms" / "default.yaml").read_text())
    dm = M3LEODataModule(str(root), inputs=["ramp"], targets=["landuse"], batch_size=2, num_workers=0,
                         transforms=cfg)
    dm.setup()
    n = 0
    for batch in dm.train_dataloader():
        raw = batch["landuse"].clone()
        out = dm.on_after_batch_transfer(batch, 0)
        assert out["ramp"].dtype == torch.float32 and torch.isfinite(out["ramp"]).all()
        lab = out["landuse"]
        # the training grid is the input's (112 px); the 448 px label is taken by nearest neighbour
        assert lab.dtype == torch.int64 and lab.shape == (2, 112, 112) == tuple(out["ramp"].shape[:1]) + (112, 112)
        # codes 1..5 → classes 0..4, nodata 0 → ignore_index; nothing invented
        # (no trainer attached: evaluation transforms, no augmentation, so the labels are exactly comparable)
        ignore = dm.device_transforms(False).ignore_index
        want = torch.where(raw[:, 0] == 0, torch.tensor(ignore), raw[:, 0].long() - 1)
        # an output pixel centre falls between source pixels 4i+1 and 4i+2 (a tie); either is a correct nearest pick
        ok = torch.zeros_like(lab, dtype=torch.bool)
        for dy in (1, 2):
            for dx in (1, 2):
                ok |= lab == want[:, dy::4, dx::4]
        assert ok.all()
        n += 1
    assert n > 0
