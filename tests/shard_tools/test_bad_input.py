"""Discrepancies are counted; invalid data is named and either stops the build (nothing partial published) or is
skipped and counted; a killed build resumes to the same result."""

from __future__ import annotations

import filecmp
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m3leo_stream import shard_format as sf
from shard_tools.build import BuildConfig, BuildError, build
from shard_tools.cli import main as cli_main
from shard_tools.rasters import geotiff_bytes
from shard_tools.synth import SynthConfig, synth
from shard_tools.verify import verify

MODS = ("esawc", "biomass", "srtmdem", "gunw")


@pytest.fixture()
def src(tmp_path) -> Path:
    out = tmp_path / "src"
    synth(SynthConfig(str(out), ("conus",), 8, seed=3, modalities=MODS), progress=False)
    return out


def _data_dir(src: Path) -> Path:
    return Path(glob.glob(str(src / "conus" / "conus_partitions_aschips_*[0-9a-f]"))[0])


def _first(src: Path, folder: str) -> Path:
    return sorted((_data_dir(src) / folder).iterdir())[0]


def _assert_nothing_partial(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    assert not (out / "index.parquet").exists()
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    # any shard already published is complete: it has its record
    for tar in out.rglob("*.tar"):
        rel = tar.relative_to(out).with_suffix(".json")
        assert (out / "_build" / "shards" / rel).exists(), tar


def test_discrepancies_are_counted_not_fatal(src, tmp_path):
    d = _data_dir(src)
    csv = next((src / "conus").glob("*_splits_*.csv"))
    csv.write_text(csv.read_text() + "0000000000abc,train\n")  # split row without files
    orphan = _first(src, "esaworldcover-2020")
    (d / "esaworldcover-2020" / "0000000000def.tif").write_bytes(orphan.read_bytes())  # file without split row
    os.remove(_first(src, "biomass-2020"))  # a chip lacking a modality
    (d / "weirdproduct-2020").mkdir()  # unknown dataset folder
    (d / "weirdproduct-2020" / "x.tif").write_bytes(b"")
    out = tmp_path / "out"
    build(BuildConfig(str(src), str(out), progress=False))
    disc = json.loads((out / "manifest.json").read_text())["discrepancies"]
    assert disc["split_rows_without_files"]["count"] == 1
    assert disc["split_rows_without_files"]["examples"] == ["conus/0000000000abc"]
    assert disc["files_without_split_rows"]["count"] == 1
    ids = {x.stem for x in (d / "esaworldcover-2020").iterdir()} - {"0000000000def"}
    lacking = ids - {x.stem for x in (d / "biomass-2020").iterdir()}
    assert disc["chips_lacking_biomass"]["count"] == len(lacking) >= 1
    assert disc["unknown_dataset_folders"]["examples"] == ["conus/weirdproduct-2020"]
    assert verify(str(out), progress=False)[0] == []


@pytest.mark.parametrize("case", ["truncated", "band_count", "dtype", "nodata_tag_is_a_class", "nc_variable"])
def test_invalid_chip_data_fails_clearly_then_skips(case, src, tmp_path, caplog):
    if case == "truncated":
        bad = _first(src, "esaworldcover-2020")
        bad.write_bytes(bad.read_bytes()[:3000])
        expect = "unreadable tif file"
    elif case == "band_count":
        bad = _first(src, "esaworldcover-2020")
        bad.write_bytes(geotiff_bytes(np.full((2, 448, 448), 10, np.uint8), (0, 0, 0.04, 0.04)))
        expect = "2 bands, but modality esawc has 1"
    elif case == "dtype":
        bad = _first(src, "esaworldcover-2020")
        bad.write_bytes(geotiff_bytes(np.full((1, 448, 448), 10.5, np.float32), (0, 0, 0.04, 0.04)))
        expect = "dtype float32 cannot be stored as uint8"
    elif case == "nodata_tag_is_a_class":
        bad = _first(src, "esaworldcover-2020")
        bad.write_bytes(geotiff_bytes(np.full((1, 448, 448), 10, np.uint8), (0, 0, 0.04, 0.04), nodata=10))
        expect = "nodata tag 10 is class code 10 of esawc"
    else:
        import netCDF4

        bad = _first(src, "biomass-2020")
        with netCDF4.Dataset(bad, "w") as ds:
            ds.createDimension("y", 45)
            ds.createDimension("x", 55)
            ds.createVariable("agb", "f4", ("y", "x"))[:] = np.ones((45, 55))
        expect = "variable 'agb_se' missing"
    chip = bad.stem
    out = tmp_path / "out"
    rc = cli_main(["build", str(src), str(out), "--shard-size", "2MB", "-q"])
    assert rc == 1
    msg = caplog.text
    assert expect in msg and chip in msg and bad.name in msg
    _assert_nothing_partial(out)
    out2 = tmp_path / "out2"
    summary = build(BuildConfig(str(src), str(out2), on_error="skip", progress=False))
    assert summary["skipped_members"] == 1
    assert any(expect in e and chip in e for e in summary["errors"])
    manifest = json.loads((out2 / "manifest.json").read_text())
    assert manifest["skipped"]["members"] == 1
    rows = pq.read_table(out2 / "index.parquet").to_pylist()
    row = next(r for r in rows if r["key"] == chip)
    mod = "biomass" if case == "nc_variable" else "esawc"
    assert row[f"{mod}_offset"] is None  # the member is left out, the chip stays
    assert verify(str(out2), progress=False)[0] == []


def test_all_nodata_member_is_left_out_and_counted(src, tmp_path):
    bad = _first(src, "esaworldcover-2020")
    bad.write_bytes(geotiff_bytes(np.zeros((1, 448, 448), np.uint8), (0, 0, 0.04, 0.04), nodata=0))
    out = tmp_path / "out"
    summary = build(BuildConfig(str(src), str(out), progress=False))  # on_error=fail: not an error
    assert summary["empty_members"] == 1 and summary["skipped_members"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["empty_members"]["count"] == 1
    assert bad.stem in manifest["empty_members"]["examples"][0] and "all pixels are nodata" in \
        manifest["empty_members"]["examples"][0]
    row = next(r for r in pq.read_table(out / "index.parquet").to_pylist() if r["key"] == bad.stem)
    assert row["esawc_offset"] is None and row["biomass_offset"] is not None


def test_duplicate_identifiers_fail_before_writing(src, tmp_path):
    csv = next((src / "conus").glob("*_splits_*.csv"))
    lines = csv.read_text().splitlines()
    dup = lines[1].split(",")[0]
    csv.write_text("\n".join(lines + [f"{dup},test"]) + "\n")
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=f"duplicate identifier {dup}"):
        build(BuildConfig(str(src), str(out), progress=False))
    assert not out.exists() or not any(out.rglob("*.tar"))
    summary = build(BuildConfig(str(src), str(tmp_path / "skip"), on_error="skip", progress=False))
    assert summary["skipped_chips"] == 1
    keys = pq.read_table(tmp_path / "skip" / "index.parquet").column("key").to_pylist()
    assert dup not in keys and len(keys) == 7


def test_unreadable_parquet_row_is_named(tmp_path):
    src = tmp_path / "psrc"
    synth(SynthConfig(str(src), ("conus",), 6, seed=3, modalities=("esawc", "srtmdem"), parquet=True), progress=False)
    f = next(Path(p) for p in glob.glob(str(src / "conus" / "*" / "esaworldcover-2020" / "*.parquet")))
    t = pq.read_table(f)
    content = t.column("content").to_pylist()
    content[2] = b"not a tiff at all"
    t = t.set_column(t.column_names.index("content"), "content", pa.array(content, pa.binary()))
    pq.write_table(t, f, row_group_size=4)
    victim = t.column("path")[2].as_py().rsplit("/", 1)[-1].split(".")[0]
    with pytest.raises(BuildError) as err:
        build(BuildConfig(str(src), str(tmp_path / "out"), progress=False))
    text = str(err.value)
    assert victim in text and f.name in text and "rowgroup=0,row=2" in text
    _assert_nothing_partial(tmp_path / "out")


def test_killed_build_resumes_to_identical_result(tmp_path):
    src = tmp_path / "src"
    synth(SynthConfig(str(src), ("conus",), 12, seed=5, modalities=("esawc", "gssic", "srtmdem")), progress=False)
    args = [str(src), "--shard-size", "300kB", "-q"]
    clean = tmp_path / "clean"
    assert cli_main(["build", args[0], str(clean), *args[1:]]) == 0
    out = tmp_path / "resumed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "shard_tools.cli", "build", args[0], str(out), *args[1:]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "_build" / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(records.rglob("*.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(records.rglob("*.json")))
    total = len(list(clean.rglob("*.tar")))
    assert 3 <= done < total, "the build should have been killed midway"
    assert not (out / "manifest.json").exists()
    assert cli_main(["build", args[0], str(out), *args[1:]]) == 0
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    for tar in clean.rglob("*.tar"):
        assert filecmp.cmp(tar, out / tar.relative_to(clean), shallow=False)
    assert pq.read_table(clean / "index.parquet").equals(pq.read_table(out / "index.parquet"))
    assert verify(str(out), progress=False)[0] == []


