"""``GeoTiffEncoder``: chips encoded from a GDAL-written template are byte-identical to GDAL's own encoding
(``geotiff_bytes``), including the arrays for which GDAL lays the file out differently (strips of zeros or nodata,
which it writes last)."""

from __future__ import annotations

import numpy as np
import pytest

from shard_tools.rasters import GeoTiffEncoder, geotiff_bytes

CASES = [
    ((1, 448, 448), "uint8", 0, ["Map"]),
    ((1, 448, 448), "int16", -32768, ["value"]),
    ((1, 448, 448), "int16", None, None),
    ((2, 112, 112), "float32", float("nan"), ["VV", "VH"]),
    ((4, 112, 112), "int16", 0, ["B2", "B3", "B4", "B8"]),
    ((1, 45, 45), "float32", float("nan"), None),
]


def _variants(shape, dtype, nodata, rng):
    """Plain values, then arrays with zero or nodata strips at the top, bottom and everywhere."""
    fill = nodata if nodata is not None else 0
    base = rng.integers(1, 100, shape).astype(dtype)
    yield base
    for rows, value in ((slice(0, shape[1] // 3), 0), (slice(-shape[1] // 5, None), 0),
                        (slice(-shape[1] // 5, None), fill), (slice(None), fill), (slice(None), 0)):
        a = base.copy()
        a[:, rows] = value
        yield a
    a = base.copy()
    a[:, :, :7] = 0  # zero columns: no strip entirely zero
    yield a
    a = base.copy()
    a[0] = 0  # one band zero: in pixel-interleaved files no strip is entirely zero
    yield a


@pytest.mark.parametrize("shape,dtype,nodata,descriptions", CASES)
def test_template_encoding_is_byte_identical_to_gdal(shape, dtype, nodata, descriptions):
    rng = np.random.default_rng(sum(shape))
    enc = GeoTiffEncoder(shape, dtype, "EPSG:4326", nodata, descriptions)
    assert enc.exact  # uncompressed GTiff: the template path is taken
    for a in _variants(shape, dtype, nodata, rng):
        w, s = rng.uniform(-170, 170), rng.uniform(-80, 80)
        bounds = (w, s, w + rng.uniform(0.01, 0.2), s + 0.0403)
        got = b"".join(bytes(p) for p in enc.parts(a, bounds))
        assert got == geotiff_bytes(a, bounds, "EPSG:4326", nodata, descriptions)
    if np.dtype(dtype).kind in "iu":  # zero / nodata strips got templates of their own, all verified
        assert sum(layout is not None for layout in enc.layouts.values()) >= 4


def test_compressed_chips_go_through_gdal():
    a = np.arange(448 * 448, dtype=np.int16).reshape(1, 448, 448)
    enc = GeoTiffEncoder(a.shape, a.dtype, "EPSG:4326", -32768, None, compress="deflate")
    assert not enc.exact
    bounds = (6.5, 0.1, 6.54, 0.14)
    assert b"".join(bytes(p) for p in enc.parts(a, bounds)) == geotiff_bytes(a, bounds, "EPSG:4326", -32768,
                                                                            compress="deflate")
    with pytest.raises(ValueError, match="encoder for"):
        enc.parts(a.astype(np.int32), bounds)
