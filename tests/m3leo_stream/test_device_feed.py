"""Copies (and device transforms) one batch ahead of the step: the same batches and values with the feature on or off
through real Lightning fits on generated shards, the loader position with a batch held ahead, errors with their own
batch, and the prediction check of transforms run ahead. CUDA-only checks skip without CUDA."""

from __future__ import annotations

import hashlib
import shutil

import lightning.pytorch as pl
import pyarrow.parquet as pq
import pytest
import torch

from m3leo_stream.datamodule import M3LEODataModule
from m3leo_stream.device_feed import FEED_KEY, DeviceFeed, FeedCounters, Ticket, take
from m3leo_stream.reader import UnreadableSample

INPUTS, TARGETS = ["modisveg"], ["esawc"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side stream, pinned memory)")


def _dm(root, **kw) -> M3LEODataModule:
    kw = {"batch_size": 4, "num_workers": 2, "seed": 3, **kw}
    dm = M3LEODataModule(str(root), inputs=INPUTS, targets=TARGETS, **kw)
    dm.setup("fit")
    return dm


def _digest(batch) -> tuple:
    """Keys and the exact bytes of every tensor of a (transformed) batch."""
    out = [tuple(batch["key"])]
    for k in sorted(batch):
        v = batch[k]
        if isinstance(v, torch.Tensor):
            out.append((k, str(v.dtype), tuple(v.shape), hashlib.sha1(v.detach().cpu().numpy().tobytes()).hexdigest()))
    return tuple(out)


