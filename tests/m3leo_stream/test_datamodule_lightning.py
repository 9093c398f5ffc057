"""The DataModule under a real Lightning Trainer: set_epoch, loader state in checkpoints, exact mid-epoch resume."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from m3leo_stream.datamodule import M3LEODataModule


class KeyRecorder(pl.LightningModule):
    """A one-parameter model that records the keys of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[str]]] = []

    def training_step(self, batch, idx):
        self.seen.append((self.current_epoch, list(batch["key"])))
        return (self.w * batch["modisveg"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                      default_root_dir=str(tmp_path), enable_checkpointing="callbacks" in kw, **kw)


def _dm(root) -> M3LEODataModule:
    return M3LEODataModule(str(root), inputs=["modisveg"], targets=["esawc"], batch_size=4, num_workers=1, seed=3)


def test_lightning_resume_mid_epoch_continues_the_sequence(uneven_shards, tmp_path):
    full = KeyRecorder()
    _trainer(tmp_path / "full", max_epochs=2).fit(full, datamodule=_dm(uneven_shards))
    per_epoch = len(full.seen) // 2
    assert per_epoch == 93 // 4
    # epochs differ (Lightning called set_epoch) and each has no duplicates
    e0 = [k for e, b in full.seen if e == 0 for k in b]
    e1 = [k for e, b in full.seen if e == 1 for k in b]
    assert e0 != e1 and len(set(e0)) == len(e0) and len(set(e1)) == len(e1)

    # a checkpoint written during training mid-way through the second epoch (as on a pre-emption signal); the
    # steps run after it are lost with the job
    first = KeyRecorder()
    stop = per_epoch + 5
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=stop,
                                           save_top_k=-1, filename="mid")
    t1 = _trainer(tmp_path / "a", max_steps=stop + 3, callbacks=[ckpt_cb])
    t1.fit(first, datamodule=_dm(uneven_shards))
    second = KeyRecorder()
    _trainer(tmp_path / "b", max_epochs=2).fit(second, datamodule=_dm(uneven_shards),
                                               ckpt_path=str(tmp_path / "ckpt" / "mid.ckpt"))
    assert first.seen[:stop] + second.seen == full.seen
