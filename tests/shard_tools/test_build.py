"""Round trips from the synthetic hub layout (folders and parquet release) through ``build``."""

from __future__ import annotations

import filecmp
import glob
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from m3leo_stream import shard_format as sf
from m3leo_stream.modalities import REGISTRY
from m3leo_stream.shard_root import ShardRoot
from shard_tools.build import BuildConfig, build, finalize
from shard_tools.synth import SynthConfig, synth
from shard_tools.verify import recompute_stats, verify


def _split_table(src: Path) -> dict[tuple[str, str], str]:
    out = {}
    for csv in glob.glob(str(src / "*" / "*_splits_*.csv")):
        region = Path(csv).parent.name
        for line in open(csv).read().splitlines()[1:]:
            ident, split = line.split(",")[:2]
            out[(region, ident)] = split
    return out


def test_every_chip_once_in_its_region_and_split(small_shards, synth_src):
    root = ShardRoot(str(small_shards))
    rows = root.read_index().to_pylist()
    expected = _split_table(synth_src)
    assert sorted((r["region"], r["key"]) for r in rows) == sorted(expected)
    for r in rows:
        assert r["split"] == expected[(r["region"], r["key"])]
        assert r["shard"].startswith(f"{r['region']}/{r['split']}/{r['region']}-{r['split']}-")
    # one region and one split per shard, several shards per region/split at this shard size
    by_shard = {}
    for r in rows:
        by_shard.setdefault(r["shard"], set()).add((r["region"], r["split"]))
    assert all(len(v) == 1 for v in by_shard.values())
    assert len(by_shard) > len({v for s in by_shard.values() for v in s})
    assert root.manifest["num_samples"] == len(rows)
    assert [s["path"] for s in root.manifest["shards"]] == sorted(by_shard, key=lambda p: (
        root.regions.index(p.split("/")[0]), ["train", "val", "test"].index(p.split("/")[1]), p))


def _exporter_physical(name: str, raw: np.ndarray) -> np.ndarray:
    """The exporter's values in physical units, NaN where it wrote no data, decoded as its own code reads them
    (stated here independently of the registry): geetiles' uint16 S1 read as int16 dB (0 = no data, as NaN became
    0), S2 DN x 0.3/255 (0 = masked), SRTM uint16 read as int16 m / deg, WorldCover codes (0 = no data)."""
    if name == "s1grd":
        v = raw.view(np.int16).astype(np.float64)
        return np.where(raw == 0, np.nan, v)
    if name == "s2rgbm":
        return np.where(raw == 0, np.nan, raw * 0.3 / 255)
    if name == "srtmdem":
        return raw.view(np.int16).astype(np.float64)
    return np.where(raw == 0, np.nan, raw.astype(np.float64))


def _stored_physical(entry, stored: np.ndarray) -> np.ndarray:
    """A stored member decoded with only its manifest entry: dtype, per-band scale, nodata."""
    assert stored.dtype == np.dtype(entry["dtype"]) and list(stored.shape) == entry["shape"]
    v = stored.astype(np.float64) * np.asarray(entry["scale"], np.float64)[:, None, None]
    nd = entry["nodata"]
    bad = np.isnan(stored) if stored.dtype.kind == "f" else np.zeros(stored.shape, bool)
    if nd is not None and nd != "nan":
        bad |= stored == nd
    return np.where(bad, np.nan, v)


