"""Building at scale: the streaming finalize equals the branch point's in-memory one byte for byte, an array build
with the plan step equals a single build, and verify and stats split into array tasks."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest

from shard_tools.build import BuildConfig, build, finalize, plan_build
from shard_tools.synth import SynthConfig, synth

OUTPUTS = ("index.parquet", "stats.json")


def _manifest(root: Path) -> dict:
    m = json.loads((root / "manifest.json").read_text())
    m.pop("created")
    return m


def _same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _manifest(a) == _manifest(b)
    ma, mb = ((d / "manifest.json").read_text().splitlines() for d in (a, b))
    assert [x for x in ma if '"created"' not in x] == [x for x in mb if '"created"' not in x]


@pytest.fixture(scope="module")
def parquet_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("scale-pq") / "src"
    synth(SynthConfig(str(src), ("conus", "europe"), 10, seed=7, modalities=("s1grd", "esawc", "gssic"),
                      parquet=True), workers=1, progress=False)
    return src


@pytest.mark.parametrize("root", ["small_shards", "zstd", "resolution", "parquet", "skip"])
def test_streaming_finalize_is_byte_identical_to_the_in_memory_one(root, request, tmp_path, synth_src, parquet_src):
    from legacy_finalize import legacy_finalize

    if root == "small_shards":
        built = request.getfixturevalue("small_shards")
    else:
        built = tmp_path / "built"
        kw = {"zstd": dict(compress="zstd", modalities=["s1grd", "esawc", "gunw"], regions=["europe"]),
              "resolution": dict(resolutions={"s1grd": 224}, modalities=["s1grd", "esawc"]),
              "parquet": dict(), "skip": dict(on_error="skip", modalities=["gunw", "biomass"])}[root]
        src = parquet_src if root == "parquet" else synth_src
        build(BuildConfig(str(src), str(built), shard_size=40_000_000, progress=False, **kw))
    ref = tmp_path / "ref"
    shutil.copytree(built, ref)
    legacy_finalize(str(ref), source="somewhere")
    new = tmp_path / "new"
    shutil.copytree(built, new)
    finalize(str(new), source="somewhere")
    _same_outputs(ref, new)


def test_streaming_finalize_cuts_row_groups_as_write_table(tmp_path, synth_src, monkeypatch):
    """Several row groups, ending inside a shard's rows: still byte-identical to ``pq.write_table``'s cuts."""
    import pyarrow.parquet as pq
    from legacy_finalize import legacy_finalize

    import shard_tools.finalize as fin

    out = tmp_path / "b"
    build(BuildConfig(str(synth_src), str(out), shard_size=40_000_000, modalities=["esawc"], progress=False))
    ref, new = tmp_path / "ref", tmp_path / "new"
    shutil.copytree(out, ref)
    shutil.copytree(out, new)
    real = pq.write_table
    monkeypatch.setattr(pq, "write_table", lambda t, s, **kw: real(t, s, **{**kw, "row_group_size": 3}))
    legacy_finalize(str(ref))
    monkeypatch.setattr(fin, "ROW_GROUP", 3)
    finalize(str(new))
    assert pq.ParquetFile(new / "index.parquet").num_row_groups > 5
    _same_outputs(ref, new)


def _array_build(out: Path, src: Path) -> None:
    cfg = dict(shard_size=40_000_000, progress=False, num_tasks=3)
    header = plan_build(BuildConfig(str(src), str(out), **cfg))
    assert header["num_tasks"] == 3 and header["num_shards"] > 3
    for i in range(3):
        summary = build(BuildConfig(str(src), str(out), task_index=i, **cfg))
        assert "finalized" not in summary and summary["shards_built"] > 0
        assert summary["partial_index"].endswith(f"task-{i:05d}-of-00003.json")


def test_array_build_with_plan_step_equals_single_build(tmp_path, synth_src, small_shards, monkeypatch):
    """The plan step lists once; 3 array tasks read their shares and write their partial indexes; streaming
    finalize merges those without reading a shard record: the same root as a single build (which finalizes from
    the records), byte for byte (tars, index, stats, manifest apart from its timestamp)."""
    from shard_tools import partials

    out = tmp_path / "array"
    _array_build(out, synth_src)
    monkeypatch.setattr(partials, "record_table", lambda *a: pytest.fail("finalize read a shard record"))
    finalize(str(out), source=str(synth_src))
    tars = sorted(p.relative_to(small_shards) for p in small_shards.rglob("*.tar"))
    assert tars == sorted(p.relative_to(out) for p in out.rglob("*.tar"))
    for rel in tars:
        assert filecmp.cmp(small_shards / rel, out / rel, shallow=False), rel
    _same_outputs(small_shards, out)


def test_finalize_falls_back_to_records_where_partials_are_missing_or_stale(tmp_path, synth_src, small_shards,
                                                                           caplog):
    """A task's partial index gone, another's shard record written again since (a different size): finalize reads
    those tasks' shards from their records and the rest from the remaining partial, and the outputs stay those of
    the single build."""
    out = tmp_path / "array"
    _array_build(out, synth_src)
    parts = out / "_build" / "parts"
    (parts / "task-00000-of-00003.json").unlink()
    body = json.loads((parts / "task-00001-of-00003.json").read_text())
    record = out / "_build" / "shards" / (body["shards"][0][0][: -len(".tar")] + ".json")
    record.write_text(json.dumps(json.loads(record.read_text()), indent=1))  # same content, another size
    with caplog.at_level("WARNING", logger="shard_tools.partials"):
        finalize(str(out), source=str(synth_src))
    assert "task-00001-of-00003.json (shard records were written again since)" in caplog.text
    _same_outputs(small_shards, out)


def test_damaged_partial_index_is_refused_by_name(tmp_path, synth_src):
    """A partial whose rows do not match its shard list stops finalize, naming it; nothing is published."""
    out = tmp_path / "array"
    _array_build(out, synth_src)
    head = out / "_build" / "parts" / "task-00002-of-00003.json"
    body = json.loads(head.read_text())
    body["shards"][0][1] += 1
    body["shards"][-1][1] -= 1
    head.write_text(json.dumps(body))
    with pytest.raises(Exception, match="partial index task-00002-of-00003-.*damaged"):
        finalize(str(out))
    assert not (out / "index.parquet").exists() and not (out / "manifest.json").exists()


def test_tasks_read_only_their_share_of_the_plan(tmp_path, synth_src, monkeypatch):
    """With a plan, a task lists nothing: the source catalogue is never called, and it reads only its own row
    groups of the chip table; a rerun of the plan step reuses the plan while the source is unchanged."""
    import pyarrow.parquet as pq

    from shard_tools import build as b
    from shard_tools import hub, plan_io

    out = tmp_path / "out"
    cfg = dict(shard_size=40_000_000, progress=False, num_tasks=2)
    first = plan_build(BuildConfig(str(synth_src), str(out), **cfg))
    chips = pq.ParquetFile(out / "_build" / first["tables"]["chips"])
    assert chips.num_row_groups == 2  # one per task
    calls = []
    monkeypatch.setattr(hub, "catalog_region", lambda *a, **k: calls.append(a) or pytest.fail("listed"))
    again = plan_build(BuildConfig(str(synth_src), str(out), **cfg))
    assert again == first and not calls
    share = plan_io.read_share(b.get_fs(str(out))[0], str(out), first, 1, 2)
    planned = [s["path"] for s in plan_io.iter_shards(b.get_fs(str(out))[0], str(out), first)]
    assert [s.path for g in share for s in g] == planned[1::2]
    build(BuildConfig(str(synth_src), str(out), task_index=1, **cfg))
    assert not calls
    monkeypatch.undo()
    # a data folder's mtime changes (an entry added and removed): the plan step lists again, finds the same
    # shards and writes a new plan (a different one would be refused now that shards are built)
    import os

    folder = next(p for p in synth_src.rglob("*") if p.is_dir() and any(p.glob("*.tif")))
    st = folder.stat()
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        relisted = plan_build(BuildConfig(str(synth_src), str(out), **cfg))
    finally:
        os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert relisted["fingerprint"] != first["fingerprint"] and relisted["tables"] != first["tables"]
    assert {k: v for k, v in relisted.items() if k not in ("fingerprint", "tables")} == \
        {k: v for k, v in first.items() if k not in ("fingerprint", "tables")}


def test_verify_and_stats_as_array_tasks(tmp_path, small_shards):
    """3 verify tasks + merge report what one verify reports (nothing, then the same problems of a damaged
    root); 3 stats tasks + merge rewrite stats.json byte for byte as the build wrote it."""
    from shard_tools.verify import recompute_stats, stats_merge, verify, verify_merge

    root = tmp_path / "root"
    shutil.copytree(small_shards, root)
    for i in range(3):
        problems, summary = verify(str(root), progress=False, task_index=i, num_tasks=3, workers=2)
        assert problems == [] and summary["task"] == f"{i}/3"
    problems, summary = verify_merge(str(root), 3)
    assert problems == [] and summary["shards"] == len(json.loads((root / "manifest.json").read_text())["shards"])
    built = (root / "stats.json").read_bytes()
    (root / "stats.json").unlink()
    for i in range(3):
        recompute_stats(str(root), progress=False, task_index=i, num_tasks=3)
    stats_merge(str(root), 3)
    assert (root / "stats.json").read_bytes() == built
    (root / "stats.json").unlink()
    recompute_stats(str(root), progress=False)
    assert (root / "stats.json").read_bytes() == built
    # damage one shard's byte and drop another's results: the merge names both
    tar = sorted(root.rglob("*.tar"))[-1]
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    single, _ = verify(str(root), progress=False)
    assert single
    for i in range(3):
        verify(str(root), progress=False, task_index=i, num_tasks=3)
    problems, _ = verify_merge(str(root), 3)
    assert problems == single
    (root / "_build" / "verify" / "task-00000-of-00003.json").unlink()
    problems, _ = verify_merge(str(root), 3)
    assert any("verify task 0 of 3 left no results" in p for p in problems)


def test_parquet_batches_are_read_one_row_group_at_a_time(tmp_path):
    """``iter_batches`` of a many-row-group file reads about one row group before its first batch (the file's
    whole columns would be pre-buffered by ``ParquetFile.iter_batches``); the batches are the file's rows."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shard_tools.finalize import iter_batches

    path = tmp_path / "t.parquet"
    rng = __import__("numpy").random.default_rng(0)
    table = pa.table({"x": rng.integers(0, 2**62, 40_000), "s": [f"{v:016x}" for v in rng.integers(0, 2**62, 40_000)]})
    pq.write_table(table, path, row_group_size=4000)
    f = fsspec.filesystem("file").open(str(path), "rb")
    read = f.read
    sizes: list[int] = []

    def counting(*a, **kw):
        data = read(*a, **kw)
        sizes.append(len(data))
        return data

    f.read = counting
    batches = iter_batches(pq.ParquetFile(f), batch_size=1000)
    footer = sum(sizes)
    next(batches)
    assert sum(sizes) - footer < path.stat().st_size / 5
    rest = pa.Table.from_batches([b for b in iter_batches(pq.ParquetFile(path), batch_size=1000)])
    assert rest.equals(table)


