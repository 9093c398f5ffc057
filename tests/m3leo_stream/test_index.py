"""The node-local index: converted once per node, mapped by every rank, equal to the index it came from."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m3leo_stream import shard_format as sf
from m3leo_stream.index import IndexArrays, index_columns, load_index, open_index
from m3leo_stream.shard_root import ShardRoot

MODS = ["modisveg", "biomass", "esawc"]
RANK = """
import json, sys
from m3leo_stream.index import load_index
from m3leo_stream.shard_root import ShardRoot
ix = load_index(ShardRoot(sys.argv[1]), {mods!r}, checksums=True, cache_dir=sys.argv[2])
print(json.dumps({{"source": ix.source, "n": len(ix), "keys": ix.key[:3].tobytes().hex()}}))
"""


def _equal(a: IndexArrays, b: IndexArrays) -> None:
    for name in ("key", "region", "lon", "lat", "shard", "split"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.shard_names == b.shard_names and np.array_equal(a.shard_bytes, b.shard_bytes)
    for field in ("offsets", "nbytes", "checksums"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.keys() == y.keys() and all(np.array_equal(x[m], y[m]) for m in x), field


def test_the_mapped_index_equals_the_parquet_index(uneven_shards, tmp_path):
    root = ShardRoot(str(uneven_shards))
    ix = load_index(root, MODS, checksums=True, cache_dir=str(tmp_path))
    assert ix.source and Path(ix.source).parent == tmp_path / "index"
    assert isinstance(ix.key, np.memmap) and ix.offsets["biomass"].dtype == np.int32 and ix.region.dtype == np.int8
    table = root.read_index(columns=index_columns(MODS, True, ()))
    _equal(ix, IndexArrays.from_table(table, MODS, root.regions,
                                      shard_bytes={s["path"]: s["bytes"] for s in root.manifest["shards"]}))
    assert [k.decode() for k in ix.key] == table.column("key").to_pylist()
    splits = table.column("split").to_pylist()
    assert [ix.split_names[c] for c in ix.split] == splits
    clone = pickle.loads(pickle.dumps(ix))  # a worker process maps the same files
    assert len(pickle.dumps(ix)) < 1000 and clone.source == ix.source
    _equal(clone, ix)


def test_ranks_of_a_node_build_once_and_map_the_same_files(uneven_shards, tmp_path):
    """Four processes start at once on one cache_dir: one directory is published, all map it, nothing is left
    half-written."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    code = RANK.format(mods=MODS)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(uneven_shards), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({o for o in outs}) == 1
    assert [p.name for p in (tmp_path / "index").iterdir() if p.is_dir()] == [Path(eval(outs[0])["source"]).name]


def test_a_published_index_is_reused_and_a_killed_build_is_cleaned_up(uneven_shards, tmp_path, monkeypatch):
    root = ShardRoot(str(uneven_shards))
    first = load_index(root, MODS, checksums=True, cache_dir=str(tmp_path))
    final = Path(first.source)
    half = final.with_name(final.name + ".tmp-dead0000")  # what a rank killed mid-build leaves
    half.mkdir()
    (half / "key.npy").write_bytes(b"partial")
    import m3leo_stream.index as index_module

    monkeypatch.setattr(index_module, "_build", lambda *a: pytest.fail("rebuilt a published index"))
    again = load_index(ShardRoot(str(uneven_shards)), MODS, checksums=True, cache_dir=str(tmp_path))
    assert again.source == first.source
    monkeypatch.undo()
    shutil.rmtree(final)  # as if the job was requeued before the build finished
    rebuilt = load_index(ShardRoot(str(uneven_shards)), MODS, checksums=True, cache_dir=str(tmp_path))
    assert rebuilt.source == first.source and not half.exists()
    _equal(rebuilt, first)


