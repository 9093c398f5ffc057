"""``ingest-raster`` throughput next to a plain windowed read of the same windows, in one run.

Two inputs: the real WorldCover São Tomé crop (4080×5160 uint8, EPSG:4326, 99 chips) when ``../shared/data/real`` is
present, and a synthetic large Cloud-Optimised GeoTIFF generated in a temporary folder (``--size``² int16 in UTM
33N at 10 m, GDAL's COG driver: 512×512 deflate tiles, overviews), whose chips need a real reprojection. For each input:

- ingest: ``ingest()`` end to end (checks, warping every chip onto its lon/lat grid, nodata handling, GeoTIFF
  encoding (uncompressed, the default), staging and atomic publish);
- ceiling: the same threads read each chip's window of the source (the chip's bounds transformed into the raster's
  CRS) with ``DatasetReader.read(window=...)`` — no warping, no writing. ``ratio`` = ingest chips/s ÷ ceiling
  chips/s; this is the figure the goal (≥ 0.5) is about.

Two further baselines, for reading the ratio (they do not replace the ceiling):

- read+write: the ceiling's reads, each window's bytes then written to its own new file (no encoding, no sync):
  what any tool producing one file per chip pays at least;
- GDAL warp: one GDAL ``WarpedVRT`` per chip onto the chip's lon/lat grid with ingest's resampling, read, no masks,
  no checks, no writing: the pixel work of a warping cut alone.

Repeats alternate the baselines and ingest; medians are reported. One-time process costs (imports, the PROJ
database) are paid first by an untimed ingest of a small generated raster.

    python bench/ingest.py --workers 2 --size 12000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shard_tools import grid  # noqa: E402
from shard_tools.aoi import make_grid, read_aoi  # noqa: E402
from shard_tools.ingest import IngestConfig, ingest  # noqa: E402

USER_YAML = """modalities:
  - name: synthdem
    bands: [value]
    dtype: int16
    kind: continuous
    nodata: -32768
    resolution_m: 10
"""


def make_large(path: Path, size: int) -> None:
    """A ``size``² int16 Cloud-Optimised GeoTIFF (GDAL's COG driver: 512² deflate tiles, overviews) in UTM 33N at
    10 m, smooth terrain-like values."""
    import rasterio
    from rasterio.shutil import copy as rio_copy
    from rasterio.transform import from_origin

    plain = path.with_suffix(".plain.tif")
    transform = from_origin(400_000, 4_700_000, 10, 10)
    with rasterio.open(plain, "w", driver="GTiff", width=size, height=size, count=1, dtype="int16", crs="EPSG:32633",
                       transform=transform, nodata=-32768, tiled=True, blockxsize=512, blockysize=512,
                       BIGTIFF="IF_SAFER") as dst:
        x = np.arange(size, dtype=np.float32)
        rng = np.random.default_rng(0)
        for r0 in range(0, size, 512):
            y = np.arange(r0, min(size, r0 + 512), dtype=np.float32)[:, None]
            block = 500 + 300 * np.sin(x / 900.0) * np.cos(y / 700.0) + rng.normal(0, 3, (len(y), size))
            dst.write(block.astype(np.int16)[None], window=rasterio.windows.Window(0, r0, size, len(y)))
    rio_copy(plain, path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512, OVERVIEW_RESAMPLING="AVERAGE",
             BIGTIFF="IF_SAFER")
    plain.unlink()


def footprint_wkt(path: Path, shrink: float = 0.0) -> str:
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as src:
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    dw, dh = (e - w) * shrink, (n - s) * shrink
    w, s, e, n = w + dw, s + dh, e - dw, n - dh
    return f"POLYGON(({w} {s}, {e} {s}, {e} {n}, {w} {n}, {w} {s}))"


def _timed_per_thread(raster: Path, work, chips: list[grid.Chip], workers: int, **gdal_env) -> float:
    """Seconds to run ``work(src, chip)`` over every chip on ``workers`` threads, each thread with its own open
    dataset of ``raster`` (opening is not timed away: it happens on first use, as in ingest)."""
    import rasterio

    local, opened, lock = threading.local(), [], threading.Lock()

    def run(c: grid.Chip):
        src = getattr(local, "src", None)
        if src is None:
            src = local.src = rasterio.open(raster)
            with lock:
                opened.append(src)
        return work(src, c)

    t0 = time.perf_counter()
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", **gdal_env):
        if workers <= 1:
            for c in chips:
                run(c)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, chips))
    dt = time.perf_counter() - t0
    for s in opened:
        s.close()
    return dt


def _read_window(src, c: grid.Chip):
    """The chip's window of ``src`` (bounds transformed to the raster's CRS, rounded, clipped), read."""
    import rasterio
    from rasterio.warp import transform_bounds
    from rasterio.windows import from_bounds

    b = transform_bounds("EPSG:4326", src.crs, *c.bounds)
    win = from_bounds(*b, src.transform).round_offsets().round_lengths()
    win = win.intersection(rasterio.windows.Window(0, 0, src.width, src.height))
    return src.read(window=win)


def ceiling(raster: Path, chips: list[grid.Chip], workers: int) -> float:
    """Seconds to read every chip's window of ``raster`` (same threads, one dataset per thread)."""
    return _timed_per_thread(raster, _read_window, chips, workers)


