"""The strip reader gives exactly rasterio's pixels, or declines (None) so that rasterio reads the file."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.io import MemoryFile
from rasterio.transform import from_bounds

from m3leo_stream.modalities import REGISTRY
from shard_tools.rasters import decode_chip_file
from shard_tools.tiff_raw import open_plain, read_pixels, read_tags

BOUNDS = (10.0, 45.0, 10.04, 45.04)


def _tif(array: np.ndarray, **opts) -> bytes:
    c, h, w = array.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": array.dtype.name,
               "crs": "EPSG:4326", "transform": from_bounds(*BOUNDS, w, h), **opts}
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(array)
        return bytes(mem.getbuffer())


def _rasterio(data: bytes, indexes=None) -> np.ndarray:
    with MemoryFile(data) as mem, mem.open() as src:
        return src.read() if indexes is None else src.read([i + 1 for i in indexes])


def _array(dtype: str, shape=(5, 37, 29), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.normal(size=shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("interleave", ["pixel", "band"])
@pytest.mark.parametrize("rows", [1, 3, 37])
def test_plain_strips_equal_rasterio(dtype, interleave, rows):
    data = _tif(_array(dtype), interleave=interleave, blockysize=rows)
    want = _rasterio(data)
    got = read_pixels(data)
    assert got is not None and got.dtype == want.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    sel = read_pixels(data, [3, 1])
    np.testing.assert_array_equal(sel, _rasterio(data, [3, 1]))


def test_big_endian_and_local_path(tmp_path):
    data = _tif(_array("int16"), interleave="pixel", ENDIANNESS="BIG")
    assert data[:2] == b"MM"
    path = tmp_path / "x.tif"
    path.write_bytes(data)
    got = read_pixels(str(path))
    assert got is not None and got.dtype == np.dtype("int16") and got.dtype.isnative
    np.testing.assert_array_equal(got, _rasterio(data))


def test_bigtiff():
    data = _tif(_array("uint8"), interleave="pixel", BIGTIFF="YES")
    assert data[2:4] == b"\x2b\x00"
    np.testing.assert_array_equal(read_pixels(data), _rasterio(data))


@pytest.mark.parametrize("opts", [{}, {"ENDIANNESS": "BIG"}, {"BIGTIFF": "YES"}])
def test_read_tags_gives_layout_and_georeferencing_with_their_types(opts):
    data = _tif(_array("int16", shape=(3, 40, 30)), interleave="band", nodata=-9999, **opts)
    byte_order, values, types = read_tags(data)
    assert byte_order == (">" if opts.get("ENDIANNESS") else "<")
    assert (values[256], values[257], values[277], values[284]) == ((30,), (40,), (3,), (2,))
    assert len(values[273]) == len(values[279]) and types[33550] == types[33922] == 12
    assert values[42113][0].rstrip(b"\0") == b"-9999" and types[42113] == 2
    assert 262 not in values and 338 not in values  # photometric, extra samples: not read here
    with pytest.raises(ValueError):
        read_tags(b"not a tiff at all")


@pytest.mark.parametrize("opts", [{"compress": "deflate"}, {"compress": "lzw", "predictor": 2},
                                  {"tiled": True, "blockxsize": 16, "blockysize": 16}])
def test_declines_what_it_does_not_handle(opts):
    data = _tif(_array("uint16", shape=(2, 40, 40)), **opts)
    assert read_pixels(data) is None


def test_declines_truncated_and_garbage(tmp_path):
    data = _tif(_array("uint8"), interleave="pixel")
    assert read_pixels(data[: len(data) // 2]) is None
    assert read_pixels(b"not a tiff at all") is None
    assert read_pixels(str(tmp_path / "missing.tif")) is None


def test_decode_chip_file_same_as_through_gdal():
    """The decoder (fast path taken) and a plain rasterio read agree for a registry modality."""
    m = REGISTRY["s2rgbm"]
    arr = _array("uint8", shape=m.shape[:1] + (64, 64))
    data = _tif(arr, interleave="pixel")
    dec = decode_chip_file(m, data, "x.tif", "0123456789abc")
    np.testing.assert_array_equal(dec.array, arr)
    assert dec.crs == "EPSG:4326" and np.allclose(dec.bounds, BOUNDS)


def test_truncated_file_is_still_named(tmp_path):
    m = REGISTRY["s1grd"]
    data = _tif(_array("int16", shape=m.shape[:1] + (64, 64)), interleave="pixel")
    from shard_tools.rasters import ChipDataError

    with pytest.raises(ChipDataError, match="x.tif.*unreadable"):
        decode_chip_file(m, data[: len(data) - 5000], "x.tif", "0123456789abc")


def _meta(data: bytes):
    with MemoryFile(data) as mem, mem.open() as src:
        b = src.bounds
        return (b.left, b.bottom, b.right, b.top), src.crs.to_string(), tuple(src.descriptions)


@pytest.mark.parametrize("bounds", [BOUNDS, (-99.6740948063404, 34.97, -99.62, 35.01257635644988),
                                    (179.9, -89.9, 180.0, -89.8)])
@pytest.mark.parametrize("descriptions", [None, ("VV asc", "", "x", "y", "z"), ("a&b <c>", "", "x", "y", "z")])
def test_plain_metadata_equals_rasterio(bounds, descriptions):
    arr = _array("int16")
    c, h, w = arr.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": c, "dtype": "int16", "crs": "EPSG:4326",
               "transform": from_bounds(*bounds, w, h), "interleave": "pixel"}
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(arr)
            for i, d in enumerate(descriptions or ()):
                dst.set_band_description(i + 1, d)
        data = bytes(mem.getbuffer())
    plain = open_plain(data)
    if descriptions and "&" in descriptions[0]:  # XML escapes are left to GDAL, which unescapes them twice
        assert plain is None
        return
    assert plain is not None
    with plain:
        assert (plain.bounds, plain.crs, tuple(plain.descriptions)) == _meta(data)
        np.testing.assert_array_equal(plain.read(), arr)


def test_other_crs_goes_through_rasterio():
    arr = _array("uint8", shape=(1, 20, 20))
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=20, height=20, count=1, dtype="uint8", crs="EPSG:32633",
                      transform=from_bounds(500000, 4000000, 500200, 4000200, 20, 20)) as dst:
            dst.write(arr)
        data = bytes(mem.getbuffer())
    assert open_plain(data) is None
    dec = decode_chip_file(REGISTRY["esawc"], data, "x.tif", "0123456789abc")
    assert dec.crs == "EPSG:32633" and dec.bounds == _meta(data)[0]
    np.testing.assert_array_equal(dec.array, arr)


def test_band_selection_by_description_plain_and_gdal_agree():
    """modisveg picks its year's band by description: the same band, selection and bounds both ways."""
    m = REGISTRY["modisveg"]
    arr = _array("uint8", shape=(3, 18, 18))
    names = [f"Percent_Tree_Cover_{y}" for y in (2018, 2019, 2020)]
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=18, height=18, count=3, dtype="uint8", crs="EPSG:4326",
                      transform=from_bounds(*BOUNDS, 18, 18), interleave="pixel") as dst:
            dst.write(arr)
            for i, d in enumerate(names):
                dst.set_band_description(i + 1, d)
        data = bytes(mem.getbuffer())
    dec = decode_chip_file(m, data, "x.tif", "0123456789abc", {"year": 2019})
    assert open_plain(data) is not None
    np.testing.assert_array_equal(dec.array, arr[1:2])
    assert dec.selection == {"band": "Percent_Tree_Cover_2019", "year": 2019}
    assert dec.bounds == _meta(data)[0] and dec.crs == "EPSG:4326"