def test_stored_members_decode_to_the_exporters_values(small_shards, synth_src):
    root = ShardRoot(str(small_shards))
    rows = root.read_index().to_pylist()
    entries = root.manifest["modalities"]
    checked = {"s1grd": 0, "s2rgbm": 0, "esawc": 0, "srtmdem": 0}
    missing_seen = 0
    for r in rows:
        meta = root.read_member(r, sf.JSON_MEMBER)
        for name in checked:
            if r[f"{name}_offset"] is None:
                continue
            folder = meta["modalities"][name]["folder"]
            src = glob.glob(str(synth_src / r["region"] / "*_partitions_aschips_*" / folder / f"{r['key']}.tif"))
            assert len(src) == 1
            with rasterio.open(src[0]) as f:
                raw = f.read()
            want = _exporter_physical(name, raw)
            got = _stored_physical(entries[name], root.read_member(r, name))
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=0, atol=1e-9)
            # bands the exporter left empty are named in the sample's json
            empty = [b for b, e in zip(entries[name]["bands"], np.isnan(want).all(axis=(1, 2))) if e]
            assert meta["modalities"][name].get("missing_bands", []) == empty
            missing_seen += bool(empty)
            checked[name] += 1
        if r["gssic_offset"] is not None:
            g = _stored_physical(entries["gssic"], root.read_member(r, "gssic"))
            coh = [i for i, b in enumerate(entries["gssic"]["bands"]) if b.startswith("coherence")]
            c = g[coh]
            assert np.nanmax(c) <= 1.0 and np.nanmin(c) >= 0.0 and np.isnan(c).any()  # gamma, water is NaN
            assert meta["modalities"]["gssic"]["original_shape"][0] == 38
            assert meta["modalities"]["gssic"]["original_shape"][2] > 50
            assert meta["modalities"]["gssic"]["resampling"] == "bilinear+nearest"
            lsmap = g[entries["gssic"]["bands"].index("geometry_lsmap")]
            assert set(np.unique(lsmap[~np.isnan(lsmap)])) <= {1.0, 2.0}  # flag codes, never blended
    assert min(checked.values()) >= 5 and missing_seen >= 1, (checked, missing_seen)
    assert {"srtmdem", "strmdem"} == {f for fs in root.manifest["source_folders"].values() for m, f in fs.items()
                                      if m == "srtmdem"}


def test_stats_count_valid_pixels_only(small_shards):
    stats = json.loads((small_shards / "stats.json").read_text())
    root = ShardRoot(str(small_shards))
    train = [r for r in root.read_index().to_pylist() if r["split"] == "train"]
    for name, nd in (("s1grd", -32768), ("s2rgbm", 0), ("srtmdem", -32768)):
        count = np.zeros(len(stats[name]["bands"]), np.int64)
        for r in train:
            if r[f"{name}_offset"] is not None:
                count += (root.read_member(r, name) != nd).sum(axis=(1, 2))
        assert stats[name]["global"]["count"] == count.tolist(), name
    for name in ("s1grd", "s2rgbm"):
        g = stats[name]["global"]
        assert min(g["min"]) > {"s1grd": -32768, "s2rgbm": 0}[name], name  # nodata never counted as a value
        assert max(g["nodata_fraction"]) > 0  # and the missing pixels are there
    assert max(stats["gssic"]["global"]["max"][i] for i, b in enumerate(stats["gssic"]["bands"])
               if b.startswith("coherence")) <= 100  # stored DN; gamma = DN x 0.01


def test_plain_webdataset_reads_one_sample_per_chip(small_shards):
    import webdataset as wds

    root = ShardRoot(str(small_shards))
    urls = [str(small_shards / s["path"]) for s in root.manifest["shards"]]
    members = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in members
        members[sample["__key__"]] = {k for k in sample if not k.startswith("__")}
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"]
        arr = np.load(io.BytesIO(sample["s1grd.npy"]), allow_pickle=False)
        assert arr.shape == (16, 448, 448)
    rows = root.read_index().to_pylist()
    assert set(members) == {r["key"] for r in rows}
    for r in rows:
        present = [m for m in root.modalities if r[sf.offset_column(m)] is not None]
        expected = {"json"} | {f"{m}.npy" for m in present} | {f"{m}.xxh3" for m in present}  # + chunk digests
        assert members[r["key"]] == expected


def test_index_ranges_reproduce_member_bytes(small_shards):
    root = ShardRoot(str(small_shards))
    rows = root.read_index().to_pylist()
    for shard in sorted({r["shard"] for r in rows})[:4]:
        path = small_shards / shard
        with tarfile.open(path) as tar, open(path, "rb") as f:
            assert all(ti.type == tarfile.REGTYPE for ti in tar.getmembers())
            for r in (x for x in rows if x["shard"] == shard):
                for mod in [sf.JSON_MEMBER, *root.modalities]:
                    off = r[sf.offset_column(mod)]
                    if off is None:
                        continue
                    name = f"{r['key']}.json" if mod == sf.JSON_MEMBER else f"{r['key']}.{mod}.npy"
                    f.seek(off)
                    assert f.read(r[sf.nbytes_column(mod)]) == tar.extractfile(name).read()
    # plain ustar: no PAX headers anywhere
    with open(small_shards / rows[0]["shard"], "rb") as f:
        assert b"PaxHeader" not in f.read()


