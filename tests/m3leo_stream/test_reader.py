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
    meta = sum(batch[k].numel() * batch[k].element_size() for k in ("region", "lon", "lat", "valid"))
    assert ds.batch_nbytes(5) == arrays + meta + 5 * 13  # + the 13-character keys
    pinned = _BufferPool(keep=1)
    pinned.pinned = True  # what torch's pinned allocator takes: sizes rounded up to a power of two
    assert pinned.nbytes((3, 5), np.uint8) == 16 and pinned.nbytes((2, 8), np.float32) == 64
    assert _BufferPool(keep=1).nbytes((3, 5), np.uint8) == 15
