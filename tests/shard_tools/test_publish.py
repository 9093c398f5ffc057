"""Staging and atomic publication, on a local directory and on S3 (moto_server)."""

from __future__ import annotations

import os
import tempfile

import fsspec
import pytest

from shard_tools.publish import PARTIAL, pipe_atomic, put_atomic, staged, staging_path


def _leftovers(d) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if PARTIAL in p.name)


def test_staged_local_publishes_by_a_rename_beside_the_output(tmp_path):
    fs = fsspec.filesystem("file")
    dest = str(tmp_path / "a" / "b" / "shard.tar")
    with staged(fs, dest) as tmp:
        assert os.path.dirname(tmp) == os.path.dirname(dest) and os.path.basename(tmp).startswith("shard.tar" + PARTIAL)
        with open(tmp, "wb") as f:
            f.write(b"whole")
        assert not os.path.exists(dest)
    assert open(dest, "rb").read() == b"whole"
    assert _leftovers(tmp_path) == []


def test_staged_in_a_folder_of_its_own(tmp_path):
    fs = fsspec.filesystem("file")
    tmp = staging_path(fs, str(tmp_path / "index.parquet"), str(tmp_path / "_build"))
    assert os.path.dirname(tmp) == str(tmp_path / "_build")
    assert os.path.basename(tmp).startswith("index.parquet" + PARTIAL)


def test_staged_failure_publishes_nothing_and_leaves_nothing(tmp_path):
    fs = fsspec.filesystem("file")
    dest = tmp_path / "out" / "index.parquet"
    with pytest.raises(RuntimeError, match="disk full"), staged(fs, str(dest)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")
    assert not dest.exists()
    assert _leftovers(tmp_path) == []


def test_pipe_and_put_atomic_replace_whole_files(tmp_path):
    fs = fsspec.filesystem("file")
    dest = tmp_path / "x" / "manifest.json"
    pipe_atomic(fs, str(dest), b"one")
    pipe_atomic(fs, str(dest), b"two")
    assert dest.read_bytes() == b"two"
    src = tmp_path / "local.bin"
    src.write_bytes(b"three")
    put_atomic(fs, str(src), str(dest))
    assert dest.read_bytes() == b"three" and not src.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.s3
def test_staged_on_s3_uploads_and_removes_the_local_file(s3):
    bucket = s3.new_bucket()
    fs = fsspec.filesystem("s3")
    dest = f"{bucket}/root/_build/plan.parquet"
    with staged(fs, dest) as tmp:
        assert os.path.dirname(tmp) == tempfile.gettempdir()
        with open(tmp, "wb") as f:
            f.write(b"uploaded")
    assert fs.cat_file(dest) == b"uploaded"
    assert not os.path.exists(tmp)
    with pytest.raises(RuntimeError, match="stopped"), staged(fs, f"{bucket}/root/other.parquet") as tmp:
        raise RuntimeError("stopped")
    assert not fs.exists(f"{bucket}/root/other.parquet") and not os.path.exists(tmp)