def test_missing_modalities_have_null_ranges(small_shards):
    root = ShardRoot(str(small_shards))
    t = root.read_index(["key", "gunw_offset", "s1grd_offset"])
    assert t.column("s1grd_offset").null_count == 0
    assert 0 < t.column("gunw_offset").null_count < t.num_rows  # synth leaves out ~20 % of GUNW
    assert root.manifest["members"]["gunw"] == t.num_rows - t.column("gunw_offset").null_count


def test_deterministic_and_task_shares_equal_single_build(tmp_path, synth_src, small_shards):
    for n in range(2):
        cfg = BuildConfig(str(synth_src), str(tmp_path / "shares"), shard_size=40_000_000, task_index=n,
                          num_tasks=2, workers=2, progress=False)
        summary = build(cfg)
        assert "finalized" not in summary
    finalize(str(tmp_path / "shares"))
    single = sorted(p.relative_to(small_shards) for p in small_shards.rglob("*.tar"))
    shares = sorted(p.relative_to(tmp_path / "shares") for p in (tmp_path / "shares").rglob("*.tar"))
    assert single == shares
    for rel in single:
        assert filecmp.cmp(small_shards / rel, tmp_path / "shares" / rel, shallow=False), rel
    assert pq.read_table(small_shards / "index.parquet").equals(pq.read_table(tmp_path / "shares" / "index.parquet"))
    a = json.loads((small_shards / "stats.json").read_text())
    b = json.loads((tmp_path / "shares" / "stats.json").read_text())
    assert a["s1grd"]["global"]["count"] == b["s1grd"]["global"]["count"]
    np.testing.assert_allclose(a["gssic"]["global"]["mean"], b["gssic"]["global"]["mean"], rtol=1e-12)


def test_finalize_refuses_incomplete_shares(tmp_path, synth_src):
    from shard_tools.build import BuildError

    out = tmp_path / "half"
    build(BuildConfig(str(synth_src), str(out), shard_size=40_000_000, task_index=0, num_tasks=3, progress=False))
    with pytest.raises(BuildError, match="not built yet"):
        finalize(str(out))
    assert not (out / "manifest.json").exists() and not (out / "index.parquet").exists()


def test_parquet_release_round_trip(tmp_path, synth_src, small_shards):
    src = tmp_path / "parquet-src"
    synth(SynthConfig(str(src), ("conus", "europe"), 10, seed=7, parquet=True), workers=1, progress=False)
    assert glob.glob(str(src / "conus" / "*_parquet.csv"))
    assert not glob.glob(str(src / "**" / "*.tif"), recursive=True)
    out = tmp_path / "from-parquet"
    build(BuildConfig(str(src), str(out), shard_size=40_000_000, progress=False))
    # same chips and the same bytes as the build from the folder layout, except where the source path is recorded
    a = pq.read_table(small_shards / "index.parquet").drop(["json_offset", "json_nbytes"])
    b = pq.read_table(out / "index.parquet")
    # a parquet region's chips are packed in the order of their rows (the folder layout's: by identifier)
    assert sorted(a.column("key").to_pylist()) == sorted(b.column("key").to_pylist())
    ra, rb = ShardRoot(str(small_shards)), ShardRoot(str(out))
    by_key = {(r["region"], r["key"]): r for r in rb.read_index().to_pylist()}
    for x in ra.read_index().to_pylist()[:5]:
        y = by_key[(x["region"], x["key"])]
        assert y["split"] == x["split"]
        for m in ("s1grd", "gssic", "gunw", "biomass"):
            if x[sf.offset_column(m)] is None:
                assert y[sf.offset_column(m)] is None
                continue
            np.testing.assert_array_equal(ra.read_member(x, m), rb.read_member(y, m))
        assert "#rowgroup=" in rb.read_member(y, sf.JSON_MEMBER)["modalities"]["s1grd"]["source"]


def test_zstd_members_round_trip(tmp_path, synth_src):
    out = tmp_path / "zstd"
    build(BuildConfig(str(synth_src), str(out), modalities=["s1grd", "esawc", "gunw"], compress="zstd",
                      regions=["europe"], progress=False))
    root = ShardRoot(str(out))
    assert root.compressed
    r = root.read_index().to_pylist()[0]
    arr = root.read_member(r, "s1grd")
    assert arr.shape == (16, 448, 448)
    assert r["s1grd_nbytes"] < REGISTRY["s1grd"].nbytes  # compressed
    assert list(root.modalities) == ["s1grd", "gunw", "esawc"]
    problems, _ = verify(str(out), progress=False)
    assert problems == []
    with tarfile.open(out / r["shard"]) as tar:
        assert f"{r['key']}.s1grd.npy.zst" in tar.getnames()


