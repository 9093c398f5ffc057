"""Source encodings of the release's exporters onto stored members (``shard_tools.encoding``)."""

from __future__ import annotations

import numpy as np
import pytest

from m3leo_stream.modalities import REGISTRY
from shard_tools.encoding import EmptyMember, to_stored
from shard_tools.rasters import ChipDataError, Decoded, decode_chip_file, geotiff_bytes
from shard_tools.synth import geetiles_cast

BOUNDS = (5.0, 45.0, 5.06, 45.04)


def _s1_db(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    db = rng.uniform(-29.5, -0.5, (16, 448, 448)).astype(np.float32)
    db[:, :, :20] = np.nan  # no coverage
    db[[2, 3]] = np.nan  # winter, VH: no acquisitions
    return db


def test_geetiles_2023_uint16_s1_is_stored_exactly_in_db():
    db = _s1_db()
    raw = geetiles_cast(db, "uint16")
    assert raw[0, 0, 25] == (np.int64(np.trunc(db[0, 0, 25])) & 0xFFFF)  # e.g. -15.7 -> 65521
    m = REGISTRY["s1grd"]
    st = to_stored(m, Decoded(raw), "f.tif", "c")
    assert st.encoding.name == "geetiles-2023-uint16" and st.array.dtype == np.int16
    valid = raw != 0
    np.testing.assert_array_equal(st.array[valid] * 0.01, np.trunc(db[valid]))  # whole dB, truncated as exported
    assert (st.array[~valid] == -32768).all()
    assert st.missing_bands == ["winter_vh_asc", "winter_vh_des"]


def test_geetiles_2024_uint8_with_mask_reads_the_mask():
    """The later encoding: dB rescaled to uint8 by geetiles' post_process_tilefile, nodata in the GDAL mask."""
    import rasterio
    from rasterio.io import MemoryFile
    from rasterio.transform import from_bounds

    db = _s1_db(1)
    dn = (255 * (np.nan_to_num(db, nan=-30.0) + 30) / 30).astype(np.uint8)  # exactly the exporter's formula
    mask = np.where(np.isnan(db[0]), 0, 255).astype(np.uint8)  # the no-coverage strip
    profile = {"driver": "GTiff", "width": 448, "height": 448, "count": 16, "dtype": "uint8", "crs": "EPSG:4326",
               "transform": from_bounds(*BOUNDS, 448, 448)}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(dn)
            dst.write_mask(mask)
            for i, b in enumerate(REGISTRY["s1grd"].file_band_names):
                dst.set_band_description(i + 1, b)
        data = bytes(mem.getbuffer())
    m = REGISTRY["s1grd"]
    dec = decode_chip_file(m, data, "f.tif", "c")
    assert dec.valid is not None and not dec.valid[:, :, :20].any()
    st = to_stored(m, dec, "f.tif", "c")
    assert st.encoding.name == "geetiles-2024-uint8"
    ok = mask.astype(bool)
    want = dn.astype(np.float64) * 30 / 255 - 30  # the exporter's decoder
    np.testing.assert_allclose(st.array[:, ok] * 0.01, want[:, ok], atol=0.005 + 1e-9)
    assert (st.array[:, ~ok] == -32768).all()


def test_float_db_and_out_of_range_values():
    m = REGISTRY["s1grd"]
    db = _s1_db(2)
    st = to_stored(m, Decoded(db), "f.tif", "c")
    ok = ~np.isnan(db)
    np.testing.assert_allclose(st.array[ok] * 0.01, db[ok], atol=0.005 + 1e-6)
    bad = db.copy()
    bad[0, 100, 100] = 5000.0  # not dB: some other product in the folder
    with pytest.raises(ChipDataError, match="do not fit s1grd's stored int16 under encoding 'float32 dB'"):
        to_stored(m, Decoded(bad), "f.tif", "c")
    with pytest.raises(ChipDataError, match="dtype int32 cannot be stored.*known source encodings: uint16, int16"):
        to_stored(m, Decoded(np.zeros((16, 448, 448), np.int32)), "f.tif", "c")


def test_file_nodata_tag_is_honoured_and_an_empty_member_is_named():
    m = REGISTRY["esawc"]
    lc = np.full((1, 448, 448), 30, np.uint8)
    lc[0, :10] = 255
    data = geotiff_bytes(lc, BOUNDS, nodata=255)
    st = to_stored(m, decode_chip_file(m, data, "f.tif", "c"), "f.tif", "c")
    assert (st.array[0, :10] == 0).all() and (st.array[0, 10:] == 30).all() and st.source_nodata == 10 * 448
    with pytest.raises(EmptyMember, match="all pixels are nodata"):
        to_stored(m, Decoded(np.zeros((1, 448, 448), np.uint8)), "f.tif", "c")


def test_s2_zero_months_are_missing_bands():
    m = REGISTRY["s2rgbm"]
    dn = np.full((36, 448, 448), 80, np.uint8)
    dn[6:9] = 0  # March without a clear scene
    st = to_stored(m, Decoded(dn), "f.tif", "c")
    assert st.missing_bands == ["03_red", "03_green", "03_blue"] and st.array is dn  # stored as is, no copy


def test_srtm_uint16_wraps_below_sea_level():
    m = REGISTRY["srtmdem"]
    vals = np.stack([np.full((448, 448), -12.0), np.full((448, 448), 7.6)]).astype(np.float32)
    st = to_stored(m, Decoded(geetiles_cast(vals, "uint16")), "f.tif", "c")
    assert st.array[0, 0, 0] == -12 and st.array[1, 0, 0] == 7 and st.missing_bands == []


def test_gssic_flags_resampled_nearest_values_bilinear():
    m = REGISTRY["gssic"]
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 100, (38, 50, 61)).astype(np.float32)
    lsmap = m.bands.index("geometry_lsmap")
    a[lsmap] = rng.choice([1.0, 2.0, 4.0], (50, 61))
    st = to_stored(m, Decoded(a), "f.nc", "c")
    assert st.resampling == "bilinear+nearest" and st.array.shape == (38, 50, 50)
    assert set(np.unique(st.array[lsmap])) <= {1.0, 2.0, 4.0}
    assert len(np.unique(st.array[0])) > 100  # continuous bands interpolated
