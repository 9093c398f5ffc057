"""The M3LEO chip grid: identifiers, chip polygons, geographic-stripe splits and hub file names.

Identifiers and grid hashes follow geetiles at commit 142fdf2 (the code that made the M3LEO release):
``utils.get_region_hash`` / ``utils.get_regionlist_hash``, and :func:`upstream_grid` reproduces ``geet grid``
(``cmds.build_grid``). The default grid of :func:`make_chip`/:func:`grid_rows`/:func:`grid_cols` is our own.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, Any

import numpy as np

from m3leo_stream.modalities import CHIP_SIZE_M

if TYPE_CHECKING:
    from pyproj import CRS

M_PER_DEG_LAT = 111_320.0

# Region facts of the published release (reference/m3leo.md §1): grid hash and split-file stripe angle.
HUB_REGIONS: dict[str, dict[str, object]] = {
    "conus": {"grid_hash": "293d95e3ee589", "angle": 9, "origin": (-100.0, 35.0)},
    "europe": {"grid_hash": "2f8bd3f01ddd5", "angle": 9, "origin": (5.0, 45.0)},
    "middleeast": {"grid_hash": "0a596e5469add", "angle": 15, "origin": (45.0, 35.0)},
    "pakin": {"grid_hash": "0f26dc7030c75", "angle": 15, "origin": (75.0, 28.0)},
    "china": {"grid_hash": "23489d30a312b", "angle": 15, "origin": (110.0, 30.0)},
    "southamerica": {"grid_hash": "3219aa0f411c2", "angle": 2, "origin": (-75.0, -10.0)},
}
REGION_RE = re.compile(r"(?P<aoi>[a-z0-9]+)_partitions_aschips_(?P<hash>[0-9a-f]+)")
SPLIT_CSV_RE = re.compile(
    r"(?P<stem>(?P<aoi>[a-z0-9]+)_partitions_aschips_(?P<hash>[0-9a-f]+))_splits_"
    r"(?P<stripes>\d+)bands_angle(?P<angle>\d+)_(?P<fractions>\d+-\d+-\d+)(?P<suffix>_miniset|_parquet)?\.csv"
)


def get_hash(text: str) -> str:
    """Upstream's identifier form: sha256 → int mod 10**15 → 13 lowercase hex digits."""
    h = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10**15
    return format(h, "x").zfill(13)


# numpy's default print options: upstream hashes str() of an array, so the text must not follow np.set_printoptions
_NP_STR: dict[str, Any] = {"max_line_width": 75, "precision": 8, "suppress_small": False, "separator": " ",
                           "prefix": "", "floatmode": "maxprec", "sign": "-", "threshold": 1000, "edgeitems": 3,
                           "legacy": False}


def envelope_text(geom) -> str:
    """The text upstream hashes for a shapely geometry (geetiles utils.get_region_hash):
    ``str(np.r_[geom.envelope.boundary.coords].round(5))`` with numpy's default print options."""
    coords = np.asarray(geom.envelope.boundary.coords, dtype=float).round(5)
    return np.array2string(coords, **_NP_STR)


def bounds_text(bounds: Sequence[float]) -> str:
    """:func:`envelope_text` of the rectangle ``(west, south, east, north)``, without shapely (GEOS writes an
    envelope ring as (w s, e s, e n, w n, w s)); a fast path for the usual positional layout, numpy otherwise."""
    w, s, e, n = np.asarray(bounds, dtype=float).round(5)
    vals = [float(w), float(s), float(e), float(n)]
    nz = [abs(v) for v in vals if v != 0]
    if not all(math.isfinite(v) for v in vals) or (nz and (max(nz) >= 1e8 or min(nz) < 1e-4
                                                         or max(nz) / min(nz) > 1000.0)):
        ring = np.array([[w, s], [e, s], [e, n], [w, n], [w, s]])
        return np.array2string(ring, **_NP_STR)  # numpy switches to scientific notation here
    parts = [repr(v).split(".") for v in vals]
    left = max(len(i) for i, _ in parts)
    right = max(len(f.rstrip("0")) for _, f in parts)
    ws, ss, es, ns = (i.rjust(left) + "." + f.rstrip("0").ljust(right) for i, f in parts)
    return f"[[{ws} {ss}]\n [{es} {ss}]\n [{es} {ns}]\n [{ws} {ns}]\n [{ws} {ss}]]"


