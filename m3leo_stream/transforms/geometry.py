"""Geometry shared by every modality and mask of a sample: dihedral flips/rotations by exact index ops, and random
resized crops (optionally with the dihedral element folded in) as one affine resampling onto the output grid."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .params import to_device

__all__ = ["dihedral", "theta", "warp"]


def dihedral(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Apply dihedral element ``d[i]`` (0..7: bit 2 transpose, bit 0 flip W, bit 1 flip H) to sample ``i`` of
    ``x`` (B, ..., H, W) with H == W. Exact (pure indexing). ``d`` lives on the CPU."""
    d = d.to("cpu", torch.long)
    if not bool(d.any()):
        return x
    out = torch.empty_like(x)
    for k in torch.unique(d).tolist():
        idx = torch.nonzero(d == k).flatten()
        xs = x[to_device(idx, x.device)] if len(idx) < len(d) else x
        if k & 4:
            xs = xs.transpose(-1, -2)
        if k & 1:
            xs = xs.flip(-1)
        if k & 2:
            xs = xs.flip(-2)
        if len(idx) < len(d):
            out[to_device(idx, x.device)] = xs
        else:
            out.copy_(xs)
    return out


def theta(box: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 2, 3) affine maps from output to input normalised coordinates for crop boxes (x0, y0, w, h),
    optionally preceded by dihedral elements ``d`` (the same element :func:`dihedral` applies)."""
    x0, y0, w, h = box.unbind(1)
    t = torch.zeros(box.shape[0], 2, 3, dtype=torch.float64)
    t[:, 0, 0], t[:, 0, 2] = w, -1 + 2 * x0 + w
    t[:, 1, 1], t[:, 1, 2] = h, -1 + 2 * y0 + h
    if d is not None:
        # output (u, v) → flip v (bit 1) → flip u (bit 0) → swap (bit 2) → crop box
        m = torch.eye(2, dtype=torch.float64).repeat(len(d), 1, 1)
        m[:, 1, 1] = torch.where(d & 2 > 0, -1.0, 1.0)
        m[:, 0, 0] = torch.where(d & 1 > 0, -1.0, 1.0)
        swap = (d & 4) > 0
        m[swap] = m[swap].flip(1)
        t[:, :, :2] = t[:, :, :2] @ m
    return t.float()


def warp(x: torch.Tensor, theta: torch.Tensor, size: int, mode: Literal["bilinear", "nearest"]) -> torch.Tensor:
    """Resample (B, C, H, W) float ``x`` onto ``size``² through per-sample affine ``theta`` (B, 2, 3)."""
    grid = F.affine_grid(to_device(theta, x.device).to(x.dtype), [x.shape[0], x.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
