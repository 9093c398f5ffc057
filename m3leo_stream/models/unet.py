"""A UNet from scratch for dense prediction (segmentation logits or regression maps).

Upstream M3LEO used a fixed 32→512 UNet with the label taken from the last batch key; here width and depth are
configurable, the inputs are named modalities (concatenated on the channel axis after resizing onto the largest
input's grid) and the output grid is chosen by the task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def stack_inputs(inputs: Mapping[str, torch.Tensor], order: Sequence[str]) -> torch.Tensor:
    """Concatenate the input modalities ``order`` on channels, resizing each onto the largest one's grid."""
    size = max(inputs[m].shape[-1] for m in order)
    xs = []
    for m in order:
        x = inputs[m]
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        xs.append(x)
    return torch.cat(xs, 1)


class UNet(nn.Module):
    """UNet: ``depth`` down-sampling stages of double 3×3 convolutions (widths ``width·2^i``), bilinear up-sampling
    with skip connections, and a 1×1 output convolution with ``out_channels`` channels.

    ``in_channels`` maps each input modality to its channel count (the order is the concatenation order).
    Inputs whose side is not divisible by ``2**depth`` are padded (reflect) and the output cropped back.
    """

    def __init__(self, in_channels: Mapping[str, int], out_channels: int, width: int = 32, depth: int = 4):
        super().__init__()
        if depth < 1:
            raise ValueError("UNet depth must be >= 1")
        self.in_channels = dict(in_channels)
        self.order = list(self.in_channels)
        self.depth = depth
        cin = sum(self.in_channels.values())
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.inc = _double_conv(cin, widths[0])
        self.down = nn.ModuleList(_double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(_double_conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = stack_inputs(inputs, self.order)
        h, w = x.shape[-2:]
        m = 2 ** self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block in self.up:
            s = skips.pop()
            y = F.interpolate(y, size=s.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, s], 1))
        return self.head(y)[..., :h, :w]
