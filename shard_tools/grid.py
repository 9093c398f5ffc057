"""The M3LEO chip grid: identifiers, chip polygons, geographic-stripe splits and hub file names."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from m3leo_stream.modalities import CHIP_SIZE_M

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


def chip_identifier(aoi: str, lon: float, lat: float) -> str:
    """Identifier of the chip centred at (lon, lat). The exact upstream input to the hash is UNVERIFIED; this uses
    the region name and the centre rounded to 1e-6 degrees, which is unique on any grid of 4480 m chips."""
    return get_hash(f"{aoi}:{lon:.6f}:{lat:.6f}")


@dataclass(frozen=True)
class Chip:
    identifier: str
    lon: float
    lat: float
    bounds: tuple[float, float, float, float]  # west, south, east, north (degrees)

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
    return Chip(chip_identifier(aoi, lon, lat), lon, lat, chip_bounds(lon, lat, size_m))


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
        area = (e - w) * M_PER_DEG_LAT * math.cos(math.radians(c.lat)) * (n - s) * M_PER_DEG_LAT / 1e6
        feats.append({
            "type": "Feature",
            "properties": {"identifier": c.identifier, "area_km2": round(area, 4)},
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
