"""RequeueOnSignal: a real SIGUSR1 in the middle of a step gives a checkpoint at the next optimizer-step boundary;
resuming from it trains exactly the batches an uninterrupted run trains (none twice, none skipped)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from m3leo_stream.requeue import RequeueOnSignal


class Recorder(pl.LightningModule):
    """A linear model that records the sample ids of every batch it trains on."""

    def __init__(self, signal_at_batch: int | None = None, samples: int = 16):
        super().__init__()
        self.samples = samples
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []
        self.epochs: list[int] = []
        self.signal_at_batch = signal_at_batch
        self.calls = 0

    def training_step(self, batch, batch_idx):
        if self.calls == self.signal_at_batch:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives in the middle of this step
        self.calls += 1
        self.seen.append(batch.tolist())
        self.epochs.append(self.trainer.current_epoch)
        return self.lin(batch.float()[:, None]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return StatefulDataLoader(torch.arange(self.samples), batch_size=2, shuffle=False)  # 8 batches per epoch


class SaveOnTrainEnd(pl.Callback):
    """Like a ``save_last``/final-checkpoint callback: writes the same path while fit winds down."""

    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


def _trainer(tmp_path, callbacks, max_steps, accumulate=1):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      callbacks=callbacks, accumulate_grad_batches=accumulate, default_root_dir=tmp_path)


# (micro-batch that gets the signal, accumulate_grad_batches, step of the checkpoint, batches per epoch). At an
# epoch's last batch the resume depends on the loader restoring a finished epoch as the next one's start, which this
# plain StatefulDataLoader does not do and the M3LEO loader does: tested with it in test_train.py.
CASES = [
    (5, 1, 6, 8),  # mid-epoch: after the step in progress
    (5, 2, 3, 8),  # micro-batch 5 is the middle of optimizer step 2: after that step, not between micro-batches
    (4, 2, 3, 8),  # the first micro-batch of step 3: after that step
]


@pytest.mark.parametrize("signal_at,accumulate,stop_step,batches", CASES)
def test_signal_mid_step_checkpoints_at_step_boundary_and_resumes_exactly(tmp_path, monkeypatch, signal_at,
                                                                           accumulate, stop_step, batches):
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    max_steps = 12
    full = Recorder(samples=2 * batches)
    _trainer(tmp_path / "full", [], max_steps, accumulate).fit(full)

    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    cb = RequeueOnSignal(ckpt)
    first = Recorder(signal_at_batch=signal_at, samples=2 * batches)
    # the early stop makes Lightning count the epoch as finished: a save while fit winds down must not win
    t1 = _trainer(tmp_path / "run", [cb, SaveOnTrainEnd(ckpt)], max_steps, accumulate)
    t1.fit(first)
    assert cb.requested and cb.requeue(t1)  # outside Slurm: nothing to requeue, the caller must not finish
    assert t1.global_step == stop_step
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == t1.global_step
    # the epoch the checkpoint is inside of, not yet finished
    assert state["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == (stop_step - 1) // (batches //
                                                                                                     accumulate)
    assert signal.getsignal(signal.SIGUSR1) is not cb._on_signal  # handler removed at teardown

    second = Recorder(samples=2 * batches)
    cb2 = RequeueOnSignal(ckpt)
    t2 = _trainer(tmp_path / "run", [cb2], max_steps, accumulate)
    t2.fit(second, ckpt_path=ckpt)
    assert not cb2.requested and not cb2.requeue(t2)
    assert first.seen + second.seen == full.seen
    assert first.epochs + second.epochs == full.epochs  # the resumed run is still in the same epoch
    assert len(full.seen) == max_steps * accumulate


def test_no_signal_no_checkpoint(tmp_path):
    cb = RequeueOnSignal(str(tmp_path / "last.ckpt"))
    t = _trainer(tmp_path, [cb], 4)
    t.fit(Recorder())
    assert not cb.requested and not (tmp_path / "last.ckpt").exists() and t.global_step == 4