class Recorder(pl.LightningModule):
    """Records what every training and validation step sees, exactly."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_seen: list[tuple] = []
        self.val_seen: list[tuple] = []

    def training_step(self, batch, idx):
        assert FEED_KEY not in batch
        self.train_seen.append((self.global_step, _digest(batch)))
        return (self.w * batch["modisveg"].float().mean()) ** 2

    def validation_step(self, batch, idx):
        self.val_seen.append((self.global_step, _digest(batch)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, tmp_path, accelerator="cpu", trainer_kw=None, **dm_kw):
    dm = _dm(root, transforms={}, **dm_kw)  # the default transforms: random crops, flips, noise seeded by step
    model = Recorder()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
                         default_root_dir=str(tmp_path), max_epochs=1, limit_val_batches=3, num_sanity_val_steps=1,
                         val_check_interval=0.5, **(trainer_kw or {}))  # validation mid-epoch, a batch held ahead
    trainer.fit(model, datamodule=dm)
    return model, dm


def test_lightning_sees_the_same_batches_with_copies_and_transforms_ahead(uneven_shards, tmp_path):
    ref, ref_dm = _fit(uneven_shards, tmp_path / "off", copy_ahead=False)
    assert ref_dm.loader_metrics()["h2d_batches"] == 0
    held, held_dm = _fit(uneven_shards, tmp_path / "held", copy_ahead=True)
    ahead, ahead_dm = _fit(uneven_shards, tmp_path / "ahead", copy_ahead=True, transforms_ahead=True)
    assert len(ref.train_seen) == 93 // 4 and len(ref.val_seen) == 1 + 2 * 3
    assert held.train_seen == ref.train_seen and held.val_seen == ref.val_seen
    assert ahead.train_seen == ref.train_seen and ahead.val_seen == ref.val_seen
    m = ahead_dm.loader_metrics()
    # every batch but each iterator's first went through the ahead path, and each prediction held
    assert m["h2d_batches"] > len(ref.train_seen) + len(ref.val_seen)
    assert m["transforms_ahead"] == len(ref.train_seen) - 1 + 2 * 2 and m["transforms_ahead_missed"] == 0
    assert held_dm.loader_metrics()["transforms_ahead"] == 0


def test_a_wrong_prediction_is_caught_and_recomputed(uneven_shards, tmp_path, monkeypatch):
    ref, _ = _fit(uneven_shards, tmp_path / "ref", copy_ahead=False)
    real = M3LEODataModule._plan_ahead

    def off_by_one(self, train):
        plan = real(self, train)
        return None if plan is None else (plan[0], plan[1] + 1)

    monkeypatch.setattr(M3LEODataModule, "_plan_ahead", off_by_one)
    got, dm = _fit(uneven_shards, tmp_path / "wrong", copy_ahead=True, transforms_ahead=True)
    assert got.train_seen == ref.train_seen and got.val_seen == ref.val_seen
    m = dm.loader_metrics()
    assert m["transforms_ahead"] == 0 and m["transforms_ahead_missed"] > len(ref.train_seen) // 2


def test_gradient_accumulation_runs_the_transforms_in_place(uneven_shards, tmp_path):
    kw = {"accumulate_grad_batches": 2}
    ref, _ = _fit(uneven_shards, tmp_path / "ref", trainer_kw=kw, copy_ahead=False)
    got, dm = _fit(uneven_shards, tmp_path / "acc", trainer_kw=kw, copy_ahead=True, transforms_ahead=True)
    assert got.train_seen == ref.train_seen and got.val_seen == ref.val_seen
    m = dm.loader_metrics()
    assert m["transforms_ahead_missed"] == 0  # train batches were not planned ahead; validation ones were, and held
    assert 0 < m["transforms_ahead"] < len(ref.train_seen)


@pytest.mark.parametrize("mode,workers", [("thread", 2), ("process", 1), ("thread", 0)])
def test_a_batch_held_ahead_is_not_counted_as_consumed(uneven_shards, mode, workers):
    full = [b["key"] for b in _dm(uneven_shards, num_workers=0).train_dataloader()]
    loader = _dm(uneven_shards, num_workers=workers, worker_mode=mode, copy_ahead=True).train_dataloader()
    loader.batch_sampler.set_epoch(0)
    first = []
    for i, b in enumerate(loader):
        b, ticket = take(b)
        assert isinstance(ticket, Ticket)
        first.append(b["key"])
        if i == 4:
            break
    assert loader._current.held == 1  # batch 5 left the reader already
    state = loader.state_dict()
    assert state["m3leo"]["batches"] == 5
    resumed = _dm(uneven_shards, num_workers=workers, worker_mode=mode, copy_ahead=True).train_dataloader()
    resumed.batch_sampler.set_epoch(0)
    resumed.load_state_dict(state)
    assert first + [take(b)[0]["key"] for b in resumed] == full


def _keys_trained(root, path, ckpt_path=None, **trainer_kw) -> list[tuple[str, ...]]:
    model = Recorder()
    cbs = trainer_kw.pop("callbacks", [])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                         default_root_dir=str(path), enable_checkpointing=bool(cbs), callbacks=cbs, **trainer_kw)
    trainer.fit(model, datamodule=_dm(root, copy_ahead=True), ckpt_path=ckpt_path)
    return [digest[0] for _, digest in model.train_seen]


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_lightning_resume_with_copies_ahead(uneven_shards, tmp_path, where):
    full = _keys_trained(uneven_shards, tmp_path / "full", max_epochs=2)
    stop = 93 // 4 + (5 if where == "mid_epoch" else 0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=stop, save_top_k=-1,
                                        filename="mid")
    first = _keys_trained(uneven_shards, tmp_path / "a", max_steps=stop + 3, callbacks=[ckpt])
    rest = _keys_trained(uneven_shards, tmp_path / "b", ckpt_path=str(tmp_path / "ckpt" / "mid.ckpt"), max_epochs=2)
    assert first[:stop] + rest == full


def test_a_read_error_comes_with_its_own_batch(uneven_shards, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(uneven_shards, copy)
    t = pq.read_table(copy / "index.parquet").to_pydict()
    i = next(i for i, s in enumerate(t["split"]) if s == "train")
    with open(copy / t["shard"][i], "r+b") as f:
        f.seek(t["esawc_offset"][i])
        f.write(b"JUNKJUNK")
    bad = next(g for g, b in enumerate(_dm(uneven_shards, num_workers=0).train_dataloader()) if t["key"][i] in b["key"])
    got = 0
    with pytest.raises(UnreadableSample, match=t["key"][i]):
        for _ in _dm(copy, copy_ahead=True).train_dataloader():
            got += 1
    assert got == bad


def test_ticket_hands_over_only_what_was_computed_for_this_step():
    counters = FeedCounters()
    feed = DeviceFeed("cpu", counters=counters)
    batch = {"x": torch.arange(6.0), "key": ["a", "b"]}
    calls = []

    def t(b, step):
        calls.append(step)
        return {**b, "x": b["x"] * step}

    fed = feed.put(batch, ahead=(t, 3))
    plain, ticket = take(fed)
    assert FEED_KEY not in plain and plain["key"] == ["a", "b"] and torch.equal(plain["x"], batch["x"])
    assert torch.equal(ticket.result(t, 3)["x"], batch["x"] * 3) and calls == [3]
    assert ticket.result(t, 3) is None  # handed over once
    _, ticket = take(feed.put(batch, ahead=(t, 3)))
    assert ticket.result(t, 4) is None  # another step: recompute
    _, ticket = take(feed.put(batch, ahead=(t, 3)))
    assert ticket.result(lambda b, step: b, 3) is None  # other transforms (the other split): recompute
    assert (counters.ahead, counters.ahead_missed, counters.batches) == (1, 2, 3)
    assert counters.bytes == 3 * batch["x"].numel() * 4
    assert take({"x": 1}) == ({"x": 1}, None)


@cuda
def test_side_stream_copy_gives_the_same_values_and_fences_pinned_buffers(uneven_shards):
    ref = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
           for b in _dm(uneven_shards, copy_ahead=False, pin_memory=False).train_dataloader()]
    loader = _dm(uneven_shards, copy_ahead=True).train_dataloader()  # no trainer: the current CUDA device
    reader = loader.dataset.dataset
    assert reader._buffers.pinned and loader.feed.cuda
    events = []
    real = loader.feed.fence
    loader.feed.fence = lambda ts, ev: (events.append(ev), real(ts, ev))[1]
    got = []
    for b in loader:
        b, ticket = take(b)  # the current stream waits for the side stream's copy
        assert ticket.event is not None and b["esawc"].is_cuda
        got.append({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in b.items()})
    assert len(got) == len(ref) and len(events) == len(ref)
    for a, b in zip(got, ref):
        assert a["key"] == b["key"]
        for k in INPUTS + TARGETS + ["valid", "lon", "lat", "region"]:
            assert torch.equal(a[k], b[k]), k
    torch.cuda.synchronize()
    assert all(ev.query() for ev in events)
    assert reader._buffers.live() <= 2 * (loader.dataset.depth + 3 + 2)  # bounded: the pool plus copies in flight
    c = loader.feed.counters
    assert c.batches == len(ref) and c.bytes > 0 and c.enqueue_s > 0


@cuda
def test_cuda_fit_with_side_stream_matches_lightning_copy(uneven_shards, tmp_path):
    ref, _ = _fit(uneven_shards, tmp_path / "off", accelerator="cuda", copy_ahead=False)
    got, dm = _fit(uneven_shards, tmp_path / "on", accelerator="cuda")  # default: side stream on a CUDA trainer
    ahead, adm = _fit(uneven_shards, tmp_path / "ahead", accelerator="cuda", transforms_ahead=True)
    assert got.train_seen == ref.train_seen and got.val_seen == ref.val_seen
    assert ahead.train_seen == ref.train_seen and ahead.val_seen == ref.val_seen
    m = dm.loader_metrics()
    assert m["h2d_batches"] > 0 and m["h2d_bytes"] > 0
    assert dm._pinned_reads  # read straight into pinned memory
    assert adm.loader_metrics()["transforms_ahead"] > 0