def region_hash(geom) -> str:
    """Identifier of a shapely geometry in lon/lat, as geetiles ``utils.get_region_hash`` computes it."""
    return get_hash(envelope_text(geom))


def bounds_identifier(bounds: Sequence[float]) -> str:
    """:func:`region_hash` of the lon/lat rectangle ``(west, south, east, north)``."""
    return get_hash(bounds_text(bounds))


def regionlist_hash(identifiers: Iterable[str]) -> str:
    """Grid hash of the ``<aoi>_partitions_aschips_<hash>`` names (geetiles ``utils.get_regionlist_hash``): the
    chips' identifiers joined by single spaces, in the order of the geojson's features."""
    return get_hash(" ".join(identifiers))


def chip_identifier(aoi: str, lon: float, lat: float, size_m: float = CHIP_SIZE_M) -> str:
    """Identifier of the chip of :func:`make_chip` centred at (lon, lat): upstream's rule on its rectangle, so it
    depends on the geometry only (``aoi`` is kept for callers; upstream does not hash the region name)."""
    return bounds_identifier(chip_bounds(lon, lat, size_m))


@dataclass(frozen=True)
class Chip:
    identifier: str
    lon: float
    lat: float
    bounds: tuple[float, float, float, float]  # west, south, east, north (degrees)
    area_km2: float | None = None  # as upstream measured it (UTM); None: estimated when written

    @property
    def polygon(self) -> list[list[float]]:
        w, s, e, n = self.bounds
        return [[w, s], [e, s], [e, n], [w, n], [w, s]]


def chip_bounds(lon: float, lat: float, size_m: float = CHIP_SIZE_M) -> tuple[float, float, float, float]:
    """Lon/lat bounds of a square chip of ``size_m`` centred at (lon, lat)."""
    dlat = size_m / M_PER_DEG_LAT
    dlon = size_m / (M_PER_DEG_LAT * math.cos(math.radians(lat)))
    return (lon - dlon / 2, lat - dlat / 2, lon + dlon / 2, lat + dlat / 2)


def make_chip(aoi: str, lon: float, lat: float, size_m: float = CHIP_SIZE_M) -> Chip:
    """The chip of our global grid centred at (lon, lat), with upstream's identifier of its rectangle."""
    bounds = chip_bounds(lon, lat, size_m)
    return Chip(bounds_identifier(bounds), lon, lat, bounds)


def grid_rows(south: float, north: float, size_m: float = CHIP_SIZE_M) -> np.ndarray:
    """Centre latitudes of the grid rows covering [south, north]; rows are anchored at the equator."""
    dlat = size_m / M_PER_DEG_LAT
    first = math.floor(south / dlat)
    last = math.ceil(north / dlat)
    return (np.arange(first, last) + 0.5) * dlat


def grid_cols(west: float, east: float, lat: float, size_m: float = CHIP_SIZE_M) -> np.ndarray:
    """Centre longitudes of the chips of one row covering [west, east]; columns are anchored at 0° longitude."""
    dlon = size_m / (M_PER_DEG_LAT * math.cos(math.radians(lat)))
    first = math.floor(west / dlon)
    last = math.ceil(east / dlon)
    return (np.arange(first, last) + 0.5) * dlon


def utm_crs(lon: float, lat: float) -> CRS:
    """The WGS 84 UTM CRS of (lon, lat), the first PROJ lists (geetiles ``utils.get_utm_crs``)."""
    from pyproj import CRS
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    found = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(
        west_lon_degree=lon, south_lat_degree=lat, east_lon_degree=lon, north_lat_degree=lat))
    if not found:
        raise ValueError(f"no UTM CRS for lon/lat {lon}, {lat}")
    return CRS.from_epsg(found[0].code)


