"""manifest.json and stats.json through the format package: the typed Manifest writes the bytes finalize writes,
and reading refuses versions and checksums it does not understand, naming the file; stats.json has one lookup and one
error naming what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from m3leo_stream import shard_format as sf
from m3leo_stream.shard_root import ShardRoot
from shard_tools.build import BuildConfig, build
from shard_tools.synth import SynthConfig, synth

RECOMPUTE = "m3leo-shards stats ROOT"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A finalized root of 8 chips of two regions (a continuous and a categorical modality)."""
    base = tmp_path_factory.mktemp("fmt")
    synth(SynthConfig(str(base / "src"), ("conus", "europe"), 4, seed=3, modalities=("biomass", "esawc")),
          progress=False)
    build(BuildConfig(str(base / "src"), str(base / "root"), workers=1, progress=False))
    return base / "root"


def test_manifest_writes_the_bytes_finalize_wrote(tiny_root):
    data = (tiny_root / sf.MANIFEST).read_bytes()
    m = sf.Manifest.loads(data)
    assert m.to_json() == data
    assert m == json.loads(data) and dict(m) == json.loads(data)  # the mapping view is the JSON object
    assert m.format_version == sf.FORMAT_VERSION and m.checksum == sf.CHECKSUM and not m.extra
    assert m.num_samples == sum(s["num_samples"] for s in m.shards) == 8
    assert m.regions == ["conus", "europe"] and sorted(m.modalities) == ["biomass", "esawc"]
    assert m.compression == "none" and not m.compressed
    root = ShardRoot(str(tiny_root))
    assert isinstance(root.manifest, sf.Manifest) and root.manifest.to_json() == data
    assert root.regions == m.regions and list(root.modalities) == list(m.modalities)


def test_unknown_keys_are_kept_and_written_after_the_known_ones(tiny_root):
    obj = {"later_field": {"x": 1}, **json.loads((tiny_root / sf.MANIFEST).read_text())}
    m = sf.Manifest.from_json(obj)
    assert m.extra == {"later_field": {"x": 1}} and m["later_field"] == {"x": 1}
    assert list(json.loads(m.to_json())) == [*sf.Manifest.ORDER, "later_field"]


def test_version_one_has_no_checksum_and_reads(tiny_root):
    obj = json.loads((tiny_root / sf.MANIFEST).read_text())
    obj["format_version"] = 1
    del obj["checksum"]
    m = sf.Manifest.from_json(obj)
    assert not sf.has_checksums(m) and sf.has_checksums(sf.Manifest.from_json(json.loads(
        (tiny_root / sf.MANIFEST).read_text())))
    assert "checksum" not in m and "checksum" not in json.loads(m.to_json())
    with pytest.raises(KeyError):
        m["checksum"]


@pytest.mark.parametrize("change,says", [
    ({"format_version": 3}, "manifest format_version 3; this reader understands (1, 2)"),
    ({"format_version": "2"}, "manifest format_version '2'; this reader understands (1, 2)"),
    ({"checksum": "md5"}, "manifest checksum 'md5'; this reader understands 'xxh3_64'"),
    ({"shards": None, "regions": None}, "manifest has no regions, shards"),
])
def test_what_the_reader_does_not_understand_is_refused_naming_the_file(tiny_root, tmp_path, change, says):
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    obj = json.loads((root / sf.MANIFEST).read_text())
    obj.update(change)
    (root / sf.MANIFEST).write_text(json.dumps({k: v for k, v in obj.items() if v is not None}))
    with pytest.raises(sf.FormatError) as e:
        ShardRoot(str(root)).manifest
    assert str(e.value) == f"{root}/manifest.json: {says}"


def test_a_manifest_that_is_not_json_is_a_format_error():
    with pytest.raises(sf.FormatError, match="here: not JSON"):
        sf.Manifest.loads(b"{nope", where="here")
    with pytest.raises(sf.FormatError, match="not a JSON object"):
        sf.Manifest.loads(b"[1]")