def read_write(raster: Path, chips: list[grid.Chip], workers: int, out: Path) -> float:
    """Seconds to read every chip's window (as :func:`ceiling`) and write its bytes to a new file per chip."""
    out.mkdir(parents=True, exist_ok=True)

    def work(src, c: grid.Chip) -> None:
        with open(out / f"{c.identifier}.bin", "wb") as f:
            f.write(_read_window(src, c).tobytes())

    dt = _timed_per_thread(raster, work, chips, workers)
    shutil.rmtree(out)
    return dt


def gdal_warp(raster: Path, chips: list[grid.Chip], workers: int, px: int, resampling: str) -> float:
    """Seconds to warp every chip with one GDAL ``WarpedVRT`` each (no masks, no checks, nothing written)."""
    from rasterio.enums import Resampling
    from rasterio.transform import from_bounds
    from rasterio.vrt import WarpedVRT

    def work(src, c: grid.Chip) -> None:
        with WarpedVRT(src, crs="EPSG:4326", transform=from_bounds(*c.bounds, px, px), width=px, height=px,
                       resampling=Resampling[resampling], src_nodata=None, nodata=None) as vrt:
            vrt.read()

    return _timed_per_thread(raster, work, chips, workers, GDAL_NUM_THREADS="1")


def run_case(name: str, raster: Path, hubdir: Path, modality: str, yaml_path: str | None, workers: int,
             repeats: int, year: int | None = None) -> dict:
    chips_map = grid.read_geojson_chips(next(hubdir.glob("*.geojson")).read_bytes())
    chips = sorted(chips_map.values(), key=lambda c: (-c.lat, c.lon))
    ingest_s, ceil_s, rw_s, warp_s = [], [], [], []
    summary = {}
    for _ in range(repeats):
        ceil_s.append(ceiling(raster, chips, workers))
        for d in hubdir.glob("*_partitions_aschips_*/*"):
            shutil.rmtree(d)  # each repeat is a fresh ingest, not a rerun replacing files
        t0 = time.perf_counter()
        summary = ingest(IngestConfig(str(hubdir), [str(raster)], modality, yaml_path, workers=workers, year=year,
                                      progress=False))
        ingest_s.append(time.perf_counter() - t0)
        rw_s.append(read_write(raster, chips, workers, hubdir / "_read_write"))
        warp_s.append(gdal_warp(raster, chips, workers, summary["pixels"][0], summary["rasters"][0]["resampling"]))
    n = summary["chips_written"] + summary["chips_all_nodata"] + summary["chips_partial_without_nodata"]
    i_med, c_med = statistics.median(ingest_s), statistics.median(ceil_s)
    rw_med, w_med = statistics.median(rw_s), statistics.median(warp_s)
    return {
        "case": name, "raster_px": None, "chips": n, "chips_written": summary["chips_written"],
        "resampling": summary["rasters"][0]["resampling"], "crs": summary["rasters"][0]["crs"],
        "ingest_s": round(i_med, 3), "ingest_chips_per_s": round(n / i_med, 1),
        "ceiling_s": round(c_med, 3), "ceiling_chips_per_s": round(n / c_med, 1),
        "ratio": round(c_med / i_med, 2),
        "read_write_s": round(rw_med, 3), "ratio_vs_read_write": round(rw_med / i_med, 2),
        "gdal_warp_s": round(w_med, 3), "ratio_vs_gdal_warp": round(w_med / i_med, 2),
        "ingest_seconds_by_step_last_repeat": summary["seconds_by_step"],
        "repeats": {"ingest_s": [round(x, 3) for x in ingest_s], "ceiling_s": [round(x, 3) for x in ceil_s],
                    "read_write_s": [round(x, 3) for x in rw_s], "gdal_warp_s": [round(x, 3) for x in warp_s]},
    }