def upstream_grid(aoi, size_m: float = CHIP_SIZE_M, max_chips: int | None = None) -> list[Chip]:
    """The chips ``geet grid`` makes for a lon/lat shapely AOI (geetiles ``cmds.build_grid``), in its order.

    Centres step ``size_m`` in the UTM zone of the AOI's centroid from the south-west corner of the AOI's UTM
    envelope (``floor(range / size_m)`` steps each way, x outer); each chip is a lon/lat rectangle of
    ``size_m - 1`` metres by local metres-per-degree (a 0.001° finite difference in UTM); chips that do not
    intersect the AOI are dropped. Areas are upstream's: UTM areas in the zone of the chips' envelope mean.
    """
    import shapely
    from pyproj import CRS, Transformer

    wgs84 = CRS.from_epsg(4326)
    m = size_m
    utm = utm_crs(*aoi.centroid.coords[0])
    fwd = Transformer.from_crs(wgs84, utm, always_xy=True)
    inv = Transformer.from_crs(utm, wgs84, always_xy=True)
    minx, miny, maxx, maxy = shapely.transform(aoi, lambda c: np.column_stack(fwd.transform(c[:, 0], c[:, 1]))).bounds
    nx, ny = int((maxx - minx) // m), int((maxy - miny) // m)
    if max_chips is not None and nx * ny > max_chips:
        raise ValueError(f"AOI needs more than {max_chips} candidate chips; split it into several regions")
    gx, gy = np.repeat(np.arange(nx), ny), np.tile(np.arange(ny), nx)  # itertools.product(range(nx), range(ny))
    clon, clat = inv.transform(gx * m + minx, gy * m + miny)
    lon0, lat0 = fwd.transform(clon, clat)
    lon1, _ = fwd.transform(clon + 0.001, clat)
    _, lat2 = fwd.transform(clon, clat + 0.001)
    dlon = ((m - 1) / 2) / ((lon1 - lon0) * 1000)
    dlat = ((m - 1) / 2) / ((lat2 - lat0) * 1000)
    w, s, e, n = clon - dlon, clat - dlat, clon + dlon, clat + dlat
    rings = np.stack([np.column_stack(c) for c in ((w, s), (w, n), (e, n), (e, s), (w, s))], axis=1)
    polys = shapely.polygons(rings) if len(rings) else np.array([], dtype=object)
    keep = np.flatnonzero(shapely.intersects(aoi, polys)) if len(polys) else np.array([], dtype=int)
    if not len(keep):
        return []
    # PartitionSet(data=...): area_km2 in the UTM zone of the mean of the chips' envelope ring (5 points)
    ring = np.asarray(shapely.GeometryCollection(list(polys[keep])).envelope.boundary.coords)
    to_area = Transformer.from_crs(wgs84, utm_crs(*ring.mean(axis=0)), always_xy=True)
    area = shapely.area(shapely.transform(polys[keep], lambda c: np.column_stack(to_area.transform(c[:, 0], c[:, 1]))))
    return [Chip(bounds_identifier((w[i], s[i], e[i], n[i])), float(clon[i]), float(clat[i]),
                 (float(w[i]), float(s[i]), float(e[i]), float(n[i])), float(a) / 1e6) for i, a in zip(keep, area)]


def parse_fractions(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split("-")]
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) == 0:
        raise ValueError(f"fractions {text!r}: expected three non-negative integers like 60-20-20")
    return parts[0], parts[1], parts[2]


