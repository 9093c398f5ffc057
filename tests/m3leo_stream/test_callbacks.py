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


def test_training_speed_reads_the_sample_count_only_when_it_logs():
    cb = TrainingSpeed(every_n_steps=50)
    cb.on_train_epoch_start(None, None)
    for n in (4, 3, 4):
        valid = torch.tensor([True] * n + [False] * (4 - n)).as_subclass(DeviceOnly)
        cb.on_train_batch_start(None, None, {"valid": valid, "key": ["k"] * 4}, 0)
    assert int(cb._samples.as_subclass(torch.Tensor)) == 11
