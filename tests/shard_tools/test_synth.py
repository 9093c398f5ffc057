"""``synth`` writes the upstream hub layout."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from shard_tools import grid
from shard_tools.synth import SynthConfig, synth


def test_hub_layout_names_and_contents(synth_src):
    repo = synth_src / "conus"
    stem = "conus_partitions_aschips_293d95e3ee589"
    assert (repo / f"{stem}.geojson").exists()
    csvs = list(repo.glob("*.csv"))
    assert [c.name for c in csvs] == [f"{stem}_splits_60bands_angle09_60-20-20.csv"]
    rows = list(csv.DictReader(open(csvs[0])))
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    ids = [r["identifier"] for r in rows]
    assert all(re.fullmatch(r"[0-3][0-9a-f]{12}", i) for i in ids)
    feats = json.loads((repo / f"{stem}.geojson").read_text())["features"]
    assert sorted(f["properties"]["identifier"] for f in feats) == sorted(ids)
    folders = sorted(p.name for p in (repo / stem).iterdir())
    assert folders == ["biomass-2020", "esaworldcover-2020", "ghsbuilts-2020", "gssic", "gunw_2020-01-01_2020-03-31",
                       "modis44b006veg", "s1grd-2020", "s2rgbm-2020", "srtmdem"]
    chip = grid.read_geojson_chips((repo / f"{stem}.geojson").read_bytes())[ids[0]]
    with rasterio.open(repo / stem / "s1grd-2020" / f"{ids[0]}.tif") as f:
        # geetiles' encoding: float dB cast to uint16 (negative values wrap), no nodata tag
        assert f.crs.to_epsg() == 4326 and f.count == 16 and f.dtypes[0] == "uint16" and f.nodata is None
        assert np.allclose(tuple(f.bounds), chip.bounds)
        assert f.descriptions[:2] == ("winter_vvasc", "winter_vvdes")
        db = f.read(1).view(np.int16)
        assert (f.read(1) > 60000).mean() > 0.5 and -40 <= db[db != 0].mean() <= 5
    with rasterio.open(repo / stem / "srtmdem" / f"{ids[0]}.tif") as f:
        assert f.count == 2 and f.dtypes[0] == "uint16" and (f.height, f.width) == (448, 448)
        assert f.descriptions == ("elevation", "slope")
    import netCDF4

    with netCDF4.Dataset(repo / stem / "gssic" / f"{ids[0]}.nc") as ds:
        assert list(ds["season"][:]) == ["summer", "fall", "winter", "spring"]  # sartiles' order
        coh = np.asarray(ds["coherence"][:].filled(np.nan))
        assert np.nanmax(coh) > 1 and np.nanmax(coh) <= 100 and np.isnan(coh).any()  # DN = gamma x 100
    gunw_dir = repo / stem / "gunw_2020-01-01_2020-03-31"
    gunw = {p.stem for p in gunw_dir.glob("*.nc")}
    skipped = {p.stem for p in gunw_dir.glob("*.skipped")}
    assert len(gunw) < len(ids) and gunw | skipped == set(ids) and not gunw & skipped  # sartiles' markers
    assert (synth_src / "europe" / "europe_partitions_aschips_2f8bd3f01ddd5" / "strmdem").is_dir()  # other spelling


def test_parquet_release_layout(tmp_path):
    out = tmp_path / "p"
    synth(SynthConfig(str(out), ("southamerica",), 5, seed=2, modalities=("esawc", "gssic"), parquet=True),
          progress=False)
    repo = out / "southamerica"
    stem = "southamerica_partitions_aschips_3219aa0f411c2"
    pcsv = repo / f"{stem}_splits_60bands_angle02_60-20-20_parquet.csv"
    rows = list(csv.DictReader(open(pcsv)))
    assert set(rows[0]) == {"identifier", "split", "parquet_identifier"}
    f = repo / stem / "gssic" / f"{rows[0]['parquet_identifier']}.zstd.parquet"
    pf = pq.ParquetFile(f)
    assert pf.metadata.num_row_groups > 1
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    t = pf.read()
    assert {"path", "ds", "content"} <= set(t.column_names)
    assert t.column("path")[0].as_py().startswith(f"southamerica/{stem}/gssic/")
    assert t.column("ds")[0].as_py() == "gssic"
    assert t.column("content")[0].as_py()[:4] == b"\x89HDF"  # NetCDF4 bytes


def test_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        synth(SynthConfig(str(d), ("europe",), 3, seed=9, modalities=("gunw", "biomass")), progress=False)
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in fa if p.suffix != ".nc")
    # HDF5 stamps creation times into NetCDF4 files: compare what they hold
    from m3leo_stream.modalities import REGISTRY
    from shard_tools.rasters import decode_chip_file

    ncs = [p for p in fa if p.suffix == ".nc"]
    assert ncs
    for p in ncs:
        m = REGISTRY.for_folder(p.parent.name)
        x, y = (decode_chip_file(m, (d / p).read_bytes(), str(p), p.stem) for d in (a, b))
        np.testing.assert_array_equal(x.array, y.array)
        assert x.selection == y.selection


def test_a_region_can_lack_a_modality_entirely(tmp_path):
    cfg = SynthConfig(str(tmp_path), ("conus", "europe"), 3, modalities=("esawc", "gunw"), absent={"europe": ("gunw",)})
    synth(cfg, progress=False)
    gunw = sorted(p.parent.parent.parent.name for p in tmp_path.glob("*/*/gunw_*/*"))
    assert gunw and set(gunw) == {"conus"}
    assert len(list(tmp_path.glob("europe/*/esaworldcover-*/*.tif"))) == 3
    with pytest.raises(ValueError, match="absent"):
        synth(SynthConfig(str(tmp_path), ("conus",), 1, modalities=("esawc",), absent={"conus": ("gunw",)}),
              progress=False)