def test_verify_and_stats_over_row_groups_that_cut_shards(tmp_path, synth_src, monkeypatch):
    """An index of many row groups, shards spanning them, read from partial indexes of many row groups: verify
    (one task and three) finds nothing and stats rewrites stats.json byte for byte."""
    import pyarrow.parquet as pq

    import shard_tools.finalize as fin
    from shard_tools import partials
    from shard_tools.verify import recompute_stats, stats_merge, verify, verify_merge

    monkeypatch.setattr(partials, "PART_ROW_GROUP", 3)
    out = tmp_path / "array"
    _array_build(out, synth_src)
    parts = list((out / partials.PARTS).glob("*.parquet"))
    assert max(pq.ParquetFile(p).num_row_groups for p in parts) > 2
    monkeypatch.setattr(fin, "ROW_GROUP", 3)
    finalize(str(out), source=str(synth_src))
    assert pq.ParquetFile(out / "index.parquet").num_row_groups > 3
    assert verify(str(out), progress=False, workers=2)[0] == []
    for i in range(3):
        verify(str(out), progress=False, workers=2, task_index=i, num_tasks=3)
    assert verify_merge(str(out), 3)[0] == []
    built = (out / "stats.json").read_bytes()
    recompute_stats(str(out), progress=False)
    assert (out / "stats.json").read_bytes() == built
    for i in range(3):
        recompute_stats(str(out), progress=False, task_index=i, num_tasks=3)
    stats_merge(str(out), 3)
    assert (out / "stats.json").read_bytes() == built


