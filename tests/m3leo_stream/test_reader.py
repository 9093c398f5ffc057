"""The reader's batch buffers: reused only once nothing outside the pool can reach them. Band selection: only the
selected bands of each member are read, bit-identical to reading all and selecting, on every read path."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from m3leo_stream import reader as reader_module
from m3leo_stream import shard_format as sf
from m3leo_stream.datamodule import M3LEODataModule
from m3leo_stream.reader import (
    IO_KEY,
    IndexArrays,
    ReaderConfig,
    ShardDataset,
    UnreadableSample,
    _band_runs,
    _BufferPool,
    io_from_tensor,
)
from shard_tools.build import BuildConfig, build

INPUTS, TARGETS = ["modisveg"], ["esawc"]


def test_buffer_pool_reuses_only_unreachable_arrays():
    pool = _BufferPool(keep=4)
    a = pool.get((2, 3), np.float32)
    t = torch.from_numpy(a)
    del a
    b = pool.get((2, 3), np.float32)
    assert b.ctypes.data != t.data_ptr()  # the tensor still holds the first array
    view = t[1]
    first = t.data_ptr()
    del t
    c = pool.get((2, 3), np.float32)
    third = c.ctypes.data
    assert third not in (first, b.ctypes.data)  # a view of the first is still alive, b is held
    del view, c
    d = pool.get((2, 3), np.float32)
    assert d.ctypes.data in (first, third)  # unreachable now: handed out again
    assert d.ctypes.data != b.ctypes.data
    assert pool.get((2, 3), np.int16).dtype == np.int16 and pool.get((5,), np.float32).shape == (5,)


def _dm(root, workers: int) -> M3LEODataModule:
    dm = M3LEODataModule(str(root), inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=workers, seed=0)
    dm.setup("fit")
    return dm


def test_batches_kept_by_the_consumer_are_never_overwritten(uneven_shards):
    reference = [{k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)}
                 for b in _dm(uneven_shards, 0).train_dataloader()]
    loader = _dm(uneven_shards, 2).train_dataloader()
    for epoch in range(2):  # the second epoch reads while every batch of the first is still held
        loader.batch_sampler.set_epoch(0)
        kept = list(loader)
        assert len(kept) == len(reference)
        for got, want in zip(kept, reference):
            for k, v in want.items():
                assert torch.equal(got[k], v), k


def test_dropped_batches_lend_their_memory_to_later_ones(uneven_shards):
    loader = _dm(uneven_shards, 1).train_dataloader()
    ptrs = [b["esawc"].data_ptr() for b in loader]  # each batch dropped right after
    assert len(set(ptrs)) < len(ptrs)


# -- band selection: only the bands a run uses are read ---------------------------------------------------------
BAND_MODS = ["s1grd", "s2rgbm", "gssic"]
SELECT = {"s1grd": [0, 8, 9, 10, 11, 15], "s2rgbm": [18, 19, 20], "gssic": list(range(37))}  # three runs, one, one


def _reader(root, mods, bands=None, **cfg) -> tuple[ShardDataset, np.ndarray]:
    dm = M3LEODataModule(str(root), inputs=mods, batch_size=1, num_workers=0)
    dm.setup()
    index = dm._index
    if bands:  # with the chunk digests, as the DataModule reads them for its transforms' bands
        index = IndexArrays.from_table(dm.shard_root.read_index(), mods, dm.region_names,
                                       shard_bytes={s["path"]: s["bytes"] for s in dm.shard_root.manifest["shards"]})
    ds = ShardDataset(dm.root, None, index, [dm.modalities[m] for m in mods],
                      compressed=dm.shard_root.compressed, config=ReaderConfig(**cfg), bands=bands)
    return ds, dm.catalog("train").rows


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN nodata included)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.numpy().tobytes() == b.numpy().tobytes()


def _member_bytes(ds: ShardDataset, rows, bands) -> tuple[int, int]:
    """(bytes of the whole members, bytes of their headers + selected bands) of ``rows``, from the index; a member
    read in part is verified through the chunk digests before it, read with its header."""
    whole = part = 0
    for m in ds.modalities:
        nb = ds.index.nbytes[m.name][rows]
        whole += int(nb.sum())
        part += int((nb - m.nbytes).sum()) + len(rows) * len(bands[m.name]) * (m.nbytes // len(m.bands))
        if m.name in ds.index.checksums and len(bands[m.name]) < len(m.bands):
            part += len(rows) * -sf.chunk_digests_range(0, len(m.bands))[0]
    return whole, part


def test_band_runs_and_selection_checks(small_shards):
    assert _band_runs([0, 8, 9, 10, 11, 15]) == [(0, 1, 0), (8, 12, 1), (15, 16, 5)]
    assert _band_runs([3]) == [(3, 4, 0)]
    with pytest.raises(ValueError, match="band selection of 'gssic'"):
        _reader(small_shards, ["gssic"], {"gssic": [38]})
    with pytest.raises(ValueError, match="band selection of 'gssic'"):
        _reader(small_shards, ["gssic"], {"gssic": []})
    with pytest.raises(ValueError, match=r"modalities \['s1grd'\] that are not read"):
        _reader(small_shards, ["gssic"], {"s1grd": [0]})
    ds, _ = _reader(small_shards, ["gssic"], {"gssic": [5, 1, 5]})
    assert ds.bands == {"gssic": (1, 5)}  # sorted, once each


@pytest.mark.parametrize("path", ["inline", "pool", "pread"])
def test_selected_bands_equal_all_bands_then_selected(small_shards, monkeypatch, path):
    """Local shards, each way the reader reads them: preadv scatter on the calling thread or on the pool, and the
    pread + decode fallback. Values are bit-identical to reading everything and selecting; the bytes read are
    exactly the members' headers plus the selected bands."""
    if path == "pread":
        monkeypatch.setattr(ShardDataset, "_fetch_into", lambda self, req, st, c, out: self._fetch(req, st, c, out))
    cfg = {"inline_local": path == "inline", "coalesce_gap": 0}  # no gap bytes: the count is exact
    full, rows = _reader(small_shards, BAND_MODS, **cfg)
    sel, _ = _reader(small_shards, BAND_MODS, SELECT, **cfg)
    refs = rows[:6]
    a, b = full.__getitems__(refs), sel.__getitems__(refs)
    assert a["key"] == b["key"]
    for name in BAND_MODS:
        m = full.modalities[BAND_MODS.index(name)]
        assert a[name].shape == (6, *m.shape) and b[name].shape == (6, len(SELECT[name]), *m.shape[1:])
        assert _equal(a[name][:, SELECT[name]], b[name]), name
        assert a["bands"][name] == list(m.bands)
        assert b["bands"][name] == [m.bands[i] for i in SELECT[name]]
    whole, part = _member_bytes(full, refs, SELECT)
    got_full, got_sel = io_from_tensor(a[IO_KEY])[0], io_from_tensor(b[IO_KEY])[0]
    assert got_full.bytes == whole and got_sel.bytes == part
    assert part < 0.3 * whole
    one = sel[int(refs[0])]  # a single sample: no batch dimension, the band names as they are
    assert one["bands"] == b["bands"] and _equal(one["s1grd"], b["s1grd"][0])