def test_stats_match_numpy_and_recompute(small_shards, tmp_path):
    import shutil

    root_dir = tmp_path / "copy"
    shutil.copytree(small_shards, root_dir)
    root = ShardRoot(str(root_dir))
    built = json.loads((root_dir / "stats.json").read_text())
    rows = [r for r in root.read_index().to_pylist() if r["split"] == "train"]
    s1 = np.stack([root.read_member(r, "s1grd")[4] for r in rows])
    valid = s1 != -32768
    g = built["s1grd"]["global"]
    assert g["count"][4] == valid.sum()
    assert g["mean"][4] == pytest.approx(s1[valid].mean(), rel=1e-12)
    assert g["std"][4] == pytest.approx(s1[valid].std(), rel=1e-12)
    assert g["percentiles"]["98"][4] == pytest.approx(np.percentile(s1[valid], 98))
    conus = [r for r in rows if r["region"] == "conus"]
    gs = np.stack([root.read_member(r, "gssic")[10] for r in conus])
    gs = gs[~np.isnan(gs)]
    reg = built["gssic"]["regions"]["conus"]
    assert reg["mean"][10] == pytest.approx(gs.mean(), rel=1e-6)
    assert reg["percentiles"]["99"][10] == pytest.approx(np.percentile(gs, 99), rel=2 ** -7)
    lc = np.concatenate([root.read_member(r, "esawc").ravel() for r in rows])
    hist = built["esawc"]["global"]["class_histogram"]
    assert hist == {str(c): int((lc == c).sum()) for c in np.unique(lc) if c != 0}
    assert "0" not in hist
    assert built["esawc"]["global"]["nodata_fraction"][0] == pytest.approx((lc == 0).mean())
    os.remove(root_dir / "stats.json")
    recompute_stats(str(root_dir), progress=False)
    again = json.loads((root_dir / "stats.json").read_text())
    assert again["s1grd"]["global"] == built["s1grd"]["global"]
    np.testing.assert_allclose(again["gssic"]["global"]["std"], built["gssic"]["global"]["std"], rtol=1e-9)


def test_rerun_removes_only_its_own_partial_files(tmp_path, synth_src):
    """Array tasks build shards of the same directories at once: a task starting (or restarting) must not delete
    the temporary files of another task's shards in progress, only its own leftovers."""
    out = tmp_path / "shares"
    cfg = BuildConfig(str(synth_src), str(out), shard_size=40_000_000, task_index=0, num_tasks=2, progress=False)
    build(cfg)
    from shard_tools import plan_io

    header = plan_io.read_header(ShardRoot(str(out)).fs, str(out))
    planned = [s["path"] for s in plan_io.iter_shards(ShardRoot(str(out)).fs, str(out), header)]
    mine, theirs = planned[0::2], planned[1::2]
    assert all((out / p).exists() for p in mine) and not any((out / p).exists() for p in theirs)
    for p in mine + theirs:
        (out / p).parent.mkdir(parents=True, exist_ok=True)
        (out / (p + ".partial-0123abcd")).write_bytes(b"in progress")
    build(cfg)  # the restart of task 0
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*.partial-*"))
    assert left == sorted(p + ".partial-0123abcd" for p in theirs)


# ------------------------------------------------------------------ --resolution: storing below canonical size

RES = {"s1grd": 224, "s2rgbm": 224}


@pytest.fixture(scope="module")
def res_shards(tmp_path_factory, synth_src) -> Path:
    """``synth_src`` built as ``small_shards`` but with s1grd and s2rgbm stored at 224 px."""
    out = tmp_path_factory.mktemp("res") / "root"
    build(BuildConfig(str(synth_src), str(out), shard_size=40_000_000, resolutions=dict(RES), progress=False))
    return out


