"""Shared cases of the device transforms tests: small modalities, index-encoded batches, stats from the builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from m3leo_stream.modalities import REGISTRY, Modality, Registry
from m3leo_stream.transforms import build_device_transforms, dihedral
from shard_tools.stats import StatsSet

REPO = Path(__file__).resolve().parents[3]


IGN = -100


SMALL = Registry([
    Modality(name="sar", folder_pattern="sar", file_ext="tif", bands=("s_vv_a", "s_vh_a"), dtype="int16",
             kind="sar_db", resolution_m=140.0, nodata=-32768, description="", source=""),
    Modality(name="opt", folder_pattern="opt", file_ext="tif", bands=("r", "g", "b"), dtype="uint8",
             kind="optical", resolution_m=140.0, scale=(1 / 255,) * 3, description="", source=""),
    Modality(name="lab", folder_pattern="lab", file_ext="tif", bands=("code",), dtype="int16", kind="categorical",
             resolution_m=140.0, nodata=0, class_codes=tuple(range(1, 1025)), description="", source=""),
    Modality(name="crs", folder_pattern="crs", file_ext="tif", bands=("r", "c"), dtype="float32", kind="continuous",
             resolution_m=560.0, nodata=float("nan"), description="", source=""),
])


def _stats(registry, arrays: dict[str, np.ndarray]) -> dict:
    """stats.json content built by the shard builder's own statistics code from (N, C, H, W) arrays."""
    s = StatsSet([registry[n] for n in arrays])
    for n, a in arrays.items():
        for chip in a:
            s.add("r0", n, chip)
    return s.to_json()


def _pattern(b: int, nodata_block: bool = True) -> dict[str, torch.Tensor]:
    """Index-encoded small batch: sar = (row, col) + 100·sample, lab code = row·32 + col + 1, crs = coarse (row, col).
    A nodata block sits at the same place in every modality."""
    r, c = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    sar = torch.stack([r, c]).expand(b, 2, 32, 32).clone().to(torch.int16)
    sar += (100 * torch.arange(b, dtype=torch.int16)).view(b, 1, 1, 1)
    lab = (r * 32 + c + 1).expand(b, 1, 32, 32).clone().to(torch.int16)
    rc, cc = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    crs = torch.stack([rc, cc]).float().expand(b, 2, 8, 8).clone()
    opt = torch.randint(0, 256, (b, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    if nodata_block:
        sar[:, :, 4:8, 20:28] = -32768
        lab[:, :, 4:8, 20:28] = 0
        crs[:, :, 1:2, 5:7] = float("nan")
    return {"sar": sar, "opt": opt, "lab": lab, "crs": crs, "key": [f"k{i}" for i in range(b)],
            "region": torch.zeros(b, dtype=torch.long), "valid": torch.ones(b, dtype=torch.bool)}


def _small(stats, train=True, aug=None, seed=0, rank=0, **over):
    cfg = {"kinds": {"sar_db": {"clip": None}}, "train": aug or {}, **over}
    return build_device_transforms(cfg, SMALL, stats, inputs=["sar", "opt"], targets=["lab", "crs"], train=train,
                                   seed=seed, rank=rank)


def _element(out: torch.Tensor, ref: torch.Tensor) -> int:
    """The dihedral element taking ``ref`` (H, W) to ``out``; fails when there is none."""
    for k in range(8):
        if torch.equal(dihedral(ref[None], torch.tensor([k]))[0], out):
            return k
    raise AssertionError("output is not a dihedral image of the input")


MIXED = Registry([*(SMALL[n] for n in SMALL), REGISTRY["gssic"]])


def _mixed_batch(b: int) -> dict:
    batch = _pattern(b)
    g = torch.Generator().manual_seed(5)
    gs = torch.rand(b, 38, 50, 50, generator=g)
    gs[:, :, :5] = float("nan")
    gs[:, 37] = torch.randint(0, 3, (b, 50, 50), generator=g).float()
    batch["gssic"] = gs
    return batch