def warm_up(tmp: Path) -> None:
    """Untimed: an ingest of a small raster, so the first timed run does not pay the imports and PROJ set-up."""
    small = tmp / "warmup.tif"
    make_large(small, 1024)
    (tmp / "warmup.yaml").write_text(USER_YAML)
    make_grid(read_aoi(footprint_wkt(small, shrink=0.1)), str(tmp / "warmup"), "warmup")
    ingest(IngestConfig(str(tmp / "warmup"), [str(small)], "synthdem", str(tmp / "warmup.yaml"), progress=False))
    chips = list(grid.read_geojson_chips(next((tmp / "warmup").glob("*.geojson")).read_bytes()).values())
    ceiling(small, chips, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=12000, help="side of the synthetic raster in pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--real", default=str(REPO.parent / "shared" / "data" / "real"))
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "ingest.json"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="m3leo-bench-ingest-"))
    cases = []
    try:
        warm_up(tmp)
        wc = Path(a.real) / "esa_worldcover" / "DERIVED_SaoTome_WorldCover_v200_2021_crop.tif"
        if wc.is_file():
            make_grid(read_aoi(footprint_wkt(wc)), str(tmp / "wc"), "saotome")
            cases.append(run_case("WorldCover São Tomé crop (EPSG:4326, uint8, nearest)", wc, tmp / "wc", "esawc",
                                  None, a.workers, a.repeats, year=2021))
            cases[-1]["raster_px"] = "4080x5160"
        else:
            print(f"(skipping the WorldCover case: {wc} not found)", file=sys.stderr)
        big = tmp / "large.tif"
        t0 = time.perf_counter()
        make_large(big, a.size)
        gen_s = time.perf_counter() - t0
        yaml_path = tmp / "user.yaml"
        yaml_path.write_text(USER_YAML)
        make_grid(read_aoi(footprint_wkt(big, shrink=0.02)), str(tmp / "big"), "large")
        cases.append(run_case(f"synthetic {a.size}² COG (UTM 33N, int16, bilinear)", big, tmp / "big", "synthdem",
                              str(yaml_path), a.workers, a.repeats))
        cases[-1]["raster_px"] = f"{a.size}x{a.size}"
        cases[-1]["generate_s"] = round(gen_s, 1)
        cases[-1]["raster_mb_on_disk"] = round(big.stat().st_size / 1e6, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"benchmark": "ingest", "machine": f"{platform.machine()} {os.cpu_count()} cpus, CPU only",
              "workers": a.workers, "goal": 0.5, "cases": cases}
    print(json.dumps(result))
    print(f"\n{'case':58s}{'chips':>6s}{'ingest chips/s':>16s}{'ceiling chips/s':>17s}{'ratio':>7s}"
          f"{'vs read+write':>15s}{'vs GDAL warp':>14s}")
    for c in cases:
        print(f"{c['case']:58s}{c['chips']:>6d}{c['ingest_chips_per_s']:>16.1f}{c['ceiling_chips_per_s']:>17.1f}"
              f"{c['ratio']:>7.2f}{c['ratio_vs_read_write']:>15.2f}{c['ratio_vs_gdal_warp']:>14.2f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