def test_resolution_build_is_the_full_build_block_reduced(res_shards, small_shards):
    from shard_tools.downsample import block_reduce

    full, res = ShardRoot(str(small_shards)), ShardRoot(str(res_shards))
    entries = res.manifest["modalities"]
    for name, px in RES.items():
        e = entries[name]
        assert e["shape"] == [len(e["bands"]), px, px] and e["canonical_px"] == px and e["resolution_m"] == 20.0
        assert e["downsampled"]["from_px"] == 448 and e["downsampled"]["factor"] == 2
        assert e["downsampled"]["from_resolution_m"] == 10.0
        assert res.modality(name).shape == (len(e["bands"]), px, px)
    assert entries["s1grd"]["downsampled"]["rules"] == {"sar_db": "mean of linear power 10^(dB/10) over valid "
                                                                  "pixels, back to dB"}
    assert entries["esawc"]["shape"] == [1, 448, 448] and "downsampled" not in entries["esawc"]
    assert res.manifest["builder"]["args"]["resolutions"] == RES
    assert "resolutions" not in full.manifest["builder"]["args"]
    by_key = {(r["region"], r["key"]): r for r in full.read_index().to_pylist()}
    rows = res.read_index().to_pylist()
    assert sorted(by_key) == sorted((r["region"], r["key"]) for r in rows)
    for r in rows:
        f = by_key[(r["region"], r["key"])]
        meta, fmeta = res.read_member(r, sf.JSON_MEMBER), full.read_member(f, sf.JSON_MEMBER)
        for name in res.modalities:
            if f[sf.offset_column(name)] is None:
                assert r[sf.offset_column(name)] is None
                continue
            got, src = res.read_member(r, name), full.read_member(f, name)
            if name in RES:
                np.testing.assert_array_equal(got, block_reduce(REGISTRY[name], src, 2))
                assert meta["modalities"][name]["downsample_factor"] == 2
            else:
                np.testing.assert_array_equal(got, src)
                assert "downsample_factor" not in meta["modalities"][name]
            assert meta["modalities"][name].get("missing_bands") == fmeta["modalities"][name].get("missing_bands")
    assert sum(s["bytes"] for s in res.manifest["shards"]) < 0.7 * sum(s["bytes"] for s in full.manifest["shards"])
    problems, _ = verify(str(res_shards), progress=False)
    assert problems == []
    stats = res.stats
    train = [r for r in rows if r["split"] == "train"]
    count = sum((res.read_member(r, "s1grd") != -32768).sum(axis=(1, 2)) for r in train)
    assert stats["s1grd"]["global"]["count"] == count.tolist()
    from shard_tools.card import card_text

    text = card_text(res.manifest, stats)
    assert "Array shape 16×224×224 (20 m pixels)" in text
    assert "reduced ×2 from 448 px (10 m) at build time (`--resolution s1grd=224`)" in text


def test_resolution_build_streams_at_the_stored_size(res_shards):
    from m3leo_stream.datamodule import M3LEODataModule
    from m3leo_stream.transforms import DeviceTransforms

    dm = M3LEODataModule(str(res_shards), inputs=["s1grd", "s2rgbm"], targets=["esawc"], batch_size=2, seed=0,
                         num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["s1grd"].shape) == (2, 16, 224, 224) and tuple(batch["s2rgbm"].shape) == (2, 36, 224, 224)
    assert tuple(batch["esawc"].shape) == (2, 1, 448, 448)
    root = ShardRoot(str(res_shards))
    t = DeviceTransforms({}, root.modalities, root.stats, inputs=["s1grd", "s2rgbm"], targets=["esawc"], train=False)
    assert t.grid == 224  # the default training grid follows the stored size
    out = t(batch)
    assert out["s1grd"].shape[-2:] == (224, 224) and out["esawc"].shape[-2:] == (224, 224)


def test_resolution_is_part_of_the_build_identity(res_shards, synth_src):
    from shard_tools.build import BuildError

    before = sorted((p.name, p.stat().st_mtime_ns) for p in res_shards.rglob("*") if p.is_file())
    with pytest.raises(BuildError, match="other arguments"):
        build(BuildConfig(str(synth_src), str(res_shards), shard_size=40_000_000, resolutions={"s1grd": 112},
                          progress=False))
    with pytest.raises(BuildError, match="other arguments"):  # and without --resolution
        build(BuildConfig(str(synth_src), str(res_shards), shard_size=40_000_000, progress=False))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in res_shards.rglob("*") if p.is_file()) == before