def test_many_band_runs_in_one_request_are_read_in_iov_chunks(small_shards, monkeypatch):
    """Every other band of every member of 4 samples, merged into one request per shard: more buffers than one
    preadv takes (IOV_MAX, made tiny here; the kernel refuses more with EINVAL) are read in several calls."""
    monkeypatch.setattr(reader_module, "_IOV_MAX", 5)
    preadv, calls = os.preadv, []

    def kernel_like(fd, buffers, offset):
        calls.append(len(buffers))
        if len(buffers) > 5:
            raise OSError(errno.EINVAL, "Invalid argument")
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", kernel_like)
    every_other = {"s1grd": list(range(0, 16, 2)), "gssic": list(range(1, 38, 2))}
    full, rows = _reader(small_shards, ["s1grd", "gssic"], inline_local=True, coalesce_gap=1 << 30,
                         max_request=1 << 30)
    sel, _ = _reader(small_shards, ["s1grd", "gssic"], every_other, inline_local=True, coalesce_gap=1 << 30,
                     max_request=1 << 30)
    refs = rows[:4]
    a, b = full.__getitems__(refs), sel.__getitems__(refs)
    for name, idx in every_other.items():
        assert _equal(a[name][:, idx], b[name]), name
    assert len(calls) > 10 and max(calls) <= 5
    assert io_from_tensor(b[IO_KEY])[0].requests == len(set(full.index.shard[refs].tolist()))


@pytest.fixture(scope="module")
def zstd_shards(tmp_path_factory, synth_src) -> Path:
    out = tmp_path_factory.mktemp("zstd") / "root"
    build(BuildConfig(str(synth_src), str(out), modalities=["s1grd", "gssic"], compress="zstd",
                      shard_size=40_000_000, workers=1, progress=False))
    return out