def test_rebuild_into_a_root_with_other_arguments_is_refused(src, tmp_path):
    out = tmp_path / "out"
    build(BuildConfig(str(src), str(out), progress=False))
    with pytest.raises(BuildError, match="other arguments"):
        build(BuildConfig(str(src), str(out), compress="zstd", progress=False))


def test_verify_names_corruption(src, tmp_path):
    out = tmp_path / "out"
    build(BuildConfig(str(src), str(out), shard_size=1_000_000, progress=False))
    assert cli_main(["verify", str(out), "-q"]) == 0
    rows = pq.read_table(out / "index.parquet").to_pylist()
    shard = out / rows[0]["shard"]
    data = bytearray(shard.read_bytes())
    data[rows[0]["esawc_offset"] + 200] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems, _ = verify(str(out), progress=False)
    assert any(rows[0]["shard"] in p and "sha256" in p for p in problems)
    assert any(f"member {rows[0]['key']}.esawc.npy hashes to" in p for p in problems)  # the member, by its digest
    t = pq.read_table(out / "index.parquet")
    offs = t.column("srtmdem_offset").to_pylist()
    i = next(k for k in range(1, len(offs)) if offs[k] is not None)
    offs[i] += 512
    pq.write_table(t.set_column(t.column_names.index("srtmdem_offset"), "srtmdem_offset", pa.array(offs, pa.int64())),
                   out / "index.parquet")
    problems, _ = verify(str(out), progress=False)
    assert any(f"{rows[i]['key']}.srtmdem.npy" in p and "index range" in p for p in problems)


