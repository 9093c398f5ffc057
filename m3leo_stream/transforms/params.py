"""Random augmentation parameters, drawn per batch on the host.

Every draw comes from a ``torch.Generator`` seeded by a hash of (seed, rank, step, stream) and drawn on the CPU, so
CPU and CUDA runs agree and a resumed run replays a step's parameters. One function per augmentation, called in a
fixed order by :func:`sample_params` (the order is part of the replay: a new draw goes after the existing ones).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch

from .bands import InputPlan

__all__ = ["make_generator", "sample_params", "seed_of", "to_device"]


def seed_of(*parts: Any) -> int:
    """A 63-bit seed from a hash of ``parts`` (seed, rank, step, stream, ...): reproducible and independent."""
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_generator(seed: int, rank: int, step: int, stream: str = "params",
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, rank, step, stream): reproducible, different across ranks."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_of(seed, rank, step, stream))
    return g


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (augmentation parameters, indices) on ``device`` without stalling the host: to a CUDA
    device through pinned memory and ``non_blocking`` (a plain ``.to`` from pageable memory waits until the stream
    has run everything queued before it, i.e. the previous training step)."""
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def draw_dihedral(aug: Mapping[str, Any], g: torch.Generator, b: int) -> dict[str, Any]:
    """``dihedral``: (B,) element 0..7 per sample (see :func:`.geometry.dihedral`); 0 when off."""
    if aug.get("dihedral"):
        return {"dihedral": torch.randint(0, 8, (b,), generator=g)}
    return {"dihedral": torch.zeros(b, dtype=torch.long)}


def draw_resized_crop(aug: Mapping[str, Any], g: torch.Generator, b: int) -> dict[str, Any]:
    """``resized_crop``: (B,) bool ``crop`` and (B, 4) float64 ``box`` (x0, y0, w, h) in [0, 1]; the whole chip
    for samples not cropped."""
    rc = aug.get("resized_crop") or {}
    crop = torch.rand(b, generator=g) < float(rc.get("p", 0.0))
    s_lo, s_hi = rc.get("scale", [1.0, 1.0])
    r_lo, r_hi = rc.get("ratio", [1.0, 1.0])
    area = s_lo + (s_hi - s_lo) * torch.rand(b, generator=g, dtype=torch.float64)
    logr = math.log(r_lo) + (math.log(r_hi) - math.log(r_lo)) * torch.rand(b, generator=g, dtype=torch.float64)
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    x0 = (1 - w) * torch.rand(b, generator=g, dtype=torch.float64)
    y0 = (1 - h) * torch.rand(b, generator=g, dtype=torch.float64)
    box = torch.stack([x0, y0, w, h], 1)
    box[~crop] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    return {"crop": crop, "box": box}


def draw_noise(aug: Mapping[str, Any], g: torch.Generator, b: int,
               inputs: Mapping[str, InputPlan]) -> dict[str, Any]:
    """``noise``: (B,) bool ``noisy``, per input (B, C') ``noise_std`` (0 for samples not noisy), and
    ``noise_any``. The noise fields themselves are drawn on the device by the pipeline."""
    nz = aug.get("noise") or {}
    noisy = torch.rand(b, generator=g) < float(nz.get("p", 0.0))
    std = {}
    for name, plan in inputs.items():
        sd = float(nz.get("std", 0.0)) * plan.noise * torch.rand(b, len(plan.channels), generator=g)
        std[name] = sd * noisy[:, None]
    return {"noise_std": std, "noisy": noisy, "noise_any": bool(noisy.any()) and float(nz.get("std", 0.0)) > 0}


def draw_modality_dropout(aug: Mapping[str, Any], g: torch.Generator, b: int, names: list[str]) -> dict[str, Any]:
    """``modality_dropout``: per input (B,) bool ``drop``; every sample keeps at least one input. ``p`` is one rate
    or {input: rate} (inputs not named are not dropped)."""
    md = (aug.get("modality_dropout") or {}).get("p", 0.0)
    if isinstance(md, Mapping):
        unknown = sorted(set(md) - set(names))
        if unknown:
            raise KeyError(f"transforms: modality_dropout.p names {unknown}, which are not inputs ({names})")
        rates = torch.tensor([float(md.get(n, 0.0)) for n in names])
    else:
        rates = torch.full((len(names),), float(md))
    drop = torch.rand(b, len(names), generator=g) < rates
    if names:
        keep = torch.randint(0, len(names), (b,), generator=g)
        all_dropped = drop.all(1)
        drop[all_dropped, keep[all_dropped]] = False
    return {"drop": {n: drop[:, i] for i, n in enumerate(names)}}


def sample_params(aug: Mapping[str, Any], g: torch.Generator, batch_size: int,
                  inputs: Mapping[str, InputPlan]) -> dict[str, Any]:
    """The per-sample parameters of one batch (all on the CPU) for the ``train``/``eval`` augmentation config
    ``aug``, drawn from ``g`` in a fixed order."""
    b = batch_size
    return {**draw_dihedral(aug, g, b), **draw_resized_crop(aug, g, b), **draw_noise(aug, g, b, inputs),
            **draw_modality_dropout(aug, g, b, list(inputs))}


def dropout_on_device(drop: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor],
                      dev: torch.device) -> dict[str, torch.Tensor]:
    """The modality-dropout draw on the device; a sample whose present inputs would all be dropped keeps them
    all (the draw cannot see which members a sample lacks without reading the device)."""
    names = list(drop)
    out = {n: to_device(drop[n], dev) for n in names}
    if not present or not names:
        return out
    ones = torch.ones_like(out[names[0]])
    pres = torch.stack([present.get(n, ones) for n in names], 1)
    d = torch.stack([out[n] for n in names], 1)
    d = d & (pres & ~d).any(1, keepdim=True)
    return {n: d[:, i] for i, n in enumerate(names)}