def test_plan_chip_table_written_a_row_group_at_a_time(tmp_path, synth_src, monkeypatch):
    """With row groups of 3 chips the chip table holds the same rows as with the default, cut into row groups of
    3 within each task (one task's rows each, the last of a task shorter), and every task reads the same share."""
    import pyarrow.parquet as pq

    from m3leo_stream.storage import get_fs
    from shard_tools import plan_io

    cfg = dict(shard_size=2_000_000, progress=False, num_tasks=3)
    ref = plan_build(BuildConfig(str(synth_src), str(tmp_path / "ref"), **cfg))
    monkeypatch.setattr(plan_io, "CHIP_ROW_GROUP", 3)
    cut = plan_build(BuildConfig(str(synth_src), str(tmp_path / "cut"), **cfg))
    chips = {k: pq.ParquetFile(tmp_path / k / "_build" / h["tables"]["chips"]) for k, h in (("ref", ref), ("cut", cut))}
    assert chips["cut"].read().equals(chips["ref"].read())
    groups = [chips["cut"].read_row_group(g).column("task").to_pylist() for g in range(chips["cut"].num_row_groups)]
    assert len(groups) > 2 * 3 and all(len(set(t)) == 1 and len(t) <= 3 for t in groups)
    per_task = [sum(len(t) for t in groups if t[0] == i) for i in range(3)]
    assert [len(t) for t in groups] == [n for total in per_task for n in [3] * (total // 3) + [total % 3][:total % 3]]
    for i in range(3):
        shares = [plan_io.read_share(get_fs(str(tmp_path / k))[0], str(tmp_path / k), h, i, 3)
                  for k, h in (("ref", ref), ("cut", cut))]
        assert [[s.path, [c.key for c in s.chips]] for g in shares[0] for s in g] == \
            [[s.path, [c.key for c in s.chips]] for g in shares[1] for s in g]
