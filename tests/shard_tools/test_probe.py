"""``m3leo-shards probe``: verdicts per folder on the exporters' encodings, our own encodings, bad files, parquet
and S3 sources, and the exit code a user relies on before a long build."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shard_tools.cli import main as cli_main
from shard_tools.probe import ProbeConfig, build_would_fail, probe
from shard_tools.rasters import geotiff_bytes
from shard_tools.synth import SynthConfig, synth

REPO = Path(__file__).resolve().parents[2]
MODS = ("s1grd", "s2rgbm", "gssic", "gunw", "srtmdem", "esawc")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "src"
    synth(SynthConfig(str(out), ("conus", "europe"), 8, seed=4, modalities=MODS), progress=False)
    return out


def _by_folder(reports, region: str = "conus"):
    return {r.folder: r for r in reports if r.region == region}


def test_exporter_encodings_get_their_verdicts(src):
    reports = probe(ProbeConfig(str(src), per_folder=3))
    f = _by_folder(reports)
    assert f["s1grd-2020"].verdict == "converted" and "geetiles-2023-uint16" in f["s1grd-2020"].detail
    assert f["s1grd-2020"].samples[0].dtype == "uint16" and f["s1grd-2020"].samples[0].bands == 16
    assert f["s2rgbm-2020"].verdict == "stored as is" and "geetiles-2023-uint8" in f["s2rgbm-2020"].detail
    assert f["srtmdem"].verdict == "converted" and _by_folder(reports, "europe")["strmdem"].modality == "srtmdem"
    assert f["gssic"].verdict == "stored as is" and "bilinear+nearest" in f["gssic"].detail
    assert f["esaworldcover-2020"].verdict == "stored as is"
    marked = [r for r in reports if r.skipped_markers]
    assert marked and all(r.modality in ("gunw", "gssic") and "'.skipped' file(s) ignored" in r.detail
                          for r in marked)
    assert all(len(r.samples) == 3 for r in reports)
    assert not build_would_fail(reports, "fail")


def test_table_and_exit_code_of_a_good_source(src, capsys):
    assert cli_main(["probe", str(src), "--per-folder", "2"]) == 0
    out = capsys.readouterr().out
    assert "region conus" in out and "s1grd-2020" in out and "would succeed" in out
    assert cli_main(["probe", str(src), "--per-folder", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["build_would_fail"] is False and {f["verdict"] for f in doc["folders"]} <= {"converted", "stored as is"}


def test_todays_own_encodings_and_an_unknown_folder(tmp_path):
    """int16 S1 with a -32768 tag (what synth wrote before) is accepted; an unknown folder is named, not fatal."""
    src = tmp_path / "src"
    synth(SynthConfig(str(src), ("conus",), 4, seed=1, modalities=("s1grd", "esawc")), progress=False)
    d = Path(glob.glob(str(src / "conus" / "conus_partitions_aschips_*[0-9a-f]"))[0])
    for p in (d / "s1grd-2020").iterdir():
        a = np.full((16, 448, 448), -12, np.int16)
        a[:, :, :30] = -32768
        p.write_bytes(geotiff_bytes(a, (0, 0, 0.04, 0.04), nodata=-32768))
    (d / "s2srm-2020").mkdir()
    reports = _by_folder(probe(ProbeConfig(str(src), per_folder=2)))
    assert reports["s1grd-2020"].verdict == "converted" and "int16 dB" in reports["s1grd-2020"].detail
    assert reports["s1grd-2020"].samples[0].nodata == -32768
    assert reports["s2srm-2020"].verdict == "unknown folder" and reports["s2srm-2020"].modality is None


def test_unknown_encoding_names_the_file_and_fails(tmp_path, capsys):
    src = tmp_path / "src"
    synth(SynthConfig(str(src), ("conus",), 4, seed=2, modalities=("s1grd", "esawc")), progress=False)
    d = Path(glob.glob(str(src / "conus" / "conus_partitions_aschips_*[0-9a-f]"))[0])
    victim = sorted((d / "s1grd-2020").iterdir())[0]
    victim.write_bytes(geotiff_bytes(np.ones((16, 448, 448), np.int32), (0, 0, 0.04, 0.04)))
    assert cli_main(["probe", str(src), "--per-folder", "4"]) == 1
    out = capsys.readouterr().out
    assert victim.name in out and "dtype int32 cannot be stored as int16" in out and "would FAIL" in out
    assert cli_main(["probe", str(src), "--per-folder", "4", "--on-error", "skip"]) == 0  # as build would
    capsys.readouterr()
    # the folder a build would not read (another year) does not decide the exit code
    (d / "s1grd-2020").rename(d / "s1grd-2019")
    synth(SynthConfig(str(tmp_path / "y"), ("conus",), 4, seed=2, modalities=("s1grd",)), progress=False)
    good = Path(glob.glob(str(tmp_path / "y" / "conus" / "conus_partitions_aschips_*[0-9a-f]"))[0]) / "s1grd-2020"
    good.rename(d / "s1grd-2020")
    assert cli_main(["probe", str(src), "--per-folder", "4"]) == 0
    assert "s1grd-2019 (not read)" in capsys.readouterr().out


def test_parquet_release_reads_only_sampled_row_groups(tmp_path):
    src = tmp_path / "p"
    synth(SynthConfig(str(src), ("conus",), 8, seed=3, modalities=("s1grd", "esawc"), parquet=True,
                      chips_per_parquet=4, rows_per_group=2), progress=False)
    reports = _by_folder(probe(ProbeConfig(str(src), per_folder=2)))
    s1 = reports["s1grd-2020"]
    assert s1.verdict == "converted" and s1.files == 8 and len(s1.samples) == 2
    assert all("#rowgroup=" in s.file for s in s1.samples)


@pytest.mark.s3
def test_probe_over_s3(s3, tmp_path):
    bucket = s3.new_bucket()
    src = f"s3://{bucket}/release"
    synth(SynthConfig(src, ("europe",), 4, seed=5, modalities=("s1grd", "srtmdem")), progress=False)
    proc = subprocess.run([sys.executable, "-m", "shard_tools.cli", "probe", src, "--per-folder", "2", "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    f = {x["folder"]: x for x in doc["folders"]}
    assert f["s1grd-2020"]["verdict"] == "converted" and f["strmdem"]["modality"] == "srtmdem"
    assert f["s1grd-2020"]["samples"][0]["file"].startswith(f"{bucket}/release/")
