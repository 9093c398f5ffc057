"""Training callbacks: nothing they do per step waits for the device."""

from __future__ import annotations

import torch

from m3leo_stream.callbacks import TrainingSpeed


class DeviceOnly(torch.Tensor):
    """A tensor that refuses to be read on the host, as reading a CUDA tensor would wait for the device."""

    def __int__(self):
        raise AssertionError("host read of a device tensor")

    __float__ = __bool__ = __index__ = __int__

    def item(self):
        raise AssertionError("host read of a device tensor")

    def tolist(self):
        raise AssertionError("host read of a device tensor")


def test_training_speed_counts_samples_without_reading_the_device():
    """Training batches are never padded: the rows are counted from the host-side key list."""
    cb = TrainingSpeed(every_n_steps=50)
    cb.on_train_epoch_start(None, None)
    for n in (4, 3, 4):
        valid = torch.ones(n, dtype=torch.bool).as_subclass(DeviceOnly)
        cb.on_train_batch_start(None, None, {"valid": valid, "key": ["k"] * n}, 0)
    assert cb._samples == 11
    cb.on_train_batch_start(None, None, {"valid": torch.ones(2, dtype=torch.bool).as_subclass(DeviceOnly)}, 0)
    assert cb._samples == 13


def test_intervals_are_cut_to_the_run_length_only_when_it_is_short():
    from m3leo_stream.callbacks import interval_for_run

    assert interval_for_run(50, 100, 20) == 5
    assert interval_for_run(50, 10_000, 20) == 50
    assert interval_for_run(500, 7, 2) == 3
    assert interval_for_run(50, 3, 20) == 1
    assert interval_for_run(50, float("inf"), 20) == 50