def split_cycle(fractions: Sequence[int]) -> list[str]:
    """Stripe pattern of one cycle: 60-20-20 → [train, train, train, val, test]."""
    g = reduce(math.gcd, [f for f in fractions if f > 0])
    cycle: list[str] = []
    for name, f in zip(("train", "val", "test"), fractions):
        cycle += [name] * (f // g)
    return cycle


def stripe_coordinate(lon: np.ndarray, lat: np.ndarray, angle_deg: float) -> np.ndarray:
    """Position across stripes tilted by ``angle_deg`` from the meridian (metres-ish: lon scaled by cos(lat))."""
    a = math.radians(angle_deg)
    x = np.asarray(lon) * np.cos(np.radians(lat))
    y = np.asarray(lat)
    return x * math.cos(a) - y * math.sin(a)


def stripe_splits(
    lon: np.ndarray, lat: np.ndarray, angle_deg: float, n_stripes: int = 60, fractions: Sequence[int] = (60, 20, 20)
) -> list[str]:
    """Assign each chip to train/val/test by the geographic stripe it falls in (stripes of equal width)."""
    u = stripe_coordinate(lon, lat, angle_deg)
    lo, hi = float(np.min(u)), float(np.max(u))
    width = (hi - lo) / n_stripes if hi > lo else 1.0
    idx = np.minimum(((u - lo) / width).astype(int), n_stripes - 1)
    cycle = split_cycle(fractions)
    return [cycle[i % len(cycle)] for i in idx]


def region_stem(aoi: str, grid_hash: str) -> str:
    return f"{aoi}_partitions_aschips_{grid_hash}"


def split_csv_name(aoi: str, grid_hash: str, angle: int, stripes: int = 60, fractions: str = "60-20-20",
                   suffix: str = "") -> str:
    return f"{region_stem(aoi, grid_hash)}_splits_{stripes}bands_angle{angle:02d}_{fractions}{suffix}.csv"


def geojson_bytes(chips: Iterable[Chip]) -> bytes:
    """Chip definitions as upstream ships them: features with ``identifier``, ``area_km2`` and a lon/lat polygon."""
    feats = []
    for c in chips:
        w, s, e, n = c.bounds
        area = c.area_km2
        if area is None:
            area = round((e - w) * M_PER_DEG_LAT * math.cos(math.radians(c.lat)) * (n - s) * M_PER_DEG_LAT / 1e6, 4)
        feats.append({
            "type": "Feature",
            "properties": {"identifier": c.identifier, "area_km2": area},
            "geometry": {"type": "Polygon", "coordinates": [c.polygon]},
        })
    return json.dumps({"type": "FeatureCollection", "features": feats}).encode()


def read_geojson_chips(data: bytes) -> dict[str, Chip]:
    """identifier → Chip (centre and bounds from the polygon's extent)."""
    doc = json.loads(data)
    out: dict[str, Chip] = {}
    for f in doc.get("features", []):
        ident = str(f.get("properties", {}).get("identifier", ""))
        geom = f.get("geometry") or {}
        coords = np.asarray(_flatten_coords(geom.get("coordinates", [])), dtype=float)
        if not ident or coords.size == 0:
            continue
        w, s = coords.min(axis=0)
        e, n = coords.max(axis=0)
        out[ident] = Chip(ident, (w + e) / 2, (s + n) / 2, (float(w), float(s), float(e), float(n)))
    return out


def _flatten_coords(c) -> list[list[float]]:
    if c and isinstance(c[0], (int, float)):
        return [c[:2]]
    out: list[list[float]] = []
    for x in c:
        out += _flatten_coords(x)
    return out


def split_csv_bytes(rows: Iterable[tuple[str, str]], extra: dict[str, dict[str, str]] | None = None) -> bytes:
    """``identifier,split[,extra columns]`` CSV bytes."""
    buf = io.StringIO()
    cols = sorted({k for v in (extra or {}).values() for k in v})
    buf.write(",".join(["identifier", "split", *cols]) + "\n")
    for ident, split in rows:
        vals = [(extra or {}).get(ident, {}).get(c, "") for c in cols]
        buf.write(",".join([ident, split, *vals]) + "\n")
    return buf.getvalue().encode()