def test_a_changed_index_gets_a_new_conversion(uneven_shards, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(uneven_shards, copy)
    a = load_index(ShardRoot(str(copy)), MODS, checksums=True, cache_dir=str(tmp_path / "c"))
    t = pq.read_table(copy / sf.INDEX)
    nb = t.column("esawc_nbytes").to_pylist()
    nb[0] += 1
    t = t.set_column(t.schema.get_field_index("esawc_nbytes"), "esawc_nbytes", pa.array(nb, pa.int64()))
    pq.write_table(t, copy / sf.INDEX, row_group_size=7)
    b = load_index(ShardRoot(str(copy)), MODS, checksums=True, cache_dir=str(tmp_path / "c"))
    assert a.source != b.source and b.nbytes["esawc"][0] == a.nbytes["esawc"][0] + 1


def test_keys_of_any_width_and_an_unwritable_cache_dir(uneven_shards, tmp_path, caplog, monkeypatch):
    """Row groups converted on three threads, keys longer after the first row group laid out at their full width
    (not cut): the arrays equal those converted in memory, where the cache directory cannot be written (with a
    warning)."""
    import m3leo_stream.index as index

    monkeypatch.setattr(index, "conversion_threads", lambda: 3)
    copy = tmp_path / "root"
    shutil.copytree(uneven_shards, copy)
    t = pq.read_table(copy / sf.INDEX)
    keys = t.column("key").to_pylist()
    keys[-1] = keys[-1] + "-longer"
    t = t.set_column(t.schema.get_field_index("key"), "key", pa.array(keys))
    pq.write_table(t, copy / sf.INDEX, row_group_size=16)
    ix = load_index(ShardRoot(str(copy)), MODS, checksums=True, cache_dir=str(tmp_path / "c"))
    assert [k.decode() for k in ix.key] == keys
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    with caplog.at_level("WARNING"):
        mem = load_index(ShardRoot(str(copy)), MODS, checksums=True, cache_dir=str(blocked))
    assert mem.source is None and "holding it in memory" in caplog.text
    _equal(mem, ix)


def test_open_index_refuses_files_of_another_length(uneven_shards, tmp_path):
    ix = load_index(ShardRoot(str(uneven_shards)), MODS, checksums=True, cache_dir=str(tmp_path))
    np.save(Path(ix.source) / "lon.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"\['lon'\] do not hold"):
        open_index(ix.source)


PLANNING_RANK = """
import json, sys
from m3leo_stream.datamodule import M3LEODataModule
dm = M3LEODataModule(sys.argv[1], inputs=["modisveg"], targets=["esawc"], batch_size=2, seed=0, cache_dir=sys.argv[2])
dm.setup("fit")
sampler = dm.train_dataloader().batch_sampler
plans = [sampler.plan_for(e).refs for e in range(3)]
print(json.dumps({"mapped": [type(p).__name__ for p in plans], "refs": [p.tolist() for p in plans],
                  "rows": dm.catalog("train").rows.tolist()}))
"""


def test_ranks_of_a_node_share_one_catalogue_and_one_plan_per_epoch(uneven_shards, tmp_path):
    """The catalogue and each epoch's plan are computed by one process and mapped by the others; the plans of epochs
    before the previous one are removed as a new one is made; the mapped plan equals the planner's."""
    from m3leo_stream.datamodule import M3LEODataModule
    from m3leo_stream.planner import plan_train_epoch

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", PLANNING_RANK, str(uneven_shards), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    results = [eval(o.replace("true", "True").replace("false", "False")) for o in outs]
    assert all(r == results[0] for r in results) and results[0]["mapped"] == ["memmap"] * 3
    derived = next((tmp_path / "index").glob("*/derived"))
    here = M3LEODataModule(str(uneven_shards), inputs=["modisveg"], targets=["esawc"], batch_size=2, seed=0,
                           cache_dir=str(tmp_path))
    here.setup("fit")
    sampler = here.train_dataloader().batch_sampler
    assert sampler.plan_for(5).refs.tolist() == plan_train_epoch(here.catalog("train"), seed=0, epoch=5,
                                                                 global_batch=2).refs.tolist()
    sampler._ahead[1].result()  # epoch 6, planned ahead, removed the plans of epochs before 5
    names = sorted(p.name for p in derived.iterdir() if p.is_dir())
    assert len([n for n in names if n.startswith("catalog-")]) == 1
    assert sorted(n.rsplit("-e", 1)[1] for n in names if n.startswith("plan-")) == ["5", "6"], names
    dm = M3LEODataModule(str(uneven_shards), inputs=["modisveg"], targets=["esawc"], batch_size=2, seed=0,
                         cache_dir=str(tmp_path / "elsewhere"))
    dm.setup("fit")
    cat = dm.catalog("train")
    assert cat.rows.tolist() == results[0]["rows"]
    for e in range(3):
        assert plan_train_epoch(cat, seed=0, epoch=e, global_batch=2).refs.tolist() == results[0]["refs"][e]


def test_coded_columns_read_as_dictionaries_give_the_codes_of_their_strings():
    """region, split and shard are read as parquet's dictionaries and looked up once per distinct value: the codes
    equal those of the plain strings; an unknown value fails where it must (a shard, a region) and is -1 where it
    may (a split), and nulls are -1."""
    from m3leo_stream.index import _codes

    names = {"a": 0, "b": 1, "c": 2}
    values = pa.array(["b", "c", None, "a", "zz", "b"])
    for unknown_ok in (True, False):
        for col in (values, values.dictionary_encode(), pa.chunked_array([values[:2].dictionary_encode(),
                                                                         values[2:].dictionary_encode()])):
            if unknown_ok:
                assert _codes(col, names, "x", unknown_ok=True).tolist() == [1, 2, -1, 0, -1, 1]
            else:
                with pytest.raises(ValueError, match="name x"):
                    _codes(col, names, "x")
    ok = pa.array(["c", "a", "a"]).dictionary_encode()
    assert _codes(ok, names, "x").tolist() == [2, 0, 0]


def test_an_index_row_of_a_shard_the_manifest_does_not_list_is_refused(uneven_shards, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(uneven_shards, copy)
    t = pq.read_table(copy / sf.INDEX)
    shards = t.column("shard").to_pylist()
    shards[-1] = "not/a/listed.tar"
    t = t.set_column(t.schema.get_field_index("shard"), "shard", pa.array(shards))
    pq.write_table(t, copy / sf.INDEX, row_group_size=16)
    with pytest.raises(ValueError, match=r"not/a/listed\.tar"):
        load_index(ShardRoot(str(copy)), MODS, checksums=True, cache_dir=str(tmp_path / "c"))
