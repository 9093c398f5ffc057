"""Reading the parquet-packed release: each row group's ``content`` column chunk read once per shard, bounded memory,
no read-ahead over remote files, and the same shards as from the unpacked files."""

from __future__ import annotations

import json
import os
import random
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shard_tools import hub
from shard_tools.build import BuildConfig, build, make_plan
from shard_tools.synth import SynthConfig, synth

MODS = ("s1grd", "s2rgbm")
REGIONS = ("conus",)
CHIPS = 16
SEED = 11
SHARD_SIZE = 10**9  # one shard per split


@pytest.fixture(scope="module")
def plain_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("pq-plain") / "src"
    synth(SynthConfig(str(src), REGIONS, CHIPS, seed=SEED, modalities=MODS), workers=2, progress=False)
    return src


@pytest.fixture(scope="module")
def plain_shards(plain_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pq-plain-out") / "root"
    build(BuildConfig(str(plain_src), str(out), shard_size=SHARD_SIZE, progress=False))
    return out


def _synth_parquet(root: Path, rows_per_group: int) -> Path:
    src = root / f"src-rpg{rows_per_group}"
    synth(SynthConfig(str(src), REGIONS, CHIPS, seed=SEED, modalities=MODS, parquet=True,
                      rows_per_group=rows_per_group), workers=2, progress=False)
    return src


@pytest.fixture(scope="module")
def synth_rpg4(tmp_path_factory) -> Path:
    """The synth release: files of consecutive grid chips (all splits mixed), rows not in identifier order."""
    return _synth_parquet(tmp_path_factory.mktemp("pq-synth"), 4)


@pytest.fixture(scope="module")
def ordered_rpg4(plain_src, tmp_path_factory) -> Path:
    """The plain synth files packed as a release whose files each hold one split, rows in identifier order
    (4 rows per row group): the order a shard reads them in."""
    dest = tmp_path_factory.mktemp("pq-ordered") / "src"
    shutil.copytree(plain_src, dest)
    for csv in dest.glob("*/*_splits_*.csv"):
        splits = dict(line.split(",")[:2] for line in csv.read_text().splitlines()[1:])
        data = csv.parent / csv.name.split("_splits_")[0]
        for folder in sorted(p for p in data.iterdir() if p.is_dir()):
            files = sorted(folder.iterdir(), key=lambda p: (splits[p.stem], p.stem))
            for split in ("train", "val", "test"):
                rows = [p for p in files if splits[p.stem] == split]
                table = pa.table({
                    "path": [f"{csv.parent.name}/{data.name}/{folder.name}/{p.name}" for p in rows],
                    "modificationTime": pa.array([0] * len(rows), pa.timestamp("us")),
                    "length": [p.stat().st_size for p in rows],
                    "content": pa.array([p.read_bytes() for p in rows], pa.binary()),
                    "ds": [folder.name] * len(rows),
                })
                pq.write_table(table, folder / f"{split}.zstd.parquet", compression="zstd", row_group_size=4)
            for p in files:
                p.unlink()
    return dest


def _stored(src: Path) -> int:
    return sum(p.stat().st_size for p in src.rglob("*.parquet"))


def _build(src: Path, out: Path, **kw) -> hub.ReadStats:
    hub.READ_TOTALS.reset()
    build(BuildConfig(str(src), str(out), shard_size=SHARD_SIZE, workers=1, progress=False, **kw))
    stats = hub.ReadStats()
    stats.merge(hub.READ_TOTALS)
    return stats


def _floor(src: Path, **kw) -> tuple[int, int, int]:
    """What a reader that reads each row group once per reading group needing it takes: (row group reads, their
    ``content`` column chunk bytes, parquet files opened)."""
    plan = make_plan(BuildConfig(str(src), "unused", **{"shard_size": SHARD_SIZE, "progress": False, **kw}))
    chunk = {}
    for p in src.rglob("*.parquet"):
        md = pq.ParquetFile(p).metadata
        col = md.schema.to_arrow_schema().get_field_index("content")
        for rg in range(md.num_row_groups):
            chunk[(str(p), rg)] = md.row_group(rg).column(col).total_compressed_size
    groups, files = set(), set()
    for g, members in enumerate(plan.groups):
        for c in (c for i in members for c in plan.shards[i].chips):
            for ref in c.files.values():
                groups.add((g, ref.path, ref.row_group))
                files.add((g, ref.path))
    return len(groups), sum(chunk[(p, rg)] for _, p, rg in groups), len(files)


def _members(root: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for tar_path in sorted(root.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out[str(tar_path.relative_to(root))] = {ti.name: tar.extractfile(ti).read() for ti in tar.getmembers()}
    return out


def _assert_same_as_plain(plain: Path, packed: Path) -> None:
    """Byte-identical arrays in the same shards (one shard per split here) and the same index rows; json members
    differ only in the recorded source (a row of a parquet file instead of a file). A parquet region's chips come
    in the order of their rows, a folder's by identifier."""
    a, b = _members(plain), _members(packed)
    assert sorted(a) == sorted(b) and a
    for shard in a:
        assert sorted(a[shard]) == sorted(b[shard]), shard
        for name, data in a[shard].items():
            if not name.endswith(".json"):
                assert data == b[shard][name], f"{shard}:{name}"
                continue
            ja, jb = json.loads(data), json.loads(b[shard][name])
            for m in ja["modalities"]:
                assert "#rowgroup=" in jb["modalities"][m].pop("source")
                ja["modalities"][m].pop("source")
            assert ja == jb, f"{shard}:{name}"
    ia, ib = pq.read_table(plain / "index.parquet"), pq.read_table(packed / "index.parquet")
    # the json members' sizes differ, and with them the offsets of later members
    same = [c for c in ia.column_names if not c.endswith("_offset") and not c.startswith("json_")]
    order = [("region", "ascending"), ("key", "ascending")]
    assert ia.select(same).sort_by(order).equals(ib.select(same).sort_by(order))
    assert json.loads((plain / "stats.json").read_text()) == json.loads((packed / "stats.json").read_text())


def test_ordered_release_read_once_within_10_percent_of_stored(ordered_rpg4, plain_shards, tmp_path):
    out = tmp_path / "out"
    stats = _build(ordered_rpg4, out)
    stored = _stored(ordered_rpg4)
    read = stats.parquet_bytes + stats.index_bytes
    assert read <= 1.10 * stored, (read, stored, stats)
    per_file = [pq.ParquetFile(p).metadata.num_row_groups for p in ordered_rpg4.rglob("*.parquet")]
    n_groups = sum(per_file)
    assert max(per_file) >= 3  # the train shard reads its modalities' row groups in turn
    assert stats.row_groups_read == n_groups and stats.row_group_rereads == 0
    assert stats.peak_row_groups_per_file == 1
    assert stats.parquet_files_opened == len(list(ordered_rpg4.rglob("*.parquet")))
    _assert_same_as_plain(plain_shards, out)


def test_synth_release_one_row_per_group_within_10_percent_of_stored(tmp_path, plain_shards):
    src = _synth_parquet(tmp_path, 1)
    stats = _build(src, tmp_path / "out")
    read = stats.parquet_bytes + stats.index_bytes
    assert read <= 1.10 * _stored(src), (read, _stored(src), stats)
    assert stats.row_group_rereads == 0 and stats.peak_row_groups_per_file == 1
    _assert_same_as_plain(plain_shards, tmp_path / "out")


class _NaiveReader:
    """Reads every row on its own, straight from the file: what the cached reader must return."""

    def __init__(self, fs, refs=None, **kw):
        self.fs = fs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def read(self, ref):
        if not ref.in_parquet:
            return hub.SourceReader(self.fs).read(ref)
        with self.fs.open(ref.path, "rb") as f:
            return pq.ParquetFile(f).read_row_group(ref.row_group, columns=["content"]).column(0)[ref.row].as_py()

    def close(self):
        pass


def test_mixed_split_release_reads_each_row_group_once(synth_rpg4, plain_shards, tmp_path, monkeypatch):
    """Synth files mix splits: the shards of all splits of the region form one reading group, so each row group is
    read once (its content column chunk only), and the output is that of reading rows one by one."""
    out = tmp_path / "out"
    stats = _build(synth_rpg4, out)
    groups, floor_bytes, files = _floor(synth_rpg4)
    assert stats.row_groups_read == groups == sum(pq.ParquetFile(p).metadata.num_row_groups
                                                  for p in synth_rpg4.rglob("*.parquet"))
    assert stats.row_group_rereads == 0
    assert stats.parquet_files_opened == files
    assert stats.parquet_bytes <= 1.10 * floor_bytes, (stats.parquet_bytes, floor_bytes)
    assert stats.parquet_bytes + stats.index_bytes <= 1.10 * _stored(synth_rpg4)
    _assert_same_as_plain(plain_shards, out)
    monkeypatch.setattr(hub, "SourceReader", _NaiveReader)
    naive = tmp_path / "naive"
    build(BuildConfig(str(synth_rpg4), str(naive), shard_size=SHARD_SIZE, workers=1, progress=False))
    a, b = _members(out), _members(naive)
    assert a == b
    assert pq.read_table(out / "index.parquet").equals(pq.read_table(naive / "index.parquet"))


def _refs(src: Path) -> list[hub.FileRef]:
    plan = make_plan(BuildConfig(str(src), "unused", shard_size=SHARD_SIZE, progress=False))
    return [ref for s in plan.shards for c in s.chips for ref in c.files.values()]


def _expected(fs, ref: hub.FileRef) -> bytes:
    return _NaiveReader(fs).read(ref)


def test_reader_bounds_kept_rows_and_stays_correct_in_any_order(synth_rpg4):
    import fsspec

    fs = fsspec.filesystem("file")
    refs = _refs(synth_rpg4)
    random.Random(0).shuffle(refs)
    largest = max(len(_expected(fs, r)) for r in refs)
    limit = 2 * largest
    row_group_bytes = 4 * largest  # the rows one row group can keep
    with hub.SourceReader(fs, refs, pending_limit=limit) as reader:
        for ref in refs:
            assert reader.read(ref) == _expected(fs, ref)
            assert reader._pending_bytes <= max(limit, row_group_bytes)
        assert reader.stats.row_group_rereads > 0  # the limit made it drop kept rows
        assert not reader._files  # every file closed once all its rows were served
    # without the shard's refs: the last row group of each file only
    with hub.SourceReader(fs) as reader:
        for ref in refs[:20]:
            assert reader.read(ref) == _expected(fs, ref)
            assert all(len(f.kept) <= 1 for f in reader._files.values())
        assert reader.stats.peak_row_groups_per_file == 1
    with pytest.raises(ValueError, match="closed"):
        reader.read(refs[0])


def test_remote_release_is_read_without_read_ahead(s3, tmp_path):
    """From an object store, the bytes fetched (counted at the store, under fsspec's cache) stay within 10 % of the
    bytes stored: no read-ahead block past each column chunk or footer."""
    import fsspec

    src = tmp_path / "src"
    synth(SynthConfig(str(src), REGIONS, 6, seed=SEED, modalities=MODS, parquet=True, rows_per_group=1),
          workers=2, progress=False)
    bucket = s3.new_bucket()
    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.put(str(src), f"{bucket}/src", recursive=True)
    hub.READ_TOTALS.reset()
    build(BuildConfig(f"s3://{bucket}/src", str(tmp_path / "out"), shard_size=SHARD_SIZE, workers=1,
                      progress=False))
    read = hub.READ_TOTALS.parquet_bytes + hub.READ_TOTALS.index_bytes
    assert 0 < read <= 1.10 * _stored(src), (read, _stored(src), hub.READ_TOTALS)


CHIP_BYTES = 13_652_480  # one s1grd + s2rgbm sample in a shard
GROUPED = {"shard_size": 3 * CHIP_BYTES, "read_group_shards": 2}  # 3 chips a shard, a file (8 chips) a group


@pytest.fixture(scope="module")
def synth_groups(tmp_path_factory) -> Path:
    """32 chips in 4 files per modality, row groups of 4 rows mixing the splits."""
    src = tmp_path_factory.mktemp("pq-groups") / "src"
    synth(SynthConfig(str(src), REGIONS, 32, seed=SEED, modalities=MODS, parquet=True, rows_per_group=4,
                      chips_per_parquet=8), workers=2, progress=False)
    return src


def _grouped_build(src: Path, out: Path, **kw) -> float:
    hub.READ_TOTALS.reset()
    build(BuildConfig(str(src), str(out), progress=False, **{**GROUPED, **kw}))
    return (hub.READ_TOTALS.parquet_bytes + hub.READ_TOTALS.index_bytes) / _stored(src)


def _output(root: Path) -> tuple[dict, bytes, list, str]:
    manifest = json.loads((root / "manifest.json").read_text())
    return _members(root), (root / "index.parquet").read_bytes(), manifest["shards"], (root / "stats.json").read_text()


def test_reading_groups_read_within_10_percent_of_stored(synth_groups, tmp_path, monkeypatch):
    """Several reading groups over row groups that mix splits: bytes read within 10 % of the bytes stored, and the
    same shards, index and statistics with two workers and with two array tasks and finalize."""
    from shard_tools import build as build_mod

    plan = make_plan(BuildConfig(str(synth_groups), "unused", progress=False, **GROUPED))
    assert len(plan.groups) >= 3 and sorted(i for g in plan.groups for i in g) == list(range(len(plan.shards)))
    assert all(len({plan.shards[i].split for i in g}) == 3 for g in plan.groups)
    ratio = _grouped_build(synth_groups, tmp_path / "one", workers=1)
    assert ratio <= 1.10, ratio
    assert hub.READ_TOTALS.row_group_rereads == 0
    # rows kept for later shards: about a shard of each other split (shards are built in the order they end)
    assert hub.READ_TOTALS.peak_pending_bytes <= 3 * GROUPED["shard_size"], hub.READ_TOTALS
    assert hub.READ_TOTALS.row_groups_read == sum(pq.ParquetFile(p).metadata.num_row_groups
                                                  for p in synth_groups.rglob("*.parquet"))
    expected = _output(tmp_path / "one")
    _grouped_build(synth_groups, tmp_path / "two", workers=2)
    assert _output(tmp_path / "two") == expected
    for task in (1, 0):
        build(BuildConfig(str(synth_groups), str(tmp_path / "tasks"), progress=False, num_tasks=2, task_index=task,
                          **GROUPED))
    build_mod.finalize(str(tmp_path / "tasks"))
    assert _output(tmp_path / "tasks") == expected
    # a resumed group builds only what is missing, with the same result
    (tmp_path / "tasks" / "_build" / "shards" / plan.shards[plan.groups[1][0]].path.replace(".tar", ".json")).unlink()
    build(BuildConfig(str(synth_groups), str(tmp_path / "tasks"), progress=False, **GROUPED))
    assert _output(tmp_path / "tasks") == expected
    # without reading groups (a reader per shard) the row groups are read by every split's shard
    monkeypatch.setattr(build_mod, "build_group", lambda tasks: [build_mod.build_shard(t) for t in tasks])
    assert _grouped_build(synth_groups, tmp_path / "ungrouped", workers=1) > 1.5
    assert _output(tmp_path / "ungrouped") == expected


def test_long_reading_groups_cut_between_row_groups(synth_groups, tmp_path, monkeypatch):
    """A group that grows past READ_GROUP_SPAN times its size is cut between row groups within a file: no row
    group is shared by two groups, so bytes read stay within 10 % of stored."""
    from shard_tools import build as build_mod

    by_file = make_plan(BuildConfig(str(synth_groups), "unused", progress=False, **GROUPED))
    monkeypatch.setattr(build_mod, "READ_GROUP_SPAN", 1)
    cfg = {**GROUPED, "read_group_shards": 1}
    plan = make_plan(BuildConfig(str(synth_groups), "unused", progress=False, **cfg))
    assert len(plan.groups) > len(by_file.groups)
    owner: dict[tuple[str, int], int] = {}
    for g, members in enumerate(plan.groups):
        for c in (c for i in members for c in plan.shards[i].chips):
            for ref in c.files.values():
                assert owner.setdefault((ref.path, ref.row_group), g) == g
    assert _grouped_build(synth_groups, tmp_path / "out", workers=1, read_group_shards=1) <= 1.10
