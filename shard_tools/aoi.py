"""Chip grids for a user's area of interest: M3LEO's 4480 m chips covering an AOI polygon, written in the hub
layout (chip geojson, split csv from geographic stripes, data folder) that ``build`` and ``ingest-raster`` read.

The default grid (``layout="global"``) is the global one of :mod:`shard_tools.grid` (rows anchored at the equator,
columns at 0° longitude, square in metres, covering the AOI), so two AOIs that overlap share the chips and identifiers
of their overlap. ``layout="upstream"`` is ``geet grid``'s (:func:`shard_tools.grid.upstream_grid`): anchored at the
AOI's UTM envelope, chips 1 m short of the pitch, the AOI's east and north edges not covered. Either way identifiers
and the grid hash are computed as geetiles computes them (``utils.get_region_hash``, ``utils.get_regionlist_hash``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np

from m3leo_stream.modalities import CHIP_SIZE_M
from m3leo_stream.storage import get_fs, join
from shard_tools import grid
from shard_tools.publish import pipe_atomic

log = logging.getLogger(__name__)
MAX_CHIPS = 5_000_000


@dataclass
class GridResult:
    """What ``make_grid`` wrote."""

    region: str
    grid_hash: str
    chips: list[grid.Chip]
    splits: list[str]
    geojson: str
    split_csv: str
    data_dir: str

    def summary(self) -> dict[str, Any]:
        counts = {s: self.splits.count(s) for s in ("train", "val", "test")}
        return {"region": self.region, "grid_hash": self.grid_hash, "chips": len(self.chips), "splits": counts,
                "geojson": self.geojson, "split_csv": self.split_csv, "data_dir": self.data_dir}


def read_aoi(text: str, where: str = "AOI"):
    """A shapely (Multi)Polygon in lon/lat from GeoJSON (geometry, Feature or FeatureCollection) or WKT text."""
    import shapely
    from shapely.geometry import shape
    from shapely.ops import unary_union

    t = text.strip()
    try:
        if t.startswith("{"):
            doc = json.loads(t)
            if doc.get("type") == "FeatureCollection":
                geoms = [shape(f["geometry"]) for f in doc.get("features", []) if f.get("geometry")]
            elif doc.get("type") == "Feature":
                geoms = [shape(doc["geometry"])]
            else:
                geoms = [shape(doc)]
            if not geoms:
                raise ValueError("no geometry")
            geom = geoms[0] if len(geoms) == 1 else unary_union(geoms)  # one polygon stays as written
        else:
            geom = shapely.from_wkt(t)
    except Exception as e:  # json, shapely and key errors all mean the same to the user
        raise ValueError(f"{where}: not a GeoJSON or WKT polygon: {e}") from e
    if geom.is_empty or geom.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
        raise ValueError(f"{where}: expected a polygon in lon/lat degrees, got {geom.geom_type}")
    if not geom.is_valid:
        geom = geom.buffer(0)
    west, south, east, north = geom.bounds
    if west < -180 or east > 180 or south < -90 or north > 90:
        raise ValueError(f"{where}: bounds {geom.bounds} are not lon/lat degrees (EPSG:4326 expected)")
    return geom


def load_aoi(path: str, storage_options: dict[str, Any] | None = None):
    """Read an AOI file (``.geojson``/``.json`` or ``.wkt``; local or fsspec URL)."""
    with fsspec.open(path, "rt", **(storage_options or {})) as f:
        return read_aoi(f.read(), where=path)


def region_name(text: str) -> str:
    """A region name the hub file names accept ([a-z0-9]+), e.g. from the AOI file's stem."""
    name = re.sub(r"[^a-z0-9]", "", text.lower())
    if not name:
        raise ValueError(f"cannot make a region name from {text!r}: use --region with letters and digits")
    return name


