"""Chip identifiers and grid hashes against geetiles (rramosp/geetiles @ 142fdf2, the code that made M3LEO).

Upstream's formulas are restated here on their own (``_upstream_*``), copied from geetiles ``utils.get_region_hash``,
``utils.get_regionlist_hash`` and ``cmds.build_grid``. ``data/geetiles_luxembourg.wkt`` is geetiles'
``data/luxembourg.wkt`` (MIT licence, (c) rramosp); its README says ``geet grid --chip_size_meters 1000`` on it makes
``lux_partitions_aschips_14c55eb7d417f.geojson``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import shapely
from pyproj import CRS, Transformer
from shapely.geometry import shape

from shard_tools import grid
from shard_tools.aoi import make_grid, read_aoi

LUX = Path(__file__).parent / "data" / "geetiles_luxembourg.wkt"
LUX_GRID_HASH = "14c55eb7d417f"  # geetiles README.md:21 @ 142fdf2
HEX13 = re.compile(r"[0-9a-f]{13}")


def _upstream_region_hash(region) -> str:
    s = str(np.r_[region.envelope.boundary.coords].round(5))
    k = int(hashlib.sha256(s.encode("utf-8")).hexdigest(), 16) % 10**15
    return str(hex(k))[2:].zfill(13)


def _upstream_regionlist_hash(regionlist) -> str:
    s = " ".join(_upstream_region_hash(i) for i in regionlist)
    k = int(hashlib.sha256(s.encode("utf-8")).hexdigest(), 16) % 10**15
    return str(hex(k))[2:].zfill(13)


def _upstream_build_grid(aoi, m):
    """cmds.build_grid point by point (geopandas' to_crs is pyproj with always_xy)."""
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    lon, lat = aoi.centroid.coords[0]
    info = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(lon, lat, lon, lat))
    utm = CRS.from_epsg(info[0].code)
    fwd = Transformer.from_crs(CRS.from_epsg(4326), utm, always_xy=True)
    inv = Transformer.from_crs(utm, CRS.from_epsg(4326), always_xy=True)
    aoim = shapely.transform(aoi, lambda c: np.column_stack(fwd.transform(c[:, 0], c[:, 1])))
    rcoords = np.r_[aoim.envelope.boundary.coords]
    minx, miny = rcoords.min(axis=0)
    maxx, maxy = rcoords.max(axis=0)
    parts = []
    for gx, gy in itertools.product(range(int((maxx - minx) // m)), range(int((maxy - miny) // m))):
        clon, clat = inv.transform(gx * m + minx, gy * m + miny)
        lon0, lat0 = fwd.transform(clon, clat)
        lon1, _ = fwd.transform(clon + 0.001, clat)
        _, lat2 = fwd.transform(clon, clat + 0.001)
        dlon = ((m - 1) / 2) / ((lon1 - lon0) * 1000)
        dlat = ((m - 1) / 2) / ((lat2 - lat0) * 1000)
        part = shapely.Polygon([[clon - dlon, clat - dlat], [clon - dlon, clat + dlat], [clon + dlon, clat + dlat],
                                [clon + dlon, clat - dlat], [clon - dlon, clat - dlat]])
        if aoi.intersects(part):
            parts.append(part)
    return parts


def _lux():
    return shapely.from_wkt(LUX.read_text())


# ------------------------------------------------------------------ identifiers


def test_known_identifier_text_and_hash():
    bounds = (5.73426506223336, 49.8131210175015, 5.7481558056727415, 49.82210878938217)  # first lux 1 km chip
    text = ("[[ 5.73427 49.81312]\n [ 5.74816 49.81312]\n [ 5.74816 49.82211]\n [ 5.73427 49.82211]\n"
            " [ 5.73427 49.81312]]")
    assert grid.bounds_text(bounds) == text
    assert grid.envelope_text(shapely.box(*bounds)) == text
    assert grid.get_hash(text) == "132e3b06023c3"
    assert grid.bounds_identifier(bounds) == grid.region_hash(shapely.box(*bounds)) == "132e3b06023c3"
    assert grid.get_hash("") == "00103c2d23855"  # sha256("") mod 1e15, zero-padded to 13 hex digits


@pytest.mark.parametrize("geom", [
    shapely.box(-100.2, 35.0, -100.15, 35.04),
    shapely.box(-75.000004, -10.3, -74.96, -10.26),
    shapely.box(0.001, 0.002, 0.04, 0.041),  # numpy switches to scientific notation here
    shapely.box(-0.01, 51.4, 0.03, 51.44),
    shapely.box(179.96, -17.0, 180.0, -16.96),
    shapely.box(10, 45, 11, 46),  # integer-valued: "10." etc.
    shapely.Polygon([(10.1, 45.0), (10.3, 45.1), (10.0, 45.25)]),
    shapely.MultiPolygon([shapely.box(1, 1, 2, 2), shapely.box(3.5, -1.25, 4, 0)]),
])
def test_region_hash_is_upstreams_formula(geom):
    assert grid.region_hash(geom) == _upstream_region_hash(geom)
    assert grid.envelope_text(geom) == str(np.r_[geom.envelope.boundary.coords].round(5))
    assert grid.bounds_identifier(geom.bounds) == _upstream_region_hash(geom)


def test_bounds_text_fast_path_equals_numpy_str():
    rng = np.random.default_rng(7)
    scales = [180.0, 10.0, 1.0, 0.05, 1e-3, 1e-4]
    cases = []
    for scale in scales:
        for _ in range(1500):
            w, s = rng.uniform(-scale, scale, 2)
            dw, ds = rng.uniform(1e-6, 0.2, 2)
            cases.append((w, s, w + dw, s + ds))
    cases += [(0.0, 0.0, 1.0, 1.0), (-0.000001, -0.000004, 0.5, 0.5), (-180, -90, 180, 90), (0.0001, 1, 0.1, 2),
              (5e-5, 1, 0.1, 2), (0.1, 1, 100.0001, 2), (0.1, 1, 99.9999, 2), (-0.99999, 45.0, -1e-5, 45.5)]
    for b in cases:
        want = str(np.r_[shapely.box(*b).envelope.boundary.coords].round(5))
        assert grid.bounds_text(b) == want, b


def test_identifier_ignores_numpy_print_options():
    geom = shapely.box(-100.2, 35.0, -100.15, 35.04)
    want = _upstream_region_hash(geom)
    with np.printoptions(precision=2, floatmode="fixed", suppress=True, linewidth=20):
        assert grid.region_hash(geom) == want
        assert grid.bounds_identifier(geom.bounds) == want


def test_regionlist_hash_is_upstreams_and_order_sensitive():
    geoms = [shapely.box(10 + i * 0.05, 45, 10.04 + i * 0.05, 45.04) for i in range(5)]
    ids = [grid.region_hash(g) for g in geoms]
    assert grid.regionlist_hash(ids) == _upstream_regionlist_hash(geoms)
    assert grid.regionlist_hash(ids[::-1]) == _upstream_regionlist_hash(geoms[::-1]) != grid.regionlist_hash(ids)
    assert HEX13.fullmatch(grid.regionlist_hash(ids))


def test_make_chip_identifier_is_upstreams_rule_on_its_rectangle():
    chips = [grid.make_chip("anyaoi", float(lon), float(lat)) for lat in grid.grid_rows(44.9, 45.3)
             for lon in grid.grid_cols(9.9, 10.4, float(lat))]
    assert len(chips) > 40
    for c in chips:
        assert HEX13.fullmatch(c.identifier)
        assert c.identifier == _upstream_region_hash(shapely.box(*c.bounds))
        assert c.identifier == grid.chip_identifier("other", c.lon, c.lat)  # geometry only, no region name
    assert len({c.identifier for c in chips}) == len(chips)


# ------------------------------------------------------------------ geet grid (cmds.build_grid)


def test_upstream_grid_reproduces_geetiles_luxembourg_grid_hash():
    chips = grid.upstream_grid(_lux(), 1000)
    assert len(chips) == 2774
    assert grid.regionlist_hash(c.identifier for c in chips) == LUX_GRID_HASH
    assert len({c.identifier for c in chips}) == len(chips)
    assert all(HEX13.fullmatch(c.identifier) for c in chips)


def test_upstream_grid_equals_pointwise_restatement():
    for aoi, m in ((_lux(), 1000), (shapely.box(-58.7, -34.9, -58.3, -34.5), 4480),
                   (shapely.Polygon([(10.0, 45.0), (10.3, 45.0), (10.3, 45.2), (10.1, 45.25)]), 4480)):
        chips = grid.upstream_grid(aoi, m)
        parts = _upstream_build_grid(aoi, m)
        assert len(chips) == len(parts) > 5
        for c, p in zip(chips, parts):
            assert c.bounds == p.bounds
            assert c.identifier == _upstream_region_hash(p)
        assert grid.regionlist_hash(c.identifier for c in chips) == _upstream_regionlist_hash(parts)


def test_upstream_grid_areas_and_chip_size():
    chips = grid.upstream_grid(_lux(), 1000)
    # upstream: 999 m sides by local metres per degree in UTM 32N → just under 1 km²
    assert all(0.997 < c.area_km2 < 1.0 for c in chips)
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True)
    w, s, e, n = chips[0].bounds
    x, y = to_utm.transform([w, e, w], [s, s, n])
    # the finite difference measures UTM x along a parallel and UTM y along a meridian: those components are
    # size - 1 m; the true edges are longer by the meridian convergence (~2.5° here)
    assert x[1] - x[0] == pytest.approx(999, abs=0.5) and y[2] - y[0] == pytest.approx(999, abs=0.5)
    assert np.hypot(x[1] - x[0], y[1] - y[0]) > 999.5


def test_upstream_grid_refuses_too_many_candidates():
    with pytest.raises(ValueError, match="candidate chips"):
        grid.upstream_grid(_lux(), 1000, max_chips=100)


# ------------------------------------------------------------------ hub files written by aoi.make_grid


def _features(path: str):
    return json.loads(Path(path).read_text())["features"]


def test_make_grid_upstream_layout_writes_geet_grids_file(tmp_path):
    res = make_grid(read_aoi(LUX.read_text()), str(tmp_path), "lux", size_m=1000, stripes=8, layout="upstream")
    assert res.grid_hash == LUX_GRID_HASH
    assert Path(res.geojson).name == f"lux_partitions_aschips_{LUX_GRID_HASH}.geojson"
    feats = _features(res.geojson)
    geoms = [shape(f["geometry"]) for f in feats]
    # upstream's save() check: the hash recomputed from the file's geometries, in file order, is the name's
    assert _upstream_regionlist_hash(geoms) == LUX_GRID_HASH
    assert [f["properties"]["identifier"] for f in feats] == [_upstream_region_hash(g) for g in geoms]
    assert [line.split(",")[0] for line in Path(res.split_csv).read_text().splitlines()[1:]] == \
        [f["properties"]["identifier"] for f in feats]


def test_make_grid_global_layout_identifiers_and_hash_follow_upstream(tmp_path):
    aoi = read_aoi(json.dumps({"type": "Polygon", "coordinates": [
        [[10.0, 45.0], [10.3, 45.0], [10.3, 45.2], [10.1, 45.25], [10.0, 45.0]]]}))
    res = make_grid(aoi, str(tmp_path), "myaoi", stripes=6, angle=15)
    feats = _features(res.geojson)
    geoms = [shape(f["geometry"]) for f in feats]
    ids = [f["properties"]["identifier"] for f in feats]
    assert ids == [_upstream_region_hash(g) for g in geoms] == sorted(ids)
    assert res.grid_hash == _upstream_regionlist_hash(geoms)
    assert Path(res.geojson).name == f"myaoi_partitions_aschips_{res.grid_hash}.geojson"
    with pytest.raises(ValueError, match="layout"):
        make_grid(aoi, str(tmp_path / "x"), "myaoi", layout="utm")