def test_resolution_array_tasks_equal_single_build_and_must_agree(tmp_path, synth_src, res_shards):
    from shard_tools.build import BuildError

    shares = tmp_path / "shares"
    for n in range(2):
        build(BuildConfig(str(synth_src), str(shares), shard_size=40_000_000, task_index=n, num_tasks=2,
                          resolutions=dict(RES), progress=False))
    finalize(str(shares))
    tars = sorted(p.relative_to(res_shards) for p in res_shards.rglob("*.tar"))
    assert tars == sorted(p.relative_to(shares) for p in shares.rglob("*.tar"))
    for rel in tars:
        assert filecmp.cmp(res_shards / rel, shares / rel, shallow=False), rel
    assert pq.read_table(res_shards / "index.parquet").equals(pq.read_table(shares / "index.parquet"))
    # tasks started at once with different values: each found no plan and wrote its own; finalize refuses
    mixed = tmp_path / "mixed"
    kw = dict(modalities=["s1grd", "esawc"], regions=["europe"], shard_size=40_000_000, num_tasks=2, progress=False)
    build(BuildConfig(str(synth_src), str(mixed), task_index=0, resolutions={"s1grd": 224}, **kw))
    with pytest.raises(BuildError, match="other arguments"):  # a later task sees the plan and refuses at once
        build(BuildConfig(str(synth_src), str(mixed), task_index=1, resolutions={"s1grd": 112}, **kw))
    (mixed / "_build" / "plan.json").unlink()
    build(BuildConfig(str(synth_src), str(mixed), task_index=1, resolutions={"s1grd": 112}, **kw))
    with pytest.raises(BuildError, match="built with other --resolution values"):
        finalize(str(mixed))
    assert not (mixed / "manifest.json").exists() and not (mixed / "index.parquet").exists()


def test_resolution_from_the_parquet_release(tmp_path, small_shards):
    from shard_tools.downsample import block_reduce

    src = tmp_path / "parquet-src"
    synth(SynthConfig(str(src), ("conus", "europe"), 10, seed=7, modalities=("s1grd", "esawc"), parquet=True),
          workers=1, progress=False)
    out = tmp_path / "from-parquet"
    build(BuildConfig(str(src), str(out), shard_size=40_000_000, resolutions={"s1grd": 112, "esawc": 56},
                      progress=False))
    full, res = ShardRoot(str(small_shards)), ShardRoot(str(out))
    assert res.modality("s1grd").shape == (16, 112, 112) and res.modality("esawc").shape == (1, 56, 56)
    by_key = {(r["region"], r["key"]): r for r in full.read_index().to_pylist()}
    rows = res.read_index().to_pylist()
    assert len(rows) == len(by_key)
    for r in rows:
        f = by_key[(r["region"], r["key"])]
        for name, factor in (("s1grd", 4), ("esawc", 8)):
            np.testing.assert_array_equal(res.read_member(r, name), block_reduce(REGISTRY[name],
                                                                                 full.read_member(f, name), factor))


def test_bad_resolution_is_one_clear_line_and_writes_nothing(tmp_path, synth_src, caplog, capsys):
    from shard_tools.cli import main as cli_main

    out = tmp_path / "never"
    for value, words in (("s1grd=300", ["s1grd", "allowed sizes: 448, 224, 112, 64, 56"]),
                         ("s1grd=896", ["upsample s1grd", "allowed sizes: 448, 224"]),
                         ("gssic=20", ["gssic", "allowed sizes: 50, 25, 10, 5, 2, 1"]),
                         ("s1grd=big", ["s1grd=big", "whole number"])):
        caplog.clear()
        assert cli_main(["build", str(synth_src), str(out), "-q", "--resolution", value]) == 2
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and errors[0].exc_info is None
        msg = errors[0].getMessage()
        assert "\n" not in msg and all(w in msg for w in words), msg
        assert "Traceback" not in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.slow
def test_demo_experiment_trains_on_a_224_px_build(res_shards, tmp_path):
    from hydra import compose, initialize_config_dir

    from m3leo_stream.train import CONFIG_DIR, run

    # the demo as shipped (its 64 px grid; inputs s1grd and s2rgbm at 224 px, gssic at 50), two steps
    over = ["experiment=demo", f"data.root={res_shards}", f"run_dir={tmp_path / 'run'}", "logger.wandb.mode=disabled",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false", "data.num_workers=0",
            "trainer.log_every_n_steps=1", "trainer.max_steps=2", "trainer.limit_val_batches=1",
            "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null", "checkpoint.every_n_train_steps=1"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", over)
    res = run(cfg)
    assert res["global_step"] == 2 and "train/loss" in res["metrics"]
