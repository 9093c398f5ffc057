"""Build from and to a real S3 endpoint (moto_server on 127.0.0.1) through s3fs."""

from __future__ import annotations

import json
import tempfile

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from m3leo_stream.shard_root import ShardRoot
from shard_tools.build import BuildConfig, build
from shard_tools.cli import main as cli_main
from shard_tools.synth import SynthConfig, synth
from shard_tools.verify import verify

pytestmark = pytest.mark.s3


def test_build_s3_to_s3_matches_local_build(s3, tmp_path):
    bucket = s3.new_bucket()
    src = f"s3://{bucket}/m3leo-src"
    mods = ("s1grd", "esawc", "gssic", "biomass")
    synth(SynthConfig(src, ("conus", "europe"), 6, seed=11, modalities=mods), workers=1, progress=False)
    local_src = tmp_path / "src"
    synth(SynthConfig(str(local_src), ("conus", "europe"), 6, seed=11, modalities=mods), progress=False)

    out = f"s3://{bucket}/shards/v1"
    assert cli_main(["build", src, out, "--shard-size", "20MB", "--workers", "2", "-q"]) == 0
    local = tmp_path / "local"
    build(BuildConfig(str(local_src), str(local), shard_size=20_000_000, progress=False))

    fs = fsspec.filesystem("s3")
    for p in sorted(local.rglob("*.tar")):
        rel = p.relative_to(local).as_posix()
        assert fs.cat_file(f"{bucket}/shards/v1/{rel}") == p.read_bytes(), rel
    assert not [p for p in fs.find(f"{bucket}/shards/v1") if "partial" in p]
    remote = ShardRoot(out)
    assert pq.read_table(local / "index.parquet").equals(remote.read_index())
    assert json.loads((local / "stats.json").read_text()) == remote.stats
    assert verify(out, progress=False)[0] == []
    row = remote.read_index().to_pylist()[3]
    np.testing.assert_array_equal(remote.read_member(row, "s1grd"), ShardRoot(str(local)).read_member(row, "s1grd"))


def test_storage_options_flag_reaches_the_endpoint(s3, tmp_path, monkeypatch):
    bucket = s3.new_bucket()
    src = tmp_path / "src"
    synth(SynthConfig(str(src), ("europe",), 3, seed=1, modalities=("esawc",)), progress=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    fsspec.AbstractFileSystem.clear_instance_cache()
    opts = json.dumps({"endpoint_url": s3.url, "key": "testing", "secret": "testing"})
    out = f"s3://{bucket}/x"
    assert cli_main(["build", str(src), out, "--storage-options", opts, "-q"]) == 0
    assert ShardRoot(out, json.loads(opts)).manifest["num_samples"] == 3


def test_build_to_s3_leaves_no_temporary_files(s3, tmp_path, monkeypatch):
    bucket = s3.new_bucket()
    src = tmp_path / "src"
    synth(SynthConfig(str(src), ("europe",), 3, seed=2, modalities=("esawc",)), progress=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where shards, plan tables and the index are staged
    build(BuildConfig(str(src), f"s3://{bucket}/out", progress=False))
    assert ShardRoot(f"s3://{bucket}/out").manifest["num_samples"] == 3
    assert sorted(p.name for p in scratch.iterdir()) == []


def test_array_build_to_s3_finalizes_from_partial_indexes(s3, tmp_path, monkeypatch):
    """2 array tasks write their shards and partial indexes to S3; finalize merges the partials (reading no shard
    record) into the same index and stats bytes as a local single build."""
    from shard_tools import partials
    from shard_tools.build import finalize

    src = tmp_path / "src"
    synth(SynthConfig(str(src), ("conus", "europe"), 6, seed=11, modalities=("s1grd", "gssic")), progress=False)
    local = tmp_path / "local"
    build(BuildConfig(str(src), str(local), shard_size=20_000_000, progress=False))
    out = f"s3://{s3.new_bucket()}/shards"
    for i in range(2):
        summary = build(BuildConfig(str(src), out, shard_size=20_000_000, progress=False, task_index=i, num_tasks=2))
        assert summary["partial_index"].endswith(f"_build/parts/task-{i:05d}-of-00002.json")
    monkeypatch.setattr(partials, "record_table", lambda *a: pytest.fail("finalize read a shard record"))
    finalize(out)
    fs = fsspec.filesystem("s3")
    for name in ("index.parquet", "stats.json"):
        assert fs.cat_file(f"{out[len('s3://'):]}/{name}") == (local / name).read_bytes(), name