@pytest.mark.parametrize("inline", [True, False])
def test_compressed_members_are_read_whole_and_the_bands_copied(zstd_shards, inline):
    """A zstd member cannot be read in part: it is read whole and decoded, and only its selected bands land in
    the batch (bytes read are those of the whole members)."""
    bands = {"s1grd": SELECT["s1grd"], "gssic": SELECT["gssic"]}
    full, rows = _reader(zstd_shards, ["s1grd", "gssic"], inline_local=inline, coalesce_gap=0)
    sel, _ = _reader(zstd_shards, ["s1grd", "gssic"], bands, inline_local=inline, coalesce_gap=0)
    assert sel.compressed
    refs = rows[:5]
    a, b = full.__getitems__(refs), sel.__getitems__(refs)
    for name, idx in bands.items():
        assert _equal(a[name][:, idx], b[name]), name
        assert b["bands"][name] == [sel.modalities[0 if name == "s1grd" else 1].bands[i] for i in idx]
    assert io_from_tensor(b[IO_KEY])[0].bytes == io_from_tensor(a[IO_KEY])[0].bytes == _member_bytes(
        full, refs, bands)[0]


@pytest.mark.parametrize("path", ["inline", "pread"])
def test_a_wrong_header_is_named_when_only_some_bands_are_read(uneven_shards, tmp_path, monkeypatch, path):
    """The header is fetched on its own and still checked: a member whose header says another shape fails,
    naming shard, key and member, though its selected band bytes read fine."""
    if path == "pread":
        monkeypatch.setattr(ShardDataset, "_fetch_into", lambda self, req, st, c, out: self._fetch(req, st, c, out))
    root = tmp_path / "bad-header"
    shutil.copytree(uneven_shards, root)
    t = pq.read_table(root / "index.parquet").to_pydict()
    i = next(i for i, s in enumerate(t["split"]) if s == "train")
    shard, key, off = t["shard"][i], t["key"][i], t["biomass_offset"][i]
    with open(root / shard, "r+b") as f:
        f.seek(off)
        head = f.read(128)
        assert b"(2, 45, 45)" in head
        f.seek(off)
        f.write(head.replace(b"(2, 45, 45)", b"(2, 45, 46)"))
    ds, rows = _reader(root, ["biomass"], {"biomass": [1]}, inline_local=True, coalesce_gap=0)
    row = t["key"].index(key)
    assert row in rows
    with pytest.raises(UnreadableSample) as err:
        ds.__getitems__([row])
    msg = str(err.value)
    assert shard in msg and key in msg and "biomass" in msg and "(2, 45, 46)" in msg
    good = next(r for r in rows if r != row)
    assert ds.__getitems__([good])["biomass"].shape == (1, 1, 45, 45)


class FakeEvent:
    """Stands in for the CUDA event recorded after an asynchronous copy (none here): ``query()`` says whether the
    copy has completed."""

    def __init__(self):
        self.done = False
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.done


def test_a_fenced_buffer_is_not_handed_out_before_its_copy_completes():
    pool = _BufferPool(keep=4)
    t = torch.from_numpy(pool.get((2, 3), np.float32))
    first = t.data_ptr()
    ev = FakeEvent()
    assert pool.fence(first, ev)
    assert not pool.fence(12345, FakeEvent())  # not an array of this pool
    del t  # the consumer is done with it, the copy is not
    held = [pool.get((2, 3), np.float32) for _ in range(3)]
    assert first not in [a.ctypes.data for a in held] and ev.queries >= 3
    del held
    ev.done = True
    assert pool.get((2, 3), np.float32).ctypes.data == first  # the copy has completed: reused


def test_an_unpooled_fenced_buffer_outlives_its_consumer_until_the_copy_completes():
    import weakref

    pool = _BufferPool(keep=0)  # nothing pooled: every batch array is fresh and freed when unreferenced
    a = pool.get((4,), np.int16)
    ref = weakref.ref(a)
    ev = FakeEvent()
    pool.fence(a.ctypes.data, ev)
    del a
    pool.get((4,), np.int16)
    assert ref() is not None  # still being read by the copy: not freed
    ev.done = True
    pool.get((4,), np.int16)
    assert ref() is None


