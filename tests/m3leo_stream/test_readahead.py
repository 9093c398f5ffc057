"""Thread-mode read-ahead on real shards: what is read ahead, that nothing is read twice, that a change of course
(another epoch than expected) still gives the planned batches, and that shard files are never closed under a read."""

from __future__ import annotations

import os

import pytest
import torch

from m3leo_stream.datamodule import M3LEODataModule
from m3leo_stream.readahead import ReadAheadDataset
from m3leo_stream.reader import _FdCache

INPUTS, TARGETS = ["modisveg"], ["esawc"]


def _loader(root, workers: int, prefetch: int = 2, with_dm: bool = False):
    dm = M3LEODataModule(str(root), inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=workers, seed=0,
                         prefetch_factor=prefetch)
    dm.setup("fit")
    return (dm.train_dataloader(), dm) if with_dm else dm.train_dataloader()


def _count_reads(loader) -> list[tuple[int, ...]]:
    """Record every batch the reader reads (on whichever thread)."""
    ahead = loader.dataset
    assert isinstance(ahead, ReadAheadDataset)
    reads: list[tuple[int, ...]] = []
    real = ahead.dataset.__getitems__

    def counted(refs):
        reads.append(tuple(int(r) for r in refs))
        return real(refs)

    ahead.dataset.__getitems__ = counted
    return reads


def test_reads_the_planned_batches_ahead_and_each_once(uneven_shards):
    loader, dm = _loader(uneven_shards, workers=2, prefetch=2, with_dm=True)
    reads = _count_reads(loader)
    plan = [list(b) for b in loader.batch_sampler]
    it = iter(loader)
    first = next(it)
    pending = loader.dataset._pending
    assert sorted(pending) == [(0, g) for g in range(1, 5)]  # depth = workers × prefetch_factor
    assert all(list(pending[(0, g)][0]) == plan[g] for g in range(1, 5))
    rest = list(it)
    reference = [b["key"] for b in _loader(uneven_shards, workers=0)]
    assert [first["key"]] + [b["key"] for b in rest] == reference
    # the last batches of the epoch read the next epoch's first ones ahead
    assert sorted(pending) and all(p[0] == 1 for p in pending)
    loader.batch_sampler.set_epoch(1)
    epoch1 = [b["key"] for b in loader]
    ref = _loader(uneven_shards, workers=0)
    ref.batch_sampler.set_epoch(1)
    assert epoch1 == [b["key"] for b in ref]
    for _, fut in list(pending.values()):
        fut.result()
    assert len(reads) == len(set(reads)) == 2 * len(plan) + len(pending)  # nothing read twice
    # only the very first batch was read on the spot; the loader metrics say so
    m = dm.loader_metrics()
    assert (m["batches_read_on_the_spot"], m["batches_read_ahead"]) == (1, 2 * len(plan) - 1)


def test_a_different_epoch_than_expected_drops_what_was_read_ahead(uneven_shards):
    loader = _loader(uneven_shards, workers=1, prefetch=3)
    list(loader)
    assert loader.dataset._pending  # epoch 1 read ahead
    loader.batch_sampler.set_epoch(5)
    got = [b["key"] for b in loader]
    ref = _loader(uneven_shards, workers=0)
    ref.batch_sampler.set_epoch(5)
    assert got == [b["key"] for b in ref]
    assert all(p[0] == 6 for p in loader.dataset._pending)


def test_eval_loaders_do_not_read_into_the_next_epoch(uneven_shards):
    dm = M3LEODataModule(str(uneven_shards), inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=2, seed=0)
    dm.setup("fit")
    loader = dm.val_dataloader()
    batches = list(loader)
    assert batches and not loader.dataset._pending
    assert torch.equal(torch.cat([b["valid"] for b in batches]).sum(), torch.tensor(len(dm.catalog("val"))))


def test_fd_cache_never_closes_a_file_being_read(tmp_path):
    paths = []
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode() * 10)
        paths.append(str(tmp_path / name))
    cache = _FdCache(keep=1)
    with cache.open(paths[0]) as fa:
        with cache.open(paths[1]) as fb:  # over the limit, but a is in use: it stays open
            assert os.pread(fa, 1, 0) == b"a" and os.pread(fb, 1, 0) == b"b"
        assert len(cache) == 2
        with cache.open(paths[2]) as fc:  # b is idle now: closed to make room, a is still in use
            assert os.pread(fc, 1, 0) == b"c" and os.pread(fa, 1, 0) == b"a"
        assert len(cache) == 2
    with pytest.raises(OSError, match="cannot open shard"):
        with cache.open(str(tmp_path / "missing")):
            pass


def _budget_dm(root, readahead_bytes, workers: int = 2, prefetch: int = 2) -> M3LEODataModule:
    dm = M3LEODataModule(str(root), inputs=INPUTS, targets=TARGETS, batch_size=4, num_workers=workers, seed=0,
                         prefetch_factor=prefetch, readahead_bytes=readahead_bytes)
    dm.setup("fit")
    return dm


def test_a_byte_budget_caps_the_batches_read_ahead(uneven_shards, caplog):
    dm = _budget_dm(uneven_shards, None)
    per = dm._dataset(dm.catalog("train")).batch_nbytes(4)
    assert per > 4 * 448 * 448  # esawc alone is 448 × 448 bytes a sample
    for budget, want in [(None, 4), (100 * per, 4), (4 * per, 4), (int(2.5 * per), 2), (per, 1), (per - 1, 1), (1, 1)]:
        dm.readahead_bytes = budget
        assert dm._read_ahead_depth(per) == want, budget
    assert _budget_dm(uneven_shards, 1, workers=0)._read_ahead_depth(per) == 0  # nothing is read ahead
    with pytest.raises(ValueError, match="readahead_bytes"):
        _budget_dm(uneven_shards, 0)

    dm = _budget_dm(uneven_shards, int(2.5 * per))
    with caplog.at_level("INFO", logger="m3leo_stream.datamodule"):
        loader = dm.train_dataloader()
    assert "train: reading 2 batches ahead" in caplog.text and "readahead_bytes = " in caplog.text
    assert loader.dataset.depth == 2 and loader.dataset.dataset.config.pooled_batches == 2 + 3
    it = iter(loader)
    next(it)
    assert sorted(loader.dataset._pending) == [(0, 1), (0, 2)]
    assert [b["key"] for b in it][-1] == [b["key"] for b in _loader(uneven_shards, workers=0)][-1]


@pytest.mark.parametrize("batches", [1, 3])
def test_live_batch_arrays_stay_within_the_budget(uneven_shards, batches):
    probe = _budget_dm(uneven_shards, None)
    per = probe._dataset(probe.catalog("train")).batch_nbytes(4)
    loader = _budget_dm(uneven_shards, batches * per + per // 2).train_dataloader()
    reader = loader.dataset.dataset
    live, pending = [], []
    for epoch in range(3):
        loader.batch_sampler.set_epoch(epoch)
        for b in loader:
            live.append(reader._buffers.live())
            pending.append(len(loader.dataset._pending))
            del b
    assert max(pending) == batches
    # per modality: the batches read ahead and the one the consumer holds (+1 of slack for one being swapped);
    # the pool keeps at most batches + 3 of them for reuse
    assert max(live) <= len(INPUTS + TARGETS) * (batches + 2), live
