"""The reader's batch buffers: reused only once nothing outside the pool can reach them."""

from __future__ import annotations

import numpy as np
import torch

from m3leo_stream.datamodule import M3LEODataModule
from m3leo_stream.reader import _BufferPool

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