def test_dataset_fence_holds_the_arrays_of_a_real_batch(uneven_shards):
    loader = _dm(uneven_shards, 0).train_dataloader()
    ds = loader.dataset
    it = iter(loader)
    batch = next(it)
    ptrs = {batch[k].data_ptr() for k in INPUTS + TARGETS}
    ev = FakeEvent()
    ds.fence(batch.values(), ev)  # non-tensor values (keys) are skipped
    del batch
    for _ in range(3):
        b = next(it)
        assert not ptrs & {b[k].data_ptr() for k in INPUTS + TARGETS}
        del b
    ev.done = True
    reused = set()
    for _ in range(3):
        b = next(it)
        reused |= {b[k].data_ptr() for k in INPUTS + TARGETS}
        del b
    assert ptrs <= reused


def test_batch_nbytes_is_what_a_batch_allocates(uneven_shards):
    ds = _dm(uneven_shards, 0).train_dataloader().dataset
    batch = ds.__getitems__(list(range(5)))
    arrays = sum(batch[k].numel() * batch[k].element_size() for k in INPUTS + TARGETS)
    meta = sum(batch[k].numel() * batch[k].element_size()
               for k in ("region", "lon", "lat", "valid", *(f"{m}_present" for m in INPUTS + TARGETS)))
    assert ds.batch_nbytes(5) == arrays + meta + 5 * 13  # + the 13-character keys
    pinned = _BufferPool(keep=1)
    pinned.pinned = True  # what torch's pinned allocator takes: sizes rounded up to a power of two
    assert pinned.nbytes((3, 5), np.uint8) == 16 and pinned.nbytes((2, 8), np.float32) == 64
    assert _BufferPool(keep=1).nbytes((3, 5), np.uint8) == 15


@pytest.mark.parametrize("claim", [1_500_000_000, 10 ** 12])
def test_an_absurd_member_size_in_the_index_is_refused_before_any_allocation(uneven_shards, tmp_path, claim):
    """A corrupt ``nbytes`` (1.5 GB, 1 TB for a member of a few kB) is refused naming shard, key and member, without
    allocating it (the peak of traced allocations stays small); under ``substitute`` a same-region sample takes
    its place."""
    import tracemalloc

    import pyarrow as pa

    root = tmp_path / "absurd"
    shutil.copytree(uneven_shards, root)
    t = pq.read_table(root / "index.parquet")
    split = t.column("split").to_pylist()
    i = split.index("train")
    nb = t.column("biomass_nbytes").to_pylist()
    nb[i] = claim
    t = t.set_column(t.schema.get_field_index("biomass_nbytes"), "biomass_nbytes", pa.array(nb, pa.int64()))
    pq.write_table(t, root / "index.parquet")
    key, shard = t.column("key")[i].as_py(), t.column("shard")[i].as_py()
    ds, rows = _reader(root, ["biomass"])
    row = list(ds.index.key).index(key.encode())
    tracemalloc.start()
    try:
        with pytest.raises(UnreadableSample) as err:
            ds.__getitems__([row])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000  # nothing near the claim
    msg = str(err.value)
    # 32-bit sizes in the index arrays: a claim past 2**31 is held as 2**31 - 1, still far more than the array
    assert shard in msg and key in msg and "biomass" in msg and str(min(claim, 2**31 - 1)) in msg
    assert "corrupt index" in msg
    sub, _ = _reader(root, ["biomass"], on_unreadable="substitute")
    sub.substitutes = {int(sub.index.region[row]): np.asarray([r for r in rows if r != row])}
    batch = sub.__getitems__([row])
    assert batch["key"] != [key] and io_from_tensor(batch[IO_KEY])[0].substitutions == 1


# -- checksums: altered bytes never reach a batch --------------------------------------------------------------

def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))


def _train_rows(root: Path, n: int, column: str = "biomass_offset") -> list[dict]:
    t = pq.read_table(root / "index.parquet").to_pylist()
    return [r for r in t if r["split"] == "train" and r[column] is not None][:n]


@pytest.mark.parametrize("path,bands", [("inline", None), ("pool", None), ("pread", None),
                                        ("inline", {"biomass": [1]}), ("pread", {"biomass": [1]})])