def test_stats_bytes_and_lookup(tiny_root):
    data = (tiny_root / sf.STATS).read_bytes()
    obj = json.loads(data)
    assert sf.dumps_stats(obj) == data
    stats = ShardRoot(str(tiny_root)).stats
    assert isinstance(stats, sf.Stats) and stats == obj and stats.subset(["esawc", "nope"]) == {"esawc": obj["esawc"]}
    g = obj["biomass"]["global"]
    band = obj["biomass"]["bands"][0]
    assert stats.value("biomass", band, "mean") == g["mean"][0]
    assert stats.value("biomass", band, 98) == stats.value("biomass", band, 98.0) == g["percentiles"]["98"][0]
    b = stats.band("biomass", band)
    assert (b.modality, b.band, b.scope, b.count, b.mean, b.std, b.min, b.max, b.nodata_fraction) == (
        "biomass", band, "global", g["count"][0], g["mean"][0], g["std"][0], g["min"][0], g["max"][0],
        g["nodata_fraction"][0])
    assert b.percentiles == {k: v[0] for k, v in g["percentiles"].items()}
    assert list(b.percentiles) == [sf.percentile_key(p) for p in sf.PERCENTILES]
    region = sorted(obj["biomass"]["regions"])[0]
    assert stats.value("biomass", band, "std", scope=region) == obj["biomass"]["regions"][region]["std"][0]
    assert stats.summary("esawc")["class_histogram"] == obj["esawc"]["global"]["class_histogram"]


def _error(stats, *args, **kw) -> str:
    with pytest.raises(sf.StatsError) as e:
        stats.value(*args, **kw)
    assert isinstance(e.value, sf.FormatError) and isinstance(e.value, KeyError)
    assert str(e.value) == e.value.args[0], "the message as written, not KeyError's repr"
    assert RECOMPUTE in str(e.value)
    return str(e.value)


def test_each_missing_thing_is_named(tiny_root):
    stats = ShardRoot(str(tiny_root)).stats
    where = f"{tiny_root}/stats.json"
    band = stats["biomass"]["bands"][0]
    assert _error(stats, "s1grd", "winter_vv_asc", "mean").startswith(
        f"{where} has no mean for band 'winter_vv_asc' of modality 's1grd': it has statistics of esawc, biomass only")
    assert f"has no std for band {band!r} of modality 'biomass' in region 'mars': its regions are conus, europe" in \
        _error(stats, "biomass", band, "std", scope="mars")
    assert "has no mean for band 'nope' of modality 'biomass': its bands are " + band in \
        _error(stats, "biomass", "nope", "mean")
    assert "has no percentile 5 for band" in _error(stats, "biomass", band, 5)
    with pytest.raises(sf.StatsError, match="has no band 'nope'"):
        stats.band("biomass", "nope")
    with pytest.raises(sf.StatsError, match="has no statistics of modality 'x'"):
        stats.summary("x")


def test_a_band_without_valid_pixels_and_an_empty_file():
    stats = sf.Stats({"m": {"bands": ["a", "b"], "global": {"num_samples": 1, "count": [3, 0],
                                                           "mean": [1.5, None], "std": [0.5, None]}}})
    assert stats.value("m", "a", "mean") == 1.5
    assert "has no mean for band 'b' of modality 'm': the band has no valid pixel there" in \
        _error(stats, "m", "b", "mean")
    assert "has no max for band 'a' of modality 'm': it holds per-band statistics count, mean, std" in \
        _error(stats, "m", "a", "max")
    assert "has no percentile 2 for band 'a' of modality 'm': it holds no percentiles" in _error(stats, "m", "a", 2)
    assert stats.band("m", "b").mean is None and stats.band("m", "b").count == 0
    assert "stats.json has no mean for band 'a' of modality 'm': it has no statistics at all" in \
        _error(sf.Stats.of({}), "m", "a", "mean")
    assert sf.Stats.of(stats) is stats and sf.Stats.of(None) == {}


def test_a_stats_file_that_is_not_json_is_a_format_error():
    with pytest.raises(sf.FormatError, match="s.json: not JSON"):
        sf.Stats.loads("{", where="s.json")
