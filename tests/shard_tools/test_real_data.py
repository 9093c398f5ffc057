"""Real Sentinel-1/Sentinel-2 rasters through the same decoder and writer (skipped where the data is absent)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import rasterio

from m3leo_stream import shard_format as sf
from m3leo_stream.modalities import Modality
from shard_tools.encoding import to_stored
from shard_tools.rasters import Decoded, decode_chip_file
from shard_tools.writer import ShardWriter


def _modality(name: str, src, kind: str) -> Modality:
    return Modality(name=name, folder_pattern=name, file_ext="tif", bands=tuple(d.lower() for d in src.descriptions),
                    dtype=src.dtypes[0], kind=kind, resolution_m=4480 / src.width, description="real test layer",
                    source="Sen1Floods11", nodata=src.nodata)


def test_real_s1_s2_chip_round_trip_through_the_writer(real_data, tmp_path):
    arrays, mods = {}, {}
    for name, fname, kind in (("s1", "Spain_7370579_S1Hand.tif", "sar_db"),
                              ("s2", "Spain_7370579_S2Hand.tif", "optical")):
        path = real_data / "sen1floods11" / fname
        with rasterio.open(path) as src:
            m = _modality(name, src, kind)
            direct = src.read()
        dec = decode_chip_file(m, path.read_bytes(), str(path), "spain")
        member = to_stored(m, dec, str(path), "spain")
        arr = member.array
        assert member.resampling is None  # the file is already on this modality's grid
        np.testing.assert_array_equal(arr, direct)
        arrays[name], mods[name] = arr, m
    assert arrays["s1"].dtype == np.float32 and arrays["s1"].shape[0] == 2
    assert arrays["s2"].dtype == np.int16 and arrays["s2"].shape[0] == 13
    buf = io.BytesIO()
    w = ShardWriter(buf, "zstd")
    ranges = w.add_sample("spain7370579", {"key": "spain7370579"}, arrays)
    w.close()
    data = buf.getvalue()
    for name in arrays:
        off, n = ranges[f"{name}_offset"], ranges[f"{name}_nbytes"]
        back = sf.decode_array(data[off : off + n], compressed=True)
        np.testing.assert_array_equal(back, arrays[name])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["spain7370579.json", "spain7370579.s1.npy.zst", "spain7370579.s2.npy.zst"]


def test_real_worldcover_resampling_never_invents_codes(real_data):
    from m3leo_stream.modalities import REGISTRY

    path = real_data / "esa_worldcover" / "DERIVED_SaoTome_WorldCover_v200_2021_crop.tif"
    with rasterio.open(path) as src:
        window = src.read(window=rasterio.windows.Window(0, 0, 500, 480))
    member = to_stored(REGISTRY["esawc"], Decoded(window), str(path), "saotome")
    arr = member.array
    assert member.resampling == "nearest" and arr.shape == (1, 448, 448)
    assert set(np.unique(arr)) <= set(np.unique(window))