def test_a_flipped_payload_byte_is_named_and_substituted(uneven_shards, tmp_path, monkeypatch, path, bands):
    """One byte flipped inside a member's pixels (in the band a selective read fetches): the read fails naming
    shard, key and member; under ``substitute`` another sample of the region takes the slot with its own, intact
    bytes, and the mismatch is counted."""
    if path == "pread":
        monkeypatch.setattr(ShardDataset, "_fetch_into", lambda self, req, st, c, out: self._fetch(req, st, c, out))
    root = tmp_path / "flipped"
    shutil.copytree(uneven_shards, root)
    r = _train_rows(root, 1)[0]
    clean, _ = _reader(uneven_shards, ["biomass"], bands)
    m = clean.modalities[0]
    header = r["biomass_nbytes"] - m.nbytes
    _flip(root / r["shard"], r["biomass_offset"] + header + m.nbytes // 2 + 77)  # band 1 (agb_se) of 2
    cfg = {"inline_local": path == "inline", "coalesce_gap": 0}
    ds, rows = _reader(root, ["biomass"], bands, **cfg)
    row = list(ds.index.key).index(r["key"].encode())
    with pytest.raises(UnreadableSample) as err:
        ds.__getitems__([row])
    msg = str(err.value)
    assert r["shard"] in msg and r["key"] in msg and "biomass" in msg and "checksum mismatch" in msg
    assert "read twice" in msg and ("band agb_se" in msg if bands else "its bytes" in msg)
    sub, _ = _reader(root, ["biomass"], bands, on_unreadable="substitute", **cfg)
    sub.substitutes = {int(sub.index.region[row]): np.asarray([x for x in rows if x != row])}
    batch = sub.__getitems__([row])
    io = io_from_tensor(batch[IO_KEY])[0]
    assert batch["key"] != [r["key"]] and io.substitutions == 1 and io.checksum_failures == 1
    other = list(clean.index.key).index(batch["key"][0].encode())
    assert _equal(batch["biomass"], clean.__getitems__([other])["biomass"])


def test_a_flipped_byte_in_a_compressed_member_is_caught_before_decoding(zstd_shards, tmp_path):
    root = tmp_path / "flipped-zstd"
    shutil.copytree(zstd_shards, root)
    r = _train_rows(root, 1, "gssic_offset")[0]
    _flip(root / r["shard"], r["gssic_offset"] + r["gssic_nbytes"] // 2)
    ds, _ = _reader(root, ["gssic"], {"gssic": [1, 5]})
    with pytest.raises(UnreadableSample, match=rf"{r['shard']} key {r['key']} member gssic: checksum mismatch"):
        ds.__getitems__([list(ds.index.key).index(r["key"].encode())])


def test_swapped_index_rows_are_caught_and_pass_unverified(uneven_shards, tmp_path):
    """Two index rows whose biomass ranges are swapped (same shard, same sizes): verified, each read fails naming
    its key; with verification off each sample silently gets the other's pixels (what the digests prevent)."""
    import pyarrow as pa

    root = tmp_path / "swapped"
    shutil.copytree(uneven_shards, root)
    t = pq.read_table(root / "index.parquet")
    d = t.to_pydict()
    a = next(i for i, s in enumerate(d["split"]) if s == "train")
    b = next(i for i in range(a + 1, len(d["key"])) if d["shard"][i] == d["shard"][a] and d["split"][i] == "train")
    off = d["biomass_offset"]
    off[a], off[b] = off[b], off[a]
    t = t.set_column(t.schema.get_field_index("biomass_offset"), "biomass_offset", pa.array(off, pa.int64()))
    pq.write_table(t, root / "index.parquet")
    ds, _ = _reader(root, ["biomass"])
    rows = [list(ds.index.key).index(d["key"][i].encode()) for i in (a, b)]
    for i, row in zip((a, b), rows):
        with pytest.raises(UnreadableSample, match=f"key {d['key'][i]} member biomass: checksum mismatch"):
            ds.__getitems__([row])
    clean, _ = _reader(uneven_shards, ["biomass"])
    unverified, _ = _reader(root, ["biomass"], verify=False)
    got = unverified.__getitems__(rows)["biomass"]
    assert _equal(got, clean.__getitems__(rows[::-1])["biomass"])


def test_a_range_past_the_shards_end_is_refused_from_the_manifest(uneven_shards, tmp_path):
    import pyarrow as pa

    root = tmp_path / "past-end"
    shutil.copytree(uneven_shards, root)
    t = pq.read_table(root / "index.parquet")
    d = t.to_pydict()
    i = next(i for i, s in enumerate(d["split"]) if s == "train")
    off = d["biomass_offset"]
    off[i] = os.path.getsize(root / d["shard"][i]) - 100
    t = t.set_column(t.schema.get_field_index("biomass_offset"), "biomass_offset", pa.array(off, pa.int64()))
    pq.write_table(t, root / "index.parquet")
    ds, _ = _reader(root, ["biomass"])
    with pytest.raises(UnreadableSample, match=rf"key {d['key'][i]} member biomass: the index says it ends at byte "
                                               rf"\d+, the shard has \d+ \(manifest\)"):
        ds.__getitems__([list(ds.index.key).index(d["key"][i].encode())])