def chips_for_aoi(geom, region: str, size_m: float = CHIP_SIZE_M) -> list[grid.Chip]:
    """Every chip of the global grid whose square intersects ``geom``, sorted north to south, west to east."""
    import shapely
    from shapely.geometry import box

    w, s, e, n = geom.bounds
    shapely.prepare(geom)
    chips: list[grid.Chip] = []
    for lat in grid.grid_rows(s, n, size_m)[::-1]:
        lons = grid.grid_cols(w, e, float(lat), size_m)
        if len(chips) + len(lons) > MAX_CHIPS:
            raise ValueError(f"AOI needs more than {MAX_CHIPS} chips; split it into several regions")
        cand = [grid.make_chip(region, float(lon), float(lat), size_m) for lon in lons]
        hits = shapely.intersects(geom, [box(*c.bounds) for c in cand]) if cand else []
        chips += [c for c, hit in zip(cand, hits) if hit]
    return chips


def grid_hash(chips: list[grid.Chip]) -> str:
    """Upstream's grid hash of the chips in the order they are written (geetiles ``utils.get_regionlist_hash``)."""
    return grid.regionlist_hash(c.identifier for c in chips)


def make_grid(
    aoi_geom,
    out: str,
    region: str,
    size_m: float = CHIP_SIZE_M,
    stripes: int = 60,
    angle: int = 9,
    fractions: str = "60-20-20",
    storage_options: dict[str, Any] | None = None,
    layout: Literal["global", "upstream"] = "global",
) -> GridResult:
    """Write the chip geojson, the split csv and an empty data folder for ``aoi_geom`` under ``out``.

    ``layout``: ``"global"`` (chips sorted by identifier) or ``"upstream"`` (``geet grid``'s chips and order)."""
    if not grid.REGION_RE.fullmatch(f"{region}_partitions_aschips_0") or "_" in region:
        raise ValueError(f"region {region!r}: use lowercase letters and digits only (it becomes part of hub names)")
    if stripes < 1:
        raise ValueError("--stripes must be at least 1")
    if not 0 <= angle < 100:
        raise ValueError("--angle must be an integer in 0..99 degrees (it is written as angleNN)")
    if not 100 <= size_m <= 100_000:
        raise ValueError(f"--chip-size-m {size_m}: expected metres between 100 and 100000")
    frac = grid.parse_fractions(fractions)
    if layout == "global":
        chips = chips_for_aoi(aoi_geom, region, size_m)
        chips.sort(key=lambda c: c.identifier)
    elif layout == "upstream":
        chips = grid.upstream_grid(aoi_geom, size_m, max_chips=MAX_CHIPS)
    else:
        raise ValueError(f"layout {layout!r}: expected 'global' or 'upstream'")
    if not chips:
        raise ValueError("the AOI covers no chip")
    idents = [c.identifier for c in chips]
    if len(set(idents)) != len(idents):
        raise ValueError("identifier collision in the chip grid (report this)")
    lon = np.array([c.lon for c in chips])
    lat = np.array([c.lat for c in chips])
    splits = grid.stripe_splits(lon, lat, angle, stripes, frac)
    ghash = grid_hash(chips)
    fs, root = get_fs(out, storage_options)
    stem = grid.region_stem(region, ghash)
    geojson = join(root, f"{stem}.geojson")
    csv = join(root, grid.split_csv_name(region, ghash, angle, stripes, "-".join(str(f) for f in frac)))
    data_dir = join(root, stem)
    existing = [p for p in fs.glob(join(root, f"{region}_partitions_aschips_*_splits_*.csv"))
                if not p.endswith(csv.rsplit("/", 1)[-1])]
    if existing:
        raise ValueError(f"{out} already holds region {region!r} with another grid ({existing[0]}); "
                         "use another --region or --out")
    pipe_atomic(fs, geojson, grid.geojson_bytes(chips))
    pipe_atomic(fs, csv, grid.split_csv_bytes((c.identifier, s) for c, s in zip(chips, splits)))
    fs.makedirs(data_dir, exist_ok=True)
    log.info("grid %s: %d chips (%s) → %s", region, len(chips), ", ".join(
        f"{s} {splits.count(s)}" for s in ("train", "val", "test")), out)
    return GridResult(region, ghash, chips, splits, geojson, csv, data_dir)


def default_region(aoi_path: str) -> str:
    return region_name(Path(aoi_path.rstrip("/").rsplit("/", 1)[-1]).stem)