def test_verify_names_swapped_digests_and_bad_chunk_digests(src, tmp_path):
    """An index whose member digests were swapped between two rows, or whose digest of a member's chunk digests
    is wrong: each is a problem naming the shard and member (the tar and its sha256 are intact); then a chunk
    digest altered in the tar is named too."""
    out = tmp_path / "out"
    build(BuildConfig(str(src), str(out), shard_size=1_000_000, progress=False))
    t = pq.read_table(out / "index.parquet")
    d = t.to_pydict()
    sums = d["esawc_xxh3"]
    a, b = [i for i, x in enumerate(sums) if x is not None][:2]
    sums[a], sums[b] = sums[b], sums[a]
    t = t.set_column(t.column_names.index("esawc_xxh3"), "esawc_xxh3", pa.array(sums, pa.uint64()))
    chunks = d["srtmdem_chunks_xxh3"]
    c = next(i for i, x in enumerate(chunks) if x is not None)
    chunks[c] ^= 1
    t = t.set_column(t.column_names.index("srtmdem_chunks_xxh3"), "srtmdem_chunks_xxh3", pa.array(chunks, pa.uint64()))
    pq.write_table(t, out / "index.parquet")
    problems, _ = verify(str(out), progress=False)
    for i in (a, b):
        assert any(d["shard"][i] in p and f"member {d['key'][i]}.esawc.npy hashes to" in p for p in problems)
    assert any(f"member {d['key'][c]}.srtmdem.npy: its chunk-digest member does not hash" in p for p in problems)
    assert not any("sha256" in p for p in problems)
    shard = out / d["shard"][c]
    data = bytearray(shard.read_bytes())
    start = sf.chunk_digests_range(d["srtmdem_offset"][c], 2)[0]  # srtmdem: elevation, slope
    data[start + 8] ^= 1  # band 0's digest
    shard.write_bytes(bytes(data))
    problems, _ = verify(str(out), progress=False)
    assert any(f"member {d['key'][c]}.srtmdem.npy: the digest of its band 0 differs from its chunk-digest member" in p
               for p in problems)


def test_finalize_refuses_records_without_digests_or_with_ranges_past_the_shard(src, tmp_path):
    """A shard record from a build without member checksums, or one whose member range ends past the shard's size:
    finalize names it and publishes nothing."""
    from shard_tools.build import finalize

    out = tmp_path / "out"
    build(BuildConfig(str(src), str(out), shard_size=1_000_000, progress=False))
    rec = sorted((out / "_build" / "shards").rglob("*.json"))[0]
    good = rec.read_text()
    for damage in ("no digests", "past the end"):
        for name in ("manifest.json", "index.parquet"):
            (out / name).unlink(missing_ok=True)
        r = json.loads(good)
        if damage == "no digests":
            r["rows"] = {k: v for k, v in r["rows"].items() if not k.endswith("xxh3")}
            match = "built without member checksums"
        else:
            r["rows"]["esawc_nbytes"][0] = r["bytes"]
            match = rf"{r['path']} key {r['rows']['key'][0]} member esawc: its range ends at byte \d+, the shard has"
        rec.write_text(json.dumps(r))
        with pytest.raises(BuildError, match=match):
            finalize(str(out))
        _assert_nothing_partial(out)
